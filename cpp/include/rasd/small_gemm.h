// Small-batch matrix multiply for CPU inference: y[n, m] = x[n, k] · W[m, k]ᵀ (+ bias), for the few
// rows (n ≲ 32) that decoding and tree verification feed through a linear layer.
//
// Why: at batch 1..32 a linear layer is bound by streaming W from memory, yet BLAS GEMM/GEMV paths
// used by torch re-read W per row or per small panel (measured on a 2-core EPYC: F.linear costs 2.2x
// at 2 rows and 3x at 4 rows of the 1-row time). This kernel streams each W row block once and
// multiplies it with every x row while it sits in L1, so n rows cost about as much as one until the
// FMA units, not memory, are the limit.
//
// Layout: x, W row-major and contiguous; y row-major with leading dimension ldy >= m. W is fp32,
// bf16 (stored as uint16 bit patterns, converted in registers) or int8 with one fp32 scale per row
// (W[j, :] = scale[j] * w[j, :], a quarter of fp32's memory traffic: for draft models, whose
// precision changes only what they propose); accumulation is always fp32.
// Work is split over W rows between a persistent pool of threads (see set_num_threads).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rasd {

// The kernel in use: "avx512", "avx2" or "portable" (default: the best one the CPU and build have).
std::string small_gemm_isa();
// The kernels usable here, best first (for tests and benchmarks that compare them).
std::vector<std::string> small_gemm_isas();
// Force one kernel ("auto" = the best again); throws std::invalid_argument if unknown or unsupported.
void set_small_gemm_isa(const std::string& name);

void small_gemm_f32(const float* x, int64_t n, int64_t k, const float* w, int64_t m, const float* bias,
                    float* y, int64_t ldy);

void small_gemm_bf16(const float* x, int64_t n, int64_t k, const uint16_t* w, int64_t m, const float* bias,
                     float* y, int64_t ldy);

void small_gemm_i8(const float* x, int64_t n, int64_t k, const int8_t* w, const float* scale, int64_t m,
                   const float* bias, float* y, int64_t ldy);

// Threads used by the kernels (default: std::thread::hardware_concurrency()).
void set_num_threads(int n);
int get_num_threads();

}  // namespace rasd
