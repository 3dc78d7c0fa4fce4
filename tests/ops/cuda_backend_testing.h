// The fixture and helpers of the CUDA backend tests (test_cuda_backend.cpp: memory, GEMMs and
// the elementwise ops; test_cuda_attention.cpp, test_cuda_loss.cpp, test_cuda_moe.cpp,
// test_cuda_decode.cpp): each runs a CUDA op against the CPU backend (the oracle), on fresh
// random inputs with odd sizes (not multiples of the kernels' 32-row tiles, 256-thread blocks or
// 64-row chunks).
// Outputs are poisoned with NaN before each GPU op, so an unwritten element fails the check.
// Built always; without a CUDA build or a visible GPU every test skips with the reason (but
// CudaFlashVariant, a check of host code, which runs in any CUDA build).
//
// Error measure: max |gpu - cpu| / max |cpu| over the tensor (normwise relative). Tolerances:
// - fp32 ops: 1e-5. Both sides round every operation to fp32 (unit roundoff 2^-24 ~ 6e-8) but
//   sum in different orders (trees vs loops, FMA vs separate multiply-add); for sums of up to a
//   few thousand terms the difference stays ~1e-6 of the largest value, so 1e-5 leaves a margin
//   while a wrong index, a missing term or a factor error shows up as O(1).
// - bf16 GEMM, against the CPU GEMM of the same bf16-rounded inputs: 1e-5 as fp32 (a bf16 x bf16
//   product is exact in fp32, accumulation is fp32). Against the unrounded fp32 inputs: each input
//   carries a relative rounding error <= 2^-8 (bf16 keeps 8 significant bits), a product <= 2^-7;
//   over K terms of random sign the error grows like sqrt(K) terms while max |c| grows at least
//   like one term, so the bound is 2^-7 * sqrt(K) (0.066 at K = 71). A bf16 output adds its own
//   rounding, <= 2^-8 of the element (so of max |c|).
// - Degenerate cases where the exact result is 0 (attention's dq/dk at sequence length 1, where
//   dS = dP - rowsum(dO * O) cancels) are checked in absolute terms: both sides hold rounding
//   noise.
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../tensor_testing.h"
#include "core/error.h"
#include "expect_error.h"
#include "nn/rope.h"
#include "ops/ops.h"
#include "sample_reference.h"
#if defined(MOEKIT_HAVE_CUDA)
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/flash_args.cuh"
#include "ops/cuda/kernels.h"
#endif

namespace moekit::test {

constexpr double kF32Tol = 1e-5;

// Attention cases and their inputs (defined in test_cuda_attention.cpp).
struct AttnCase;
struct AttnDraw;
struct AttnInputs;

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!backend_available(Device::CUDA))
      GTEST_SKIP() << "CUDA backend not available (built without CUDA, or no GPU visible)";
  }

  Backend& cpu() { return backend(Device::CPU); }
  Backend& gpu() { return backend(Device::CUDA); }

  Tensor randn(Shape s, float std = 1.0f) {
    Tensor t = Tensor::empty(s);
    std::normal_distribution<float> n(0.0f, std);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng_);
    return t;
  }
  Tensor randint(Shape s, int32_t lo, int32_t hi) {  // [lo, hi)
    Tensor t = Tensor::empty(s, DType::I32);
    std::uniform_int_distribution<int32_t> u(lo, hi - 1);
    for (int64_t i = 0; i < t.numel(); ++i) t.i32()[i] = u(rng_);
    return t;
  }
  static Tensor dev(const Tensor& t) { return t.to_device(Device::CUDA); }
  // A device tensor of NaN (or -1 for I32): whatever the op leaves unwritten fails the check.
  Tensor poisoned(Shape s, DType dtype = DType::F32) {
    Tensor t = Tensor::empty(s, dtype, Device::CUDA);
    gpu().fill(t, dtype == DType::I32 ? -1.0f : std::numeric_limits<float>::quiet_NaN());
    return t;
  }

  // moe_experts_small against the CPU op (defined in test_cuda_moe.cpp).
  struct SmallCase {
    int64_t T, K, E, H, I;
  };
  // shared_inter > 0: with shared experts of that width (moe_experts_small's `shared`).
  void check_experts_small(const SmallCase& c, DType dtype, bool shifted, int64_t shared_inter = 0);
  // An attention case's inputs, drawn from rng_ (defined in test_cuda_attention.cpp).
  AttnInputs attn_inputs(const AttnCase& c, AttnDraw draw);

  std::mt19937_64 rng_{20261201};
};

// Normwise relative error of a GPU tensor (any float dtype) against a CPU F32 reference.
inline double rel_error(const Tensor& gpu_t, const Tensor& ref) {
  Tensor g = gpu_t.to_host().to_f32();
  EXPECT_EQ(g.numel(), ref.numel());
  double max_ref = 0.0, max_diff = 0.0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double a = g.f32()[i], b = ref.f32()[i];
    if (std::isnan(a) != std::isnan(b)) return std::numeric_limits<double>::infinity();
    if (std::isnan(b)) continue;
    max_ref = std::max(max_ref, std::abs(b));
    max_diff = std::max(max_diff, std::abs(a - b));
  }
  return max_diff / std::max(max_ref, 1e-30);
}

#define EXPECT_CLOSE(gpu_t, ref, tol)                                              \
  do {                                                                             \
    const double err_ = rel_error(gpu_t, ref);                                     \
    EXPECT_LE(err_, tol) << #gpu_t;                                                \
    std::printf("    %-44s rel err %.3g (tol %.3g)\n", #gpu_t, err_, double(tol)); \
  } while (0)

inline void expect_equal_i32(const Tensor& gpu_t, const Tensor& ref) {
  Tensor g = gpu_t.to_host();
  ASSERT_EQ(g.numel(), ref.numel());
  int64_t bad = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) bad += g.i32()[i] != ref.i32()[i];
  EXPECT_EQ(bad, 0) << "index mismatches";
}

inline double max_abs(const Tensor& t) {
  Tensor h = t.to_host().to_f32();
  double m = 0.0;
  for (int64_t i = 0; i < h.numel(); ++i) {
    const double x = std::abs(double(h.f32()[i]));
    if (std::isnan(x)) return x;  // a NaN must not hide behind std::max
    m = std::max(m, x);
  }
  return m;
}

// Row offsets of consecutive groups of the given sizes (grouped_matmul's `begin`).
inline std::vector<int64_t> group_offsets(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> begin{0};
  for (int64_t n : sizes) begin.push_back(begin.back() + n);
  return begin;
}

// Pointers to v[first], ..., v[first + n - 1]: the per-group weight lists the grouped ops take.
inline std::vector<const Tensor*> pointers(const std::vector<Tensor>& v, size_t first, size_t n) {
  std::vector<const Tensor*> out;
  for (size_t g = first; g < first + n; ++g) out.push_back(&v[g]);
  return out;
}
inline std::vector<const Tensor*> pointers(const std::vector<Tensor>& v) {
  return pointers(v, 0, v.size());
}

// Runs `op` (which passes an out-of-range index), then reads `result` back: the read must fail
// with a message containing `message` (index checks report at the next synchronising call), and
// the backend must work normally afterwards.
inline void expect_index_error(const std::function<void()>& op, const Tensor& result,
                               const std::string& message) {
  expect_error_containing(
      [&] {
        op();
        (void)result.to_host();
      },
      message);
  EXPECT_NO_THROW((void)result.to_host()) << "the error was raised twice";
}

// The mean time of `reps` runs of f in milliseconds, after one untimed run, for the throughput
// tests' printouts: reading one element of `probe` (a device tensor) back waits for the queued
// work before and after.
inline double mean_ms(const std::function<void()>& f, const Tensor& probe, int reps = 5) {
  auto sync = [&] { (void)probe.reshape({probe.numel()}).slice(0, 1).to_host(); };
  f();
  sync();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  sync();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
         reps;
}

// Sets a backend's precision for a scope and restores Fp32 after it, even when an op throws.
struct PrecisionScope {
  Backend& b;
  PrecisionScope(Backend& backend, Precision p) : b(backend) { b.set_precision(p); }
  ~PrecisionScope() { b.set_precision(Precision::Fp32); }
};

// Sets an environment variable for a scope (MOEKIT_CUDA_FLASH, read per call; a null value unsets
// it), then restores it.
struct EnvScope {
  std::string name, old;
  bool had = false;
  EnvScope(const char* n, const char* value) : name(n) {
    if (const char* o = std::getenv(n)) {
      had = true;
      old = o;
    }
    if (value)
      setenv(n, value, 1);
    else
      unsetenv(n);
  }
  ~EnvScope() {
    if (had)
      setenv(name.c_str(), old.c_str(), 1);
    else
      unsetenv(name.c_str());
  }
  EnvScope(const EnvScope&) = delete;
  EnvScope& operator=(const EnvScope&) = delete;
};

}  // namespace moekit::test
