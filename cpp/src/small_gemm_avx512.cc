// AVX-512 (F, BW, VL) kernels of small_gemm. This file alone is compiled with -mavx512f/bw/vl -mfma;
// small_gemm.cc dispatches here only after checking the CPU and the OS's zmm state. Same algorithm as
// the AVX2 kernels (small_gemm_avx2.cc): a register tile of weight rows x input rows streamed once over k.
//
// Why a second kernel: from about 8 input rows the kernel is bound by arithmetic, not memory. Measured
// on a 2-core AVX-512/AMX Xeon, 2 threads, AVX2 -> AVX-512 per call at 1 / 4 / 8 / 16 / 32 rows:
// 8960 x 1536 fp32 1.10 / 1.00 / 1.55 / 2.72 / 5.42 -> 1.00 / 1.03 / 1.50 / 2.48 / 4.59 ms (fp32 gains
// little: that core retires one 16-lane FMA per cycle, the same flops as two 8-lane ones), bf16
// weights 0.76 / 0.72 / 1.39 / 2.69 / 5.83 -> 0.53 / 0.58 / 1.08 / 1.96 / 3.87 ms (half the
// conversion instructions). Whole forwards on the same machine, 256-token context, 1 / 8 / 16 / 32
// tokens: Qwen2.5-Coder-1.5B fp32 251 / 334 / 478 / 782 -> 248 / 324 / 456 / 727 ms; the 0.5B draft
// with bf16 weights 66 / 102 / 156 / 265 -> 65 / 92 / 130 / 209 ms. Tiles tried: 3x8, 2x12, 4x6, 6x4
// (best); blocking k so the inputs stay in L1 changed nothing (the FMA port, not L2, is the limit).
#include <immintrin.h>

#include <cstdint>

#include "small_gemm_impl.h"

namespace rasd::detail {
namespace {

// Register tile: RW weight rows x RX input rows -> RW*RX 16-lane accumulators. 6 x 4 keeps 24
// accumulators + 6 weight vectors + 1 input vector in the 32 zmm registers.
constexpr int kRW = 6;
constexpr int kRX = 4;

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  // bf16 -> fp32 is a 16-bit left shift of the bit pattern.
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// y[i0 + s, j0 + r] = sum_c w[j0 + r, c] * x[i0 + s, c] (+ bias) for r < RW, s < RX.
template <int RW, int RX, typename WT>
void tile(const GemmArgs<WT>& a, int64_t j0, int64_t i0, const WT* prefetch) {
  const int64_t k = a.k;
  __m512 acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int s = 0; s < RX; ++s) acc[r][s] = _mm512_setzero_ps();
  const WT* wrow[RW];
  for (int r = 0; r < RW; ++r) wrow[r] = a.w + (j0 + r) * k;
  const float* xrow[RX];
  for (int s = 0; s < RX; ++s) xrow[s] = a.x + (i0 + s) * k;
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    // Next weight block into L2 while this one is multiplied (as in the AVX2 kernel: one prefetch
    // per 64-byte line, L2 so that the input rows do not evict it from L1 before use).
    if (prefetch && (c & (sizeof(WT) == 1 ? kLineMask<WT> : 15)) == 0) {
      for (int r = 0; r < RW; ++r) _mm_prefetch(reinterpret_cast<const char*>(prefetch + r * k + c), _MM_HINT_T1);
    }
    __m512 wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = load16(wrow[r] + c);
    for (int s = 0; s < RX; ++s) {
      const __m512 xv = _mm512_loadu_ps(xrow[s] + c);
      for (int r = 0; r < RW; ++r) acc[r][s] = _mm512_fmadd_ps(wv[r], xv, acc[r][s]);
    }
  }
  if (c < k) {  // the last k % 16 columns, masked (zeros contribute nothing)
    const __mmask16 m = static_cast<__mmask16>((1u << (k - c)) - 1);
    __m512 wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = load16(wrow[r] + c, m);
    for (int s = 0; s < RX; ++s) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xrow[s] + c);
      for (int r = 0; r < RW; ++r) acc[r][s] = _mm512_fmadd_ps(wv[r], xv, acc[r][s]);
    }
  }
  for (int r = 0; r < RW; ++r) {
    for (int s = 0; s < RX; ++s) {
      float sum = scaled(a, j0 + r, _mm512_reduce_add_ps(acc[r][s]));
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
void range_avx512(const GemmArgs<WT>& a, int64_t j_begin, int64_t j_end) {
  int64_t j = j_begin;
  for (; j + kRW <= j_end; j += kRW) row_block<kRW>(a, j, j_end);
  for (; j < j_end; ++j) row_block<1>(a, j, j_end);
}

}  // namespace

void gemm_range_avx512(const GemmArgs<float>& a, int64_t j_begin, int64_t j_end) {
  range_avx512(a, j_begin, j_end);
}
void gemm_range_avx512(const GemmArgs<uint16_t>& a, int64_t j_begin, int64_t j_end) {
  range_avx512(a, j_begin, j_end);
}
void gemm_range_avx512(const GemmArgs<int8_t>& a, int64_t j_begin, int64_t j_end) {
  range_avx512(a, j_begin, j_end);
}

}  // namespace rasd::detail
