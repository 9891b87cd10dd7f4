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
  const float* scale = nullptr;  // [m], int8 weights only: row j of W is scale[j] * w[j, :]
};

// Compute output columns [j_begin, j_end) of y (= weight rows).
void gemm_range_avx2(const GemmArgs<float>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx2(const GemmArgs<uint16_t>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx2(const GemmArgs<int8_t>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx512(const GemmArgs<float>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx512(const GemmArgs<uint16_t>& a, int64_t j_begin, int64_t j_end);
void gemm_range_avx512(const GemmArgs<int8_t>& a, int64_t j_begin, int64_t j_end);

// Weight elements per 64-byte cache line: the kernels prefetch once per line of the next weight block.
template <typename WT>
constexpr int64_t kLineMask = 64 / static_cast<int64_t>(sizeof(WT)) - 1;

// Row j's dot products times its int8 scale (other weight types carry none).
template <typename WT>
inline float scaled(const GemmArgs<WT>& a, int64_t j, float sum) {
  if constexpr (sizeof(WT) == 1) return sum * a.scale[j];
  return sum;
}

}  // namespace rasd::detail
