// AVX2 + FMA kernels of small_gemm (this file alone is compiled with -mavx2 -mfma; small_gemm.cc
// dispatches here only after checking the CPU). See rasd/small_gemm.h for the why.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "small_gemm_impl.h"

namespace rasd::detail {
namespace {

// Register tile: RW weight rows x RX input rows -> RW*RX 8-lane accumulators. 3 x 4 keeps 12
// accumulators + 3 weight vectors + 1 input vector in the 16 ymm registers (4 x 3 spills once the
// bf16 conversion needs a temporary). Measured on a 2-core EPYC, 1536 -> 8960 fp32, per call:
// 3x4: 1.64 / 1.74 / 2.35 / 4.06 ms for 1 / 4 / 8 / 16 rows; 4x3: 1.59 / 2.00 / 2.61 / 4.67;
// 4x2: 1.58 / 1.98 / 3.21 / 6.09. F.linear: 2.55 / 7.29 / 6.63 / 8.50.
constexpr int kRW = 3;
constexpr int kRX = 4;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  // bf16 -> fp32 is a 16-bit left shift of the bit pattern.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55)));
}

// y[i0 + s, j0 + r] = sum_c w[j0 + r, c] * x[i0 + s, c] (+ bias) for r < RW, s < RX.
template <int RW, int RX, typename WT>
void tile(const GemmArgs<WT>& a, int64_t j0, int64_t i0, const WT* prefetch) {
  const int64_t k = a.k;
  __m256 acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int s = 0; s < RX; ++s) acc[r][s] = _mm256_setzero_ps();
  const WT* wrow[RW];
  for (int r = 0; r < RW; ++r) wrow[r] = a.w + (j0 + r) * k;
  const float* xrow[RX];
  for (int s = 0; s < RX; ++s) xrow[s] = a.x + (i0 + s) * k;
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    // Pull the next weight block into L2 while this one is multiplied, so that the DRAM stream does
    // not stall behind the arithmetic (one prefetch per 64-byte line of fp32). L2, not L1: a block
    // prefetched into L1 is evicted by the input rows and the current block before it is used once
    // there are several input rows. Measured on the 2-core EPYC, 20 x (8960 x 1536) fp32, 2 threads,
    // 1 / 4 / 8 / 16 rows: _MM_HINT_T0 36.6 / 43.0 / 53.7 / 85.5 ms, _MM_HINT_T1 32.5 / 32.6 / 33.2 /
    // 57.7 ms (one core alone: 16 -> 24 GB/s at 1 row). bf16 keeps its measured every-16-elements.
    if (prefetch && (c & (sizeof(WT) == 1 ? kLineMask<WT> : 15)) == 0) {
      for (int r = 0; r < RW; ++r) _mm_prefetch(reinterpret_cast<const char*>(prefetch + r * k + c), _MM_HINT_T1);
    }
    __m256 wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = load8(wrow[r] + c);
    for (int s = 0; s < RX; ++s) {
      const __m256 xv = _mm256_loadu_ps(xrow[s] + c);
      for (int r = 0; r < RW; ++r) acc[r][s] = _mm256_fmadd_ps(wv[r], xv, acc[r][s]);
    }
  }
  for (int r = 0; r < RW; ++r) {
    for (int s = 0; s < RX; ++s) {
      float sum = hsum(acc[r][s]);
      // An explicit fused multiply-add: whether the compiler contracts `sum += w * x` may differ between
      // weight types, and the bf16 copy of bf16-valued fp32 weights must give the fp32 kernel's bits.
      for (int64_t t = c; t < k; ++t) sum = std::fma(to_float(wrow[r][t]), xrow[s][t], sum);
      sum = scaled(a, j0 + r, sum);
      if (a.bias) sum += a.bias[j0 + r];
      a.y[(i0 + s) * a.ldy + j0 + r] = sum;
    }
  }
}

template <int RW, int RX, typename WT>
void tail_tile(const GemmArgs<WT>& a, int64_t j0, int64_t i, int rem, const WT* pf) {
  if constexpr (RX > 1) {
    if (rem == RX - 1) {
      tile<RW, RX - 1>(a, j0, i, pf);
      return;
    }
    tail_tile<RW, RX - 1>(a, j0, i, rem, pf);
  }
}

template <int RW, typename WT>
void row_block(const GemmArgs<WT>& a, int64_t j0, int64_t j_end) {
  const WT* pf = j0 + 2 * RW <= j_end ? a.w + (j0 + RW) * a.k : nullptr;
  int64_t i = 0;
  for (; i + kRX <= a.n; i += kRX) tile<RW, kRX>(a, j0, i, pf);
  if (i < a.n) tail_tile<RW, kRX>(a, j0, i, static_cast<int>(a.n - i), pf);
}

template <typename WT>
void range_avx2(const GemmArgs<WT>& a, int64_t j_begin, int64_t j_end) {
  int64_t j = j_begin;
  for (; j + kRW <= j_end; j += kRW) row_block<kRW>(a, j, j_end);
  for (; j < j_end; ++j) row_block<1>(a, j, j_end);
}

}  // namespace

void gemm_range_avx2(const GemmArgs<float>& a, int64_t j_begin, int64_t j_end) { range_avx2(a, j_begin, j_end); }
void gemm_range_avx2(const GemmArgs<uint16_t>& a, int64_t j_begin, int64_t j_end) {
  range_avx2(a, j_begin, j_end);
}
void gemm_range_avx2(const GemmArgs<int8_t>& a, int64_t j_begin, int64_t j_end) { range_avx2(a, j_begin, j_end); }

}  // namespace rasd::detail
