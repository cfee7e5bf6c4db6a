// Hopper (sm90a) FP8 2:4 sparse GEMM with scales in the epilogue:
//   y[T, N] = bf16( x_scale[T] * w_scale[N] * (xq[T, K] @ Wq[N, K]^T) )
// with xq, Wq in e4m3, fp32 accumulation, and the per-token activation scales and per-output-channel weight
// scales of the "FP8 dynamic" scheme applied to the fp32 accumulator before the one rounding to bf16.
//
// Same operand roles as the 16-bit kernels (sparse24_sm90.cuh): A = Wq (sparse, M = out features),
// B = xq seen column-major, D column-major = y row-major. So the weight scale varies along M (a column
// vector broadcast over the tile's columns) and the token scale along N (a row vector broadcast).
// The mainloop is CUTLASS's fast-accumulation FP8 schedule: wgmma accumulates in fp32 throughout, without
// the periodic promotion of the slow-accumulation schedule, which matters little at LLM depths of K.
#pragma once

#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "sparse24_sm90.cuh"

namespace sf24 {

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule, class TileScheduler>
struct Gemm24Fp8 {
  using Element = cutlass::float_e4m3_t;
  using ElementOut = cutlass::bfloat16_t;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kAlignmentOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // The epilogue as a visitor tree: acc * token_scale[n], then * weight_scale[m], rounded once to bf16.
  using WeightScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using TokenScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using ScaleTokens = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, TokenScale,
      cutlass::epilogue::fusion::Sm90AccFetch>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementOut, float, kRound>, WeightScale,
      ScaleTokens>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutTagD, kAlignmentOut, ElementOut,
      LayoutTagD, kAlignmentOut, EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutTagA, kAlignment, Element,
      LayoutTagB, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue, TileScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename Mainloop::SparseConfig;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;

  static typename Device::Arguments arguments(int m, int n, int k, void const* a, void const* e, void const* b,
                                              void* d, void const* weight_scale, void const* token_scale,
                                              Schedule schedule, int device, int sm_count) {
    ProblemShape problem{m, n, k, 1};
    auto layout_a = SparseConfig::fill_layoutA(problem);
    auto layout_e = SparseConfig::fill_layoutE(problem);
    auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
    auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, n, 1));
    using ElementE = typename Mainloop::ElementE;
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        problem,
        {static_cast<Element const*>(a), layout_a, static_cast<Element const*>(b), stride_b,
         static_cast<ElementE const*>(e), layout_e},
        {{}, nullptr, StrideC{}, static_cast<ElementOut*>(d), stride_d}};
    // tree arguments: {first child, second child, node}; a child that is itself a tree nests the same way
    args.epilogue.thread = {
        {static_cast<float const*>(weight_scale), 1.0f, {}},
        {{static_cast<float const*>(token_scale), 1.0f, {}}, {}, {}},
        {}};
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    apply_schedule<TileScheduler>(args.scheduler, schedule);
    return args;
  }

  static int workspace_size(int m, int n, int k, Schedule schedule, int device, int sm_count, size_t* bytes) {
    auto args = arguments(m, n, k, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, schedule, device, sm_count);
    if (Device::can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
    *bytes = Device::get_workspace_size(args);
    return kOk;
  }

  static int run(int m, int n, int k, void const* a, void const* e, void const* b, void* d, void const* weight_scale,
                 void const* token_scale, void* workspace, size_t workspace_bytes, Schedule schedule, int device,
                 int sm_count, cudaStream_t stream) {
    CallKey key{{m, n, k, device, schedule.splits, schedule.mode, schedule.raster, schedule.swizzle},
                {a, e, b, d, weight_scale, token_scale, workspace}};
    return launch_cached<Kernel, Device>(key, workspace, workspace_bytes, device, stream, [&] {
      return arguments(m, n, k, a, e, b, d, weight_scale, token_scale, schedule, device, sm_count);
    });
  }
};

// The compressed layout every FP8 configuration shares (checked in the kernel translation unit).
using ReferenceGemmFp8 =
    Gemm24Fp8<ReferenceTile, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
              cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler>;

}  // namespace sf24
