// Hopper (sm90a) 2:4 sparse GEMM for y[T, N] = x[T, K] @ W[N, K]^T, built from CUTLASS 3.x templates.
//
// The sparse operand is the weight: CUTLASS computes D[M, N'] = A[M, K] B[K, N'] with A sparse, so
// A = W (row-major, M = out features), B = x seen column-major (K contiguous, N' = tokens) and
// D column-major, which is y[T, N] row-major: no transposes on either side of the call.
//
// One translation unit instantiates one kernel configuration (kernel_tu.cu, with -D settings chosen
// by kernels/cutlass24.py); compress_tu.cu instantiates the offline compressor of one element type.
// Every configuration uses a K tile of 128, so all of them read the same compressed weight layout
// (the layout depends only on the element type and min(tile K, 128)); kernel_tu.cu checks that.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdio>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace sf24 {

using namespace cute;

using ProblemShape = Shape<int, int, int, int>;
using LayoutTagA = cutlass::layout::RowMajor;     // W[N_out, K]
using LayoutTagB = cutlass::layout::ColumnMajor;  // x[T, K] read as B[K, T]
using LayoutTagD = cutlass::layout::ColumnMajor;  // y[T, N_out] written as D[N_out, T]
using ReferenceTile = Shape<_128, _128, _128>;

// Status codes shared with the Python side (kernels/cutlass24.py).
enum : int { kOk = 0, kCannotImplement = 1, kInitializeFailed = 2, kRunFailed = 3, kCudaError = 4 };

// Everything a launch's parameters depend on: sizes, device, schedule and every pointer. Kernel
// parameters embed TMA descriptors (and the epilogue's vector pointers), so they can be reused only for
// the very same buffers; PyTorch's caching allocator hands a steady decode loop the same addresses step
// after step, so that is the common case.
struct CallKey {
  int ints[8];
  void const* ptrs[8];
  bool operator==(CallKey const& o) const {
    for (int i = 0; i < 8; ++i) {
      if (ints[i] != o.ints[i] || ptrs[i] != o.ptrs[i]) return false;
    }
    return true;
  }
};

// A function attribute is per device: set it the first time a kernel runs on each one.
template <class Kernel>
int set_shared_memory_attribute(int device) {
  static std::atomic<uint64_t> done{0};
  uint64_t const bit = uint64_t(1) << (device & 63);
  if (done.load(std::memory_order_acquire) & bit) return kOk;
  int const smem = Kernel::SharedStorageSize;
  if (smem >= (48 << 10) &&
      cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
          cudaSuccess) {
    return kCudaError;
  }
  done.fetch_or(bit, std::memory_order_release);
  return kOk;
}

// The per-call path shared by every GEMM: no re-check, the shared-memory attribute set once per device,
// the parameters of the last few calls (per host thread and kernel) reused when nothing changed, the
// workspace initialized only when the schedule has one. `make_args()` builds the kernel's arguments.
template <class Kernel, class Device, class MakeArgs>
int launch_cached(CallKey const& key, void* workspace, size_t workspace_bytes, int device, cudaStream_t stream,
                  MakeArgs make_args) {
  if (int status = set_shared_memory_attribute<Kernel>(device); status != kOk) return status;
  constexpr int kRecent = 8;
  thread_local CallKey keys[kRecent] = {};
  thread_local typename Kernel::Params params[kRecent];
  thread_local int next = 0;
  int slot = -1;
  for (int i = 0; i < kRecent; ++i) {
    if (keys[i] == key) slot = i;
  }
  if (slot < 0 || workspace_bytes > 0) {  // a workspace (stream-K) is re-initialized on every call
    auto args = make_args();
    if (workspace_bytes > 0 && Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess) {
      return kInitializeFailed;
    }
    if (slot < 0) {
      slot = next;
      next = (next + 1) % kRecent;
      keys[slot] = key;
      params[slot] = Kernel::to_underlying_arguments(args, workspace);
    }
  }
  if (Device::run(params[slot], stream) != cutlass::Status::kSuccess) return kRunFailed;
  return cudaPeekAtLastError() == cudaSuccess ? kOk : kCudaError;
}

// Scheduling knobs, all chosen at run time: `raster` (0 heuristic, 1 along M, 2 along N) and `swizzle`
// (1, 2, 4, 8: tiles grouped so that neighbours share operands in L2) for every scheduler; for stream-K
// kernels also `mode` (0 heuristic, 1 data-parallel, 2 split-K, 3 stream-K) and `splits`.
struct Schedule {
  int splits, mode, raster, swizzle;
};

// Applies a schedule to a kernel's scheduler arguments.
template <class TileScheduler, class SchedulerArgs>
void apply_schedule(SchedulerArgs& scheduler, Schedule schedule) {
  using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
  scheduler.raster_order = static_cast<Raster>(schedule.raster);
  scheduler.max_swizzle_size = schedule.swizzle;
  if constexpr (cute::is_same_v<TileScheduler, cutlass::gemm::StreamKScheduler>) {
    using Mode = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::DecompositionMode;
    scheduler.splits = schedule.splits;
    scheduler.decomposition_mode = static_cast<Mode>(schedule.mode);
  }
}

template <class Element, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule,
          class TileScheduler>
struct Gemm24 {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutTagD, kAlignment, Element,
      LayoutTagD, kAlignment, EpilogueSchedule>::CollectiveOp;

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
                                              void* d, Schedule schedule, int device, int sm_count) {
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
        {{}, nullptr, StrideC{}, static_cast<Element*>(d), stride_d}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    apply_schedule<TileScheduler>(args.scheduler, schedule);
    return args;
  }

  // Checks the problem (the caller asks once per problem and remembers the answer) and sizes the workspace.
  static int workspace_size(int m, int n, int k, Schedule schedule, int device, int sm_count, size_t* bytes) {
    auto args = arguments(m, n, k, nullptr, nullptr, nullptr, nullptr, schedule, device, sm_count);
    if (Device::can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
    *bytes = Device::get_workspace_size(args);
    return kOk;
  }

  // The per-call path, kept lean for decode-sized problems (see `launch_cached`).
  static int run(int m, int n, int k, void const* a, void const* e, void const* b, void* d, void* workspace,
                 size_t workspace_bytes, Schedule schedule, int device, int sm_count, cudaStream_t stream) {
    CallKey key{{m, n, k, device, schedule.splits, schedule.mode, schedule.raster, schedule.swizzle},
                {a, e, b, d, workspace}};
    return launch_cached<Kernel, Device>(key, workspace, workspace_bytes, device, stream, [&] {
      return arguments(m, n, k, a, e, b, d, schedule, device, sm_count);
    });
  }
};

// The compressed layout every configuration of one element type shares.
template <class Element>
using ReferenceGemm = Gemm24<Element, ReferenceTile, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                             cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler>;

// The offline compressor for one element type and the compressed layout its kernels read.
template <class Element, class SparseConfig>
struct Compress24 {
  using StrideA = cutlass::gemm::TagToStrideA_t<LayoutTagA>;
  using Utility = cutlass::transform::kernel::StructuredSparseCompressorUtility<ProblemShape, Element, LayoutTagA,
                                                                                  SparseConfig>;
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<ProblemShape, Element, LayoutTagA,
                                                                        SparseConfig, cutlass::arch::Sm90>;
  using Device = cutlass::transform::device::TransformUniversalAdapter<Kernel>;

  static StrideA stride_a(int m, int k) { return cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1)); }

  // Sizes in bytes of the compressed values and of the metadata for an (m, k) weight.
  static int sizes(int m, int k, size_t* values_bytes, size_t* meta_bytes) {
    Utility utility(ProblemShape{m, 1, k, 1}, stride_a(m, k));
    *values_bytes = size_t(m) * utility.get_tensorA_k_physical() * sizeof(Element);
    *meta_bytes = size_t(utility.get_metadata_m_physical()) * utility.get_metadata_k_physical() *
                  sizeof(typename SparseConfig::ElementEMmaRaw);
    return kOk;
  }

  static int run(int m, int k, void const* dense, void* values, void* meta, void* workspace, size_t workspace_bytes,
                 int device, int sm_count, cudaStream_t stream) {
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = device;
    hw_info.sm_count = sm_count;
    typename Device::Arguments args{ProblemShape{m, 1, k, 1}, {dense, stride_a(m, k), values, meta}, {hw_info}};
    Device compressor;
    if (compressor.can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
    if (Device::get_workspace_size(args) > workspace_bytes) return kInitializeFailed;
    if (compressor.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return kInitializeFailed;
    if (compressor.run(stream) != cutlass::Status::kSuccess) return kRunFailed;
    return cudaPeekAtLastError() == cudaSuccess ? kOk : kCudaError;
  }

  static size_t workspace_size(int m, int k) {
    typename Device::Arguments args{ProblemShape{m, 1, k, 1}, {nullptr, stride_a(m, k), nullptr, nullptr}, {}};
    return Device::get_workspace_size(args);
  }
};

}  // namespace sf24
