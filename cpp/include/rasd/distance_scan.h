// Candidate filter of the exact search's bf16 first pass (rasd/ralmspec/exact.py): from a block of
// approximate dot products it keeps the (key, query) pairs whose approximate squared distance
//     approx = key_sq[r] + query_sq[q] - 2 * dots[r, q]        (float32)
// is at most limit[q]. Every pair is tested (nothing is skipped), so the exactness argument of the search
// only depends on limit[q]; this function is the one pass over the block's [rows, queries] products that
// numpy would take five passes for.
#pragma once

#include <cstdint>
#include <vector>

namespace rasd {

struct ScanHits {
  std::vector<int64_t> rows;   // block row of each kept pair
  std::vector<int32_t> query;  // query of each kept pair
  std::vector<float> approx;   // its approximate distance
};

// dots: bf16 bit patterns [rows, ld] row-major, queries 0..nq-1 used (nq <= ld); key_sq [rows];
// query_sq, limit [nq]. Pairs come out row-major (by row, then query).
void bf16_distance_scan(const uint16_t* dots, int64_t rows, int64_t ld, int64_t nq, const float* key_sq,
                        const float* query_sq, const float* limit, ScanHits& out);

}  // namespace rasd
