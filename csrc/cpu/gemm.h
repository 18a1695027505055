// Row-major tile GEMM on the BLAS that libtorch_cpu links (MKL or OpenBLAS export the Fortran
// sgemm_/dgemm_ symbols). They are declared weak so a torch build without them still loads the
// extension, and falls back to at::mm on views of the tiles.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int num_threads) __attribute__((weak));
}

namespace fused_pos_attn::cpu {

// Inside an at::parallel_for task, MKL would open a nested OpenMP team for every tile GEMM and its
// spinning threads would compete with the task threads; this scope makes BLAS calls single-threaded.
class SequentialBlasScope {
 public:
  SequentialBlasScope() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlasScope() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlasScope(const SequentialBlasScope&) = delete;
  SequentialBlasScope& operator=(const SequentialBlasScope&) = delete;

 private:
  int previous_;
};

// C (m x n, row stride ldc) = alpha * op(A) * op(B) + beta * C, all row-major; op(A) is m x k, op(B) k x n.
// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, hence the swapped operands.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  } else {
    if (dgemm_) return dgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  auto out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  beta == T(0) ? out.zero_() : out.mul_(beta);  // BLAS semantics: beta == 0 ignores C's old contents
  out.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), 1, alpha);
}

}  // namespace fused_pos_attn::cpu
