// One FP8 2:4 GEMM configuration (see sparse24_sm90_fp8.cuh), chosen by -D flags as for the 16-bit kernels.
// Exports, with SF24_NAME as prefix:
//   int <name>_workspace(m, n, k, splits, mode, raster, swizzle, device, sm_count, size_t* bytes)
//   int <name>_run(m, n, k, values, meta, x, y, weight_scale, token_scale, workspace, workspace_bytes, splits,
//                  mode, raster, swizzle, device, sm_count, stream)
#include "sparse24_sm90_fp8.cuh"

#ifndef SF24_NAME
#error "SF24_NAME, SF24_TILE_M, SF24_TILE_N, SF24_CLUSTER_M, SF24_CLUSTER_N, SF24_PINGPONG, SF24_STREAMK"
#endif

#define SF24_CAT_(a, b) a##b
#define SF24_CAT(a, b) SF24_CAT_(a, b)

namespace {
using Tile = cute::Shape<cute::Int<SF24_TILE_M>, cute::Int<SF24_TILE_N>, cute::_128>;
using Cluster = cute::Shape<cute::Int<SF24_CLUSTER_M>, cute::Int<SF24_CLUSTER_N>, cute::_1>;
using KernelSchedule = cute::conditional_t<SF24_PINGPONG, cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
                                           cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum>;
using EpilogueSchedule = cute::conditional_t<SF24_PINGPONG, cutlass::epilogue::TmaWarpSpecialized,
                                             cutlass::epilogue::TmaWarpSpecializedCooperative>;
using TileScheduler = cute::conditional_t<SF24_STREAMK, cutlass::gemm::StreamKScheduler,
                                          cutlass::gemm::PersistentScheduler>;
using Gemm = sf24::Gemm24Fp8<Tile, Cluster, KernelSchedule, EpilogueSchedule, TileScheduler>;
static_assert(cute::is_same_v<typename Gemm::SparseConfig, typename sf24::ReferenceGemmFp8::SparseConfig>,
              "every FP8 configuration must read the one compressed FP8 layout");
}  // namespace

extern "C" int SF24_CAT(SF24_NAME, _workspace)(int m, int n, int k, int splits, int mode, int raster, int swizzle,
                                              int device, int sm_count, size_t* bytes) {
  return Gemm::workspace_size(m, n, k, {splits, mode, raster, swizzle}, device, sm_count, bytes);
}

extern "C" int SF24_CAT(SF24_NAME, _run)(int m, int n, int k, void const* values, void const* meta, void const* x,
                                        void* y, void const* weight_scale, void const* token_scale, void* workspace,
                                        size_t workspace_bytes, int splits, int mode, int raster, int swizzle,
                                        int device, int sm_count, cudaStream_t stream) {
  return Gemm::run(m, n, k, values, meta, x, y, weight_scale, token_scale, workspace, workspace_bytes,
                   {splits, mode, raster, swizzle}, device, sm_count, stream);
}
