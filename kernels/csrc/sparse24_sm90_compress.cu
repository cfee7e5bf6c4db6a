// The offline compressor (dense 2:4-pruned weight -> values + metadata) of one element type, chosen by
// -DSF24_ELEMENT (and -DSF24_FP8=1 for e4m3, whose kernels read their own layout); exports
// <SF24_NAME>_sizes, <SF24_NAME>_workspace and <SF24_NAME>_run.
#if SF24_FP8
#include "sparse24_sm90_fp8.cuh"
#else
#include "sparse24_sm90.cuh"
#endif

#define SF24_CAT_(a, b) a##b
#define SF24_CAT(a, b) SF24_CAT_(a, b)

namespace {
#if SF24_FP8
using Compress = sf24::Compress24<cutlass::float_e4m3_t, sf24::ReferenceGemmFp8::SparseConfig>;
#else
using Compress = sf24::Compress24<SF24_ELEMENT, typename sf24::ReferenceGemm<SF24_ELEMENT>::SparseConfig>;
#endif
}  // namespace

extern "C" int SF24_CAT(SF24_NAME, _sizes)(int m, int k, size_t* values_bytes, size_t* meta_bytes) {
  return Compress::sizes(m, k, values_bytes, meta_bytes);
}

extern "C" size_t SF24_CAT(SF24_NAME, _workspace)(int m, int k) { return Compress::workspace_size(m, k); }

extern "C" int SF24_CAT(SF24_NAME, _run)(int m, int k, void const* dense, void* values, void* meta, void* workspace,
                                        size_t workspace_bytes, int device, int sm_count, cudaStream_t stream) {
  return Compress::run(m, k, dense, values, meta, workspace, workspace_bytes, device, sm_count, stream);
}
