// See rasd/distance_scan.h.
#include "rasd/distance_scan.h"

#include <cstring>

// x86-64: one clone per ISA, picked at load time by the CPU (AVX-512 on the Xeons, AVX2 on the EPYCs).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RASD_SCAN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RASD_SCAN_CLONES
#endif

namespace rasd {
namespace {

typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));

// approx = (key_sq + query_sq) - (dot + dot): dot + dot is exact, so there is no product that a compiler
// could fuse into an FMA, and the vector and scalar paths below round identically.
inline float approx_of(float key_sq, float query_sq, uint16_t dot_bits) {
  const uint32_t bits = static_cast<uint32_t>(dot_bits) << 16;  // bf16 -> float32 is exact
  float dot;
  std::memcpy(&dot, &bits, sizeof dot);
  return (key_sq + query_sq) - (dot + dot);
}

// Every pair of row r in columns [c, c + width) that passes (width <= 16 in the vector path's rare case).
void emit(const uint16_t* row, int64_t r, int64_t c, int64_t width, int64_t nq, float ks, const float* query_sq,
          const float* limit, ScanHits& out) {
  for (int64_t q = c; q < c + width && q < nq; ++q) {
    const float approx = approx_of(ks, query_sq[q], row[q]);
    if (approx <= limit[q]) {
      out.rows.push_back(r);
      out.query.push_back(static_cast<int32_t>(q));
      out.approx.push_back(approx);
    }
  }
}

// ld % 16 == 0; qs, lim: [ld], padded with 0 and -inf (padding never passes). Rows outer, so the pairs come
// out row-major as the header promises, for any ld.
RASD_SCAN_CLONES
void scan16(const uint16_t* dots, int64_t rows, int64_t ld, int64_t nq, const float* key_sq, const float* qs,
            const float* lim, const float* query_sq, const float* limit, ScanHits& out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < ld; c += 16) {
      F16 qv, lv;
      std::memcpy(&qv, qs + c, sizeof qv);
      std::memcpy(&lv, lim + c, sizeof lv);
      H16 h;
      std::memcpy(&h, dots + r * ld + c, sizeof h);
      const U16 bits = __builtin_convertvector(h, U16) << 16;
      F16 dot;
      std::memcpy(&dot, &bits, sizeof dot);
      const F16 approx = (key_sq[r] + qv) - (dot + dot);
      const I16 pass = approx <= lv;
      // Almost no row passes: test all 16 lanes at once (an OR tree), then redo the lanes one by one.
      I16 any = pass | __builtin_shuffle(pass, I16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
      any |= __builtin_shuffle(any, I16{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
      any |= __builtin_shuffle(any, I16{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
      any |= __builtin_shuffle(any, I16{1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
      if (any[0]) emit(dots + r * ld, r, c, 16, nq, key_sq[r], query_sq, limit, out);
    }
  }
}

}  // namespace

void bf16_distance_scan(const uint16_t* dots, int64_t rows, int64_t ld, int64_t nq, const float* key_sq,
                        const float* query_sq, const float* limit, ScanHits& out) {
  if (ld % 16 == 0) {
    std::vector<float> qs(ld, 0.0f), lim(ld, -__builtin_inff());
    std::memcpy(qs.data(), query_sq, nq * sizeof(float));
    std::memcpy(lim.data(), limit, nq * sizeof(float));
    scan16(dots, rows, ld, nq, key_sq, qs.data(), lim.data(), query_sq, limit, out);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) emit(dots + r * ld, r, 0, nq, nq, key_sq[r], query_sq, limit, out);
}

}  // namespace rasd
