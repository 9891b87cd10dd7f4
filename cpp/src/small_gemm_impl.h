// Internal interface between the small_gemm dispatcher and its per-ISA kernels.
#pragma once

#include <cstdint>

namespace rasd::detail {

template <typename WT>
struct GemmArgs {
  const float* x;     // [n, k]
  int64_t n, k;
  const WT* w;        // [m, k]
  int64_t m;
  const float* bias;  // [m] or nullptr
  float* y;           // [n, ldy]
  int64_t ldy;
};

// Compute output columns [j_begin, j_end) of y (= weight rows).
void gemm_range_avx2(const GemmArgs<float>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx2(const GemmArgs<uint16_t>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx512(const GemmArgs<float>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx512(const GemmArgs<uint16_t>& a, int64_t j_begin, int64_t j_end);

}  // namespace rasd::detail
