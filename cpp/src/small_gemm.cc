// Dispatcher, portable fallback and thread pool of small_gemm (see rasd/small_gemm.h).
#include "rasd/small_gemm.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "small_gemm_impl.h"

namespace rasd {
namespace {

// A fixed set of worker threads that run one data-parallel task at a time. Workers spin briefly
// before sleeping because a forward pass issues hundreds of short GEMMs back to back (waking a sleeping
// thread costs tens of microseconds); the spin is short so that the workers do not compete with
// torch's own threads for the cores between our calls.
class ThreadPool {
 public:
  explicit ThreadPool(int n) : size_(std::max(1, n)) {
    for (int t = 1; t < size_; ++t) threads_.emplace_back([this, t] { worker(t); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& th : threads_) th.join();
  }
  int size() const { return size_; }

  // Runs f(t) for t in [0, size()); t = 0 runs on the calling thread. Returns when all are done.
  void run(const std::function<void(int)>& f) {
    std::lock_guard<std::mutex> serial(run_mu_);  // one task at a time, callers may be many threads
    if (size_ == 1) {
      f(0);
      return;
    }
    task_ = &f;
    remaining_.store(size_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    f(0);
    while (remaining_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

 private:
  void worker(int t) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen = generation_.load(std::memory_order_acquire);
      for (int spin = 0; gen == seen && spin < 20000; ++spin) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        gen = generation_.load(std::memory_order_acquire);
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        gen = generation_.load(std::memory_order_acquire);
      }
      seen = gen;
      if (stop_) return;
      (*task_)(t);
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int size_;
  std::vector<std::thread> threads_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(int)>* task_ = nullptr;
  bool stop_ = false;
};

// The pool in use. Callers hold a shared_ptr for the whole call, so set_num_threads (or a pool of another
// size) can replace it at any time: the old pool is destroyed, and its threads joined, only after the last
// running call that uses it has returned.
std::mutex g_pool_mu;
std::shared_ptr<ThreadPool> g_pool;
pid_t g_pool_pid = 0;
int g_num_threads = 0;  // 0 = hardware concurrency

std::shared_ptr<ThreadPool> pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  const int want = g_num_threads > 0 ? g_num_threads : std::max(1u, std::thread::hardware_concurrency());
  if (g_pool && g_pool_pid != getpid()) {
    // Forked child: the parent's worker threads do not exist here; never join them (leak the object).
    new std::shared_ptr<ThreadPool>(std::move(g_pool));
  }
  if (!g_pool || g_pool->size() != want) {
    g_pool = std::make_shared<ThreadPool>(want);
    g_pool_pid = getpid();
  }
  return g_pool;
}

inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename WT>
void range_portable(const detail::GemmArgs<WT>& a, int64_t j_begin, int64_t j_end) {
  for (int64_t j = j_begin; j < j_end; ++j) {
    const WT* w = a.w + j * a.k;
    for (int64_t i = 0; i < a.n; ++i) {
      const float* x = a.x + i * a.k;
      float sum = 0.f;
      for (int64_t c = 0; c < a.k; ++c) sum += to_float(w[c]) * x[c];
      a.y[i * a.ldy + j] = detail::scaled(a, j, sum) + (a.bias ? a.bias[j] : 0.f);
    }
  }
}

// Kernels compiled into this build, best first; each is usable only if the running CPU has it too.
enum Isa : int { kAvx512 = 0, kAvx2 = 1, kPortable = 2 };
constexpr const char* kIsaNames[] = {"avx512", "avx2", "portable"};
constexpr Isa kAllIsas[] = {kAvx512, kAvx2, kPortable};

bool cpu_has(Isa isa) {
  switch (isa) {
#if defined(RASD_HAVE_AVX2_KERNELS)
    case kAvx512: {
      // libgcc's check includes the OS saving the zmm state (XCR0), not only CPUID.
      static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
      return ok;
    }
    case kAvx2: {
      static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
      return ok;
    }
#endif
    case kPortable:
      return true;
    default:
      return false;
  }
}

Isa best_isa() {
  for (Isa isa : kAllIsas) {
    if (cpu_has(isa)) return isa;
  }
  return kPortable;
}

std::atomic<int> g_isa{-1};  // -1 = not chosen yet (best_isa() on first use)

Isa current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
}

template <typename WT>
void run_gemm(const detail::GemmArgs<WT>& a) {
  const Isa isa = current_isa();
  auto range = [&](int64_t j0, int64_t j1) {
#ifdef RASD_HAVE_AVX2_KERNELS
    if (isa == kAvx512) {
      detail::gemm_range_avx512(a, j0, j1);
      return;
    }
    if (isa == kAvx2) {
      detail::gemm_range_avx2(a, j0, j1);
      return;
    }
#endif
    range_portable(a, j0, j1);
  };
  const std::shared_ptr<ThreadPool> held = pool();  // kept alive until this call returns
  // Below ~256 output columns the pool's hand-off costs more than the split saves.
  const int threads = a.m >= 256 ? held->size() : 1;
  if (threads == 1) {
    range(0, a.m);
    return;
  }
  held->run([&](int t) {
    // Contiguous column ranges, boundaries on multiples of 8 so every thread gets whole tiles.
    const int64_t j0 = (a.m * t / threads) & ~int64_t{7};
    const int64_t j1 = t + 1 == threads ? a.m : (a.m * (t + 1) / threads) & ~int64_t{7};
    range(j0, j1);
  });
}

}  // namespace

std::string small_gemm_isa() { return kIsaNames[current_isa()]; }

std::vector<std::string> small_gemm_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAllIsas) {
    if (cpu_has(isa)) out.emplace_back(kIsaNames[isa]);
  }
  return out;
}

void set_small_gemm_isa(const std::string& name) {
  if (name == "auto") {
    g_isa.store(best_isa(), std::memory_order_relaxed);
    return;
  }
  for (Isa isa : kAllIsas) {
    if (name != kIsaNames[isa]) continue;
    if (!cpu_has(isa)) {
      throw std::invalid_argument("small_gemm: the " + name + " kernel is not available on this CPU or build");
    }
    g_isa.store(isa, std::memory_order_relaxed);
    return;
  }
  throw std::invalid_argument("small_gemm: unknown kernel '" + name + "' (use auto, avx512, avx2 or portable)");
}

void small_gemm_f32(const float* x, int64_t n, int64_t k, const float* w, int64_t m, const float* bias,
                    float* y, int64_t ldy) {
  run_gemm(detail::GemmArgs<float>{x, n, k, w, m, bias, y, ldy});
}

void small_gemm_bf16(const float* x, int64_t n, int64_t k, const uint16_t* w, int64_t m, const float* bias,
                     float* y, int64_t ldy) {
  run_gemm(detail::GemmArgs<uint16_t>{x, n, k, w, m, bias, y, ldy});
}

void small_gemm_i8(const float* x, int64_t n, int64_t k, const int8_t* w, const float* scale, int64_t m,
                   const float* bias, float* y, int64_t ldy) {
  run_gemm(detail::GemmArgs<int8_t>{x, n, k, w, m, bias, y, ldy, scale});
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_num_threads = std::max(0, n);
}

int get_num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  return g_num_threads > 0 ? g_num_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace rasd
