// sparseflow: a thin C ABI over cuSPARSELt that keeps descriptors and the matmul plan alive.
//
// torch._cslt_sparse_mm re-initialises the sparse, dense and output descriptors, the matmul
// descriptor, the algorithm selection and the plan on every call, then destroys them. This shim
// builds them once per (out, in, tokens, dtype, layout, algorithm, split-k) and leaves one
// cusparseLtMatmul per call. y[T, N] = x[T, K] @ W[N, K]^T, all row-major torch tensors, in one of
// three layouts (cuSPARSELt picks different kernels, and plans at very different cost, for each):
//   0  W = A (structured, row N x K), x = B (col K x T), y = D (col N x T): no copies at all
//   1  W = A (structured, row N x K), x = B (col K x T), D row N x T: the caller transposes D
//   2  x = A (row T x K), W^T = B (structured, col K x N), y = D (row T x N): no copies at all
// Built at run time by kernels/cslt.py against the cusparseLt.h that ships with the loaded library.
#include <cusparseLt.h>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace {
cusparseLtHandle_t g_handle;
bool g_ready = false;

struct Plan {
  cusparseLtMatDescriptor_t a, b, d;
  cusparseLtMatmulDescriptor_t mm;
  cusparseLtMatmulAlgSelection_t sel;
  cusparseLtMatmulPlan_t plan;
  int stage = 0;  // how many of the objects above exist, for sf_plan_destroy
  size_t workspace = 0;
  int max_alg = 0;
  int layout = 0;
};

cudaDataType to_type(int dtype) { return dtype == 1 ? CUDA_R_16BF : CUDA_R_16F; }

// W (N x K row-major in memory) as the structured operand: A row N x K, or B col K x N (layout 2)
int sparse_descriptor(cusparseLtMatDescriptor_t* desc, int64_t n_out, int64_t k, int dtype, int layout) {
  if (layout == 2)
    return cusparseLtStructuredDescriptorInit(&g_handle, desc, k, n_out, k, 16, to_type(dtype), CUSPARSE_ORDER_COL,
                                              CUSPARSELT_SPARSITY_50_PERCENT);
  return cusparseLtStructuredDescriptorInit(&g_handle, desc, n_out, k, k, 16, to_type(dtype), CUSPARSE_ORDER_ROW,
                                            CUSPARSELT_SPARSITY_50_PERCENT);
}
}  // namespace

#define SF_TRY(expr)                 \
  do {                               \
    int _status = (int)(expr);       \
    if (_status != 0) return _status; \
  } while (0)

extern "C" {

int sf_init(void) {
  if (g_ready) return 0;
  SF_TRY(cusparseLtInit(&g_handle));
  g_ready = true;
  return 0;
}

int sf_version(int* version) { return (int)cusparseLtGetVersion(&g_handle, version); }

const char* sf_error_string(int status) { return cusparseLtGetErrorString((cusparseStatus_t)status); }

int sf_compressed_size(int64_t n_out, int64_t k, int dtype, int layout, size_t* size, size_t* buffer) {
  cusparseLtMatDescriptor_t a;
  SF_TRY(sparse_descriptor(&a, n_out, k, dtype, layout));
  int status = (int)cusparseLtSpMMACompressedSize2(&g_handle, &a, size, buffer);
  cusparseLtMatDescriptorDestroy(&a);
  return status;
}

int sf_compress(int64_t n_out, int64_t k, int dtype, int layout, const void* dense, void* out, void* buffer,
                void* stream) {
  cusparseLtMatDescriptor_t a;
  SF_TRY(sparse_descriptor(&a, n_out, k, dtype, layout));
  int status = (int)cusparseLtSpMMACompress2(&g_handle, &a, layout == 2 ? 0 : 1, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                             dense, out,
                                             buffer, (cudaStream_t)stream);
  cusparseLtMatDescriptorDestroy(&a);
  return status;
}

void sf_plan_destroy(void* handle) {
  Plan* p = static_cast<Plan*>(handle);
  if (p == nullptr) return;
  if (p->stage >= 6) cusparseLtMatmulPlanDestroy(&p->plan);
  if (p->stage >= 5) cusparseLtMatmulAlgSelectionDestroy(&p->sel);
  if (p->stage >= 3) cusparseLtMatDescriptorDestroy(&p->d);
  if (p->stage >= 2) cusparseLtMatDescriptorDestroy(&p->b);
  if (p->stage >= 1) cusparseLtMatDescriptorDestroy(&p->a);
  delete p;
}

// split_k <= 1 leaves cuSPARSELt's default; split_k_mode: 1 one kernel, 2 two kernels.
int sf_plan_create(int64_t n_out, int64_t k, int64_t tokens, int dtype, int layout, int alg_id, int split_k,
                   int split_k_mode, void** out) {
  *out = nullptr;
  Plan* p = new (std::nothrow) Plan();
  if (p == nullptr) return -1;
  int status = 0;
  cudaDataType type = to_type(dtype);
#define SF_STEP(expr)               \
  status = (int)(expr);             \
  if (status != 0) {                \
    sf_plan_destroy(p);             \
    return status;                  \
  }                                 \
  p->stage++;
  p->layout = layout;
  if (layout == 2) {  // a = x (dense), b = W^T (structured)
    SF_STEP(cusparseLtDenseDescriptorInit(&g_handle, &p->a, tokens, k, k, 16, type, CUSPARSE_ORDER_ROW));
    SF_STEP(sparse_descriptor(&p->b, n_out, k, dtype, layout));
    SF_STEP(cusparseLtDenseDescriptorInit(&g_handle, &p->d, tokens, n_out, n_out, 16, type, CUSPARSE_ORDER_ROW));
  } else {
    SF_STEP(sparse_descriptor(&p->a, n_out, k, dtype, layout));
    SF_STEP(cusparseLtDenseDescriptorInit(&g_handle, &p->b, k, tokens, k, 16, type, CUSPARSE_ORDER_COL));
    if (layout == 1) {
      SF_STEP(cusparseLtDenseDescriptorInit(&g_handle, &p->d, n_out, tokens, tokens, 16, type, CUSPARSE_ORDER_ROW));
    } else {
      SF_STEP(cusparseLtDenseDescriptorInit(&g_handle, &p->d, n_out, tokens, n_out, 16, type, CUSPARSE_ORDER_COL));
    }
  }
  SF_STEP(cusparseLtMatmulDescriptorInit(&g_handle, &p->mm, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                         CUSPARSE_OPERATION_NON_TRANSPOSE, &p->a, &p->b, &p->d, &p->d,
                                         CUSPARSE_COMPUTE_32F));
  SF_STEP(cusparseLtMatmulAlgSelectionInit(&g_handle, &p->sel, &p->mm, CUSPARSELT_MATMUL_ALG_DEFAULT));
#undef SF_STEP
  status = (int)cusparseLtMatmulAlgGetAttribute(&g_handle, &p->sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID,
                                                &p->max_alg, sizeof(p->max_alg));
  if (status == 0)
    status = (int)cusparseLtMatmulAlgSetAttribute(&g_handle, &p->sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id,
                                                  sizeof(alg_id));
  if (status == 0 && split_k > 1) {
    status = (int)cusparseLtMatmulAlgSetAttribute(&g_handle, &p->sel, CUSPARSELT_MATMUL_SPLIT_K, &split_k,
                                                  sizeof(split_k));
    if (status == 0 && split_k_mode > 0)
      status = (int)cusparseLtMatmulAlgSetAttribute(&g_handle, &p->sel, CUSPARSELT_MATMUL_SPLIT_K_MODE,
                                                    &split_k_mode, sizeof(split_k_mode));
  }
  if (status == 0) status = (int)cusparseLtMatmulPlanInit(&g_handle, &p->plan, &p->mm, &p->sel);
  if (status != 0) {
    sf_plan_destroy(p);
    return status;
  }
  p->stage++;
  status = (int)cusparseLtMatmulGetWorkspace(&g_handle, &p->plan, &p->workspace);
  if (status != 0) {
    sf_plan_destroy(p);
    return status;
  }
  *out = p;
  return 0;
}

size_t sf_plan_workspace(void* handle) { return static_cast<Plan*>(handle)->workspace; }

int sf_plan_max_alg(void* handle) { return static_cast<Plan*>(handle)->max_alg; }

// w: the compressed weight, x: the activations, d: the output (see the layouts above)
int sf_matmul(void* handle, const void* w, const void* x, void* d, void* workspace, void* stream) {
  Plan* p = static_cast<Plan*>(handle);
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t s = (cudaStream_t)stream;
  const void* a = p->layout == 2 ? x : w;
  const void* b = p->layout == 2 ? w : x;
  return (int)cusparseLtMatmul(&g_handle, &p->plan, &alpha, a, b, &beta, d, d, workspace, &s, 1);
}

// cuSPARSELt's own search: rewrites the plan's algorithm, then reports what it chose.
int sf_search(void* handle, const void* w, const void* x, void* d, void* workspace, void* stream, int* alg_id,
              int* split_k, int* split_k_mode) {
  Plan* p = static_cast<Plan*>(handle);
  const void* a = p->layout == 2 ? x : w;
  const void* b = p->layout == 2 ? w : x;
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t s = (cudaStream_t)stream;
  SF_TRY(cusparseLtMatmulSearch(&g_handle, &p->plan, &alpha, a, b, &beta, d, d, workspace, &s, 1));
  SF_TRY(cusparseLtMatmulAlgGetAttribute(&g_handle, &p->sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, alg_id,
                                         sizeof(*alg_id)));
  SF_TRY(cusparseLtMatmulAlgGetAttribute(&g_handle, &p->sel, CUSPARSELT_MATMUL_SPLIT_K, split_k, sizeof(*split_k)));
  return (int)cusparseLtMatmulAlgGetAttribute(&g_handle, &p->sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, split_k_mode,
                                              sizeof(*split_k_mode));
}

}  // extern "C"
