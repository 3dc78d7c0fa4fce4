// The CUDA backend against the CPU backend (the oracle), op by op, on fresh random inputs with
// odd sizes (not multiples of the kernels' 32-row tiles, 256-thread blocks or 64-row chunks).
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
#include "ops/cuda/flash_args.cuh"
#include "ops/cuda/kernels.h"
#endif

namespace moekit {
namespace {

using test::bit_equal;

using test::expect_error_containing;

constexpr double kF32Tol = 1e-5;

// Attention cases and their inputs (defined with the attention tests below).
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

  // moe_experts_small against the CPU op (defined with its tests below).
  struct SmallCase {
    int64_t T, K, E, H, I;
  };
  // shared_inter > 0: with shared experts of that width (moe_experts_small's `shared`).
  void check_experts_small(const SmallCase& c, DType dtype, bool shifted, int64_t shared_inter = 0);
  // An attention case's inputs, drawn from rng_ (defined with the attention tests below).
  AttnInputs attn_inputs(const AttnCase& c, AttnDraw draw);

  std::mt19937_64 rng_{20261201};
};

// Normwise relative error of a GPU tensor (any float dtype) against a CPU F32 reference.
double rel_error(const Tensor& gpu_t, const Tensor& ref) {
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

void expect_equal_i32(const Tensor& gpu_t, const Tensor& ref) {
  Tensor g = gpu_t.to_host();
  ASSERT_EQ(g.numel(), ref.numel());
  int64_t bad = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) bad += g.i32()[i] != ref.i32()[i];
  EXPECT_EQ(bad, 0) << "index mismatches";
}

double max_abs(const Tensor& t) {
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
std::vector<int64_t> group_offsets(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> begin{0};
  for (int64_t n : sizes) begin.push_back(begin.back() + n);
  return begin;
}

// Runs `op` (which passes an out-of-range index), then reads `result` back: the read must fail
// with a message containing `message` (index checks report at the next synchronising call), and
// the backend must work normally afterwards.
void expect_index_error(const std::function<void()>& op, const Tensor& result,
                        const std::string& message) {
  expect_error_containing(
      [&] {
        op();
        (void)result.to_host();
      },
      message);
  EXPECT_NO_THROW((void)result.to_host()) << "the error was raised twice";
}

// ---------------------------------------------------------------------------------------------

TEST_F(CudaBackendTest, MemoryRoundTripAndFill) {
  Tensor h = randn({37, 53});
  Tensor d = Tensor::empty(h.shape(), DType::F32, Device::CUDA);
  EXPECT_EQ(d.device(), Device::CUDA);
  d.copy_from(h);                 // host -> device
  Tensor d2 = d.clone();          // device -> device
  EXPECT_TRUE(bit_equal(d2, h));  // device -> host
  Tensor z = Tensor::zeros({5, 7}, DType::I32, Device::CUDA);
  Tensor zh = z.to_host();
  for (int64_t i = 0; i < zh.numel(); ++i) EXPECT_EQ(zh.i32()[i], 0);
  Tensor f = Tensor::empty({1001}, DType::F32, Device::CUDA);
  f.fill(2.5f);
  Tensor fh = f.to_host();
  for (int64_t i = 0; i < fh.numel(); ++i) ASSERT_EQ(fh.f32()[i], 2.5f);
  Tensor s = d.slice(3, 9);  // a view at an offset copies back the right rows
  EXPECT_TRUE(bit_equal(s, h.slice(3, 9)));
}

TEST_F(CudaBackendTest, MatmulF32AllTransposes) {
  const int64_t M = 37, N = 53, K = 71;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Tensor a = ta ? randn({K, M}) : randn({M, K});
      Tensor b = tb ? randn({N, K}) : randn({K, N});
      Tensor c = randn({M, N});
      Tensor dc = dev(c);
      cpu().matmul(c, a, b, ta, tb, 0.7f, 0.3f);
      gpu().matmul(dc, dev(a), dev(b), ta, tb, 0.7f, 0.3f);
      EXPECT_CLOSE(dc, c, kF32Tol);
    }
  // beta = 0 must overwrite NaN.
  Tensor a = randn({M, K}), b = randn({K, N}), c = Tensor::empty({M, N});
  Tensor dc = poisoned({M, N});
  cpu().matmul(c, a, b, false, false, 1.0f, 0.0f);
  gpu().matmul(dc, dev(a), dev(b), false, false, 1.0f, 0.0f);
  EXPECT_CLOSE(dc, c, kF32Tol);
}

TEST_F(CudaBackendTest, MatmulBf16InputsFp32Accumulation) {
  const int64_t M = 45, N = 67, K = 71;
  for (int tb = 0; tb < 2; ++tb)
    for (DType out : {DType::F32, DType::BF16}) {
      Tensor a = randn({M, K}), b = tb ? randn({N, K}) : randn({K, N});
      Tensor a16 = a.to_dtype(DType::BF16), b16 = b.to_dtype(DType::BF16);
      Tensor exact = Tensor::empty({M, N}), loose = Tensor::empty({M, N});
      cpu().matmul(exact, a16.to_f32(), b16.to_f32(), false, tb, 1.0f, 0.0f);  // same inputs
      cpu().matmul(loose, a, b, false, tb, 1.0f, 0.0f);                        // unrounded
      Tensor dc = poisoned({M, N}, out);
      gpu().matmul(dc, dev(a16), dev(b16), false, tb, 1.0f, 0.0f);
      const double out_round = out == DType::BF16 ? std::ldexp(1.0, -8) : 0.0;
      EXPECT_CLOSE(dc, exact, kF32Tol + out_round);
      EXPECT_CLOSE(dc, loose, std::ldexp(1.0, -7) * std::sqrt(double(K)) + out_round);
    }
}

// F32 activations x BF16 weights (frozen bf16 parameters), and F32 x F32 under the Bf16 precision:
// the F32 operand is rounded to bf16 (round to nearest even, as Tensor::to_dtype) and the GEMM
// accumulates in fp32, so the CPU GEMM of the same rounded inputs is the oracle at fp32 tolerance.
// alpha/beta and every transpose go through the same conversion.
TEST_F(CudaBackendTest, MatmulMixedF32Bf16AndBf16Precision) {
  const int64_t M = 45, N = 67, K = 71;
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      Tensor a = ta ? randn({K, M}) : randn({M, K});
      Tensor b = tb ? randn({N, K}) : randn({K, N});
      Tensor c = randn({M, N}), dc = dev(c), dc2 = dev(c);
      cpu().matmul(c, rounded(a), rounded(b), ta, tb, 0.7f, 0.3f);
      gpu().matmul(dc, dev(a), dev(b.to_dtype(DType::BF16)), ta, tb, 0.7f, 0.3f);
      EXPECT_CLOSE(dc, c, kF32Tol);
      gpu().set_precision(Precision::Bf16);
      gpu().matmul(dc2, dev(a), dev(b), ta, tb, 0.7f, 0.3f);
      gpu().set_precision(Precision::Fp32);
      EXPECT_CLOSE(dc2, c, kF32Tol);
    }
  EXPECT_EQ(gpu().precision(), Precision::Fp32);
}

// round_bf16 (layers round a GEMM input once with it under Bf16): bit-identical to the CPU's exact
// rounding (nearest, ties to even; the values include exact ties, huge and tiny values, infinities
// and signed zeros), and a bf16 GEMM of its result equals, to the bit, the GEMM that rounds the
// F32 operand itself under Precision::Bf16: the premise of rounding once (nn/linear.h). 45 rows,
// above the few-row GEMV path, which reads F32 activations unrounded (unrounded_gemv_rows).
TEST_F(CudaBackendTest, RoundBf16EqualsCpuAndTheGemmsOwnRounding) {
  const int64_t M = 45, N = 67, K = 71;
  Tensor x = randn({M, K});
  const float specials[] = {1.0f + std::ldexp(1.0f, -8),
                            1.0f + 3 * std::ldexp(1.0f, -8),
                            -1.0f - std::ldexp(1.0f, -8),
                            3.0e38f,
                            1.0e-40f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()};
  for (size_t i = 0; i < std::size(specials); ++i) x.f32()[i * 7] = specials[i];
  Tensor ref = Tensor::empty({M, K}, DType::BF16), got = poisoned({M, K}, DType::BF16);
  cpu().round_bf16(ref, x);
  gpu().round_bf16(got, dev(x));
  EXPECT_TRUE(bit_equal(got, ref));
  // The eight-per-thread path (n a multiple of 8, aligned: 64 x 72 holds the specials too) and
  // a view starting one element in (unaligned: the per-element path).
  {
    Tensor x8 = randn({64, 72});
    for (size_t i = 0; i < std::size(specials); ++i) x8.f32()[i * 9] = specials[i];
    Tensor ref8 = Tensor::empty({64, 72}, DType::BF16), got8 = poisoned({64, 72}, DType::BF16);
    cpu().round_bf16(ref8, x8);
    gpu().round_bf16(got8, dev(x8));
    EXPECT_TRUE(bit_equal(got8, ref8));
    const Tensor flat = dev(x8).reshape({64 * 72}).slice(1, 64 * 72 - 7);
    Tensor got_view = poisoned({64 * 72 - 8}, DType::BF16);
    gpu().round_bf16(got_view, flat);
    EXPECT_TRUE(bit_equal(got_view, ref8.reshape({64 * 72}).slice(1, 64 * 72 - 7)));
  }
  EXPECT_TRUE(gpu().supports(Op::RoundBf16, DType::BF16));
  EXPECT_GE(gpu().unrounded_gemv_rows(), 1);
  EXPECT_LT(gpu().unrounded_gemv_rows(), M);

  const Tensor a = dev(randn({M, K})), b = dev(randn({N, K}));
  Tensor a16 = poisoned({M, K}, DType::BF16), b16 = poisoned({N, K}, DType::BF16);
  gpu().round_bf16(a16, a);
  gpu().round_bf16(b16, b);
  Tensor c_self = poisoned({M, N}), c_once = poisoned({M, N});
  gpu().set_precision(Precision::Bf16);
  gpu().matmul(c_self, a, b, false, true, 1.0f, 0.0f);
  gpu().matmul(c_once, a16, b, false, true, 1.0f, 0.0f);
  gpu().set_precision(Precision::Fp32);
  EXPECT_TRUE(bit_equal(c_once, c_self));
  expect_error_containing(
      [&] {
        Tensor wrong = poisoned({M, K});
        gpu().round_bf16(wrong, dev(x));
      },
      "round_bf16");
}

// The routed experts' weight gradients under bf16 activations: W.grad [N, K] += dy_e^T @ x_e, the
// expert's rows of BF16 [R, N] and [R, K] tensors (a block at an odd row offset, so the operand
// pointers are not 16-byte aligned), F32 c, beta 1, alpha 1 and 0.5. bf16 x bf16 products are
// exact in fp32 and cuBLAS accumulates in fp32, so the CPU GEMM of the same values is the oracle
// at kF32Tol. Also a BF16 x an F32 operand (rounded to bf16 first).
TEST_F(CudaBackendTest, MatmulBf16TransposedAccumulate) {
  const int64_t R = 50, N = 37, K = 45, r0 = 7, r1 = 38;
  const Tensor dy16 = randn({R, N}).to_dtype(DType::BF16),
               x16 = randn({R, K}).to_dtype(DType::BF16);
  const Tensor dy = dy16.to_f32(), x = x16.to_f32();
  for (float alpha : {1.0f, 0.5f}) {
    SCOPED_TRACE(testing::Message() << "alpha " << alpha);
    Tensor c = randn({N, K}), gc = dev(c), gc2 = dev(c);
    cpu().matmul(c, dy.slice(r0, r1), x.slice(r0, r1), true, false, alpha, 1.0f);
    gpu().matmul(gc, dev(dy16).slice(r0, r1), dev(x16).slice(r0, r1), true, false, alpha, 1.0f);
    EXPECT_CLOSE(gc, c, kF32Tol);
    // F32 x that holds bf16 values: rounding it is exact, so the same result.
    gpu().matmul(gc2, dev(dy16).slice(r0, r1), dev(x).slice(r0, r1), true, false, alpha, 1.0f);
    EXPECT_CLOSE(gc2, c, kF32Tol);
  }
}

// Few-row GEMMs against a weight (decoding: y = x W^T with 1..4 rows) take a GEMV kernel where
// bf16 is in play: BF16 weights are read as stored (widened exactly), F32 weights under the Bf16
// precision too (not rounded), activations stay fp32, so the CPU GEMM of the same values is the
// oracle at fp32 tolerance. K odd (the element-wise tail) and a multiple of 8 (16-byte loads);
// alpha, beta = 0 over NaN and beta = 1; 5 rows falls back to cuBLAS.
TEST_F(CudaBackendTest, FewRowMatmulGemvPath) {
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  // One row of a bf16 weight, K a multiple of 8 up to 4096: the kernel that loads its rows before
  // waiting (256, 2048: 8 chunks per lane; 3072, 4096: 16); 4100 and 5000 the others. F32
  // weights (the Bf16-precision runs) with K >= 1024 and one row: the split-K kernel (a block per
  // weight row); 1030 leaves the last warps a short slice and the rest none.
  for (int64_t K : {67, 256, 1030, 2048, 3072, 4096, 4100, 5000})
    for (int64_t M : {1, 2, 3, 4, 5})
      for (float beta : {0.0f, 1.0f}) {
        SCOPED_TRACE(testing::Message() << "K " << K << " M " << M << " beta " << beta);
        const int64_t N = 45;
        Tensor a = randn({M, K}), w = randn({N, K}), c = randn({M, N});
        Tensor ref = c.clone(), ref32 = c.clone();
        cpu().matmul(ref, a, rounded(w), false, true, 0.5f, beta);
        cpu().matmul(ref32, a, w, false, true, 0.5f, beta);
        Tensor g = beta == 0.0f ? poisoned({M, N}) : dev(c);
        gpu().matmul(g, dev(a), dev(w.to_dtype(DType::BF16)), false, true, 0.5f, beta);
        // 5 rows: cuBLAS with a rounded to bf16 too, the bound of the bf16 GEMM test above.
        EXPECT_CLOSE(g, ref, M <= 4 ? kF32Tol : std::ldexp(1.0, -7) * std::sqrt(double(K)));
        if (M > 4) continue;  // cuBLAS rounds a to bf16 there: covered by the matmul tests
        Tensor g32 = beta == 0.0f ? poisoned({M, N}) : dev(c);
        gpu().set_precision(Precision::Bf16);
        gpu().matmul(g32, dev(a), dev(w), false, true, 0.5f, beta);
        gpu().set_precision(Precision::Fp32);
        EXPECT_CLOSE(g32, ref32, kF32Tol);
      }
}

// 3000 elements take the kernels' eight-per-thread path, 2997 the per-element one (n % 8 != 0);
// both compute fma(alpha, x, y) and alpha * y per element, so they agree to the bit with each
// other on the same values.
TEST_F(CudaBackendTest, AddAndScale) {
  for (int64_t rows : {1000, 999}) {
    SCOPED_TRACE(testing::Message() << rows << " x 3");
    Tensor y = randn({rows, 3}), x = randn({rows, 3});
    Tensor dy = dev(y);
    cpu().add(y, x, -0.75f);
    gpu().add(dy, dev(x), -0.75f);
    cpu().scale(y, 1.5f);
    gpu().scale(dy, 1.5f);
    EXPECT_CLOSE(dy, y, kF32Tol);
  }
  // The two paths on the same 3000 values: the whole tensor (vector path) and its elements one
  // by one through an odd-sized view's per-element path (the first 2997 and the last 3).
  Tensor y = randn({1000, 3}), x = randn({1000, 3});
  Tensor whole = dev(y), parts = dev(y);
  const Tensor gx = dev(x);
  gpu().add(whole, gx, 0.3f);
  gpu().scale(whole, -1.25f);
  Tensor flat = parts.reshape({3000}), flat_x = gx.reshape({3000});
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 2997}, {2997, 3000}}) {
    Tensor part = flat.slice(b, e);
    gpu().add(part, flat_x.slice(b, e), 0.3f);
    gpu().scale(part, -1.25f);
  }
  EXPECT_TRUE(bit_equal(whole, parts));
}

TEST_F(CudaBackendTest, AdamWStepAndSumSquares) {
  // Odd sizes (not a multiple of 256 threads), moments already non-zero as after a few steps:
  // 301 x 67 takes the per-element path, 304 x 67 (a multiple of 8) the eight-per-thread one.
  AdamWStep s;
  s.step_size = 1e-3f / 0.271f;  // lr / (1 - 0.9^3)
  s.decay = 1e-4f;
  s.inv_bc2 = 1.0f / 0.142625f;  // 1 / (1 - 0.95^3)
  for (int64_t rows : {301, 304}) {
    SCOPED_TRACE(testing::Message() << rows << " x 67");
    Tensor w = randn({rows, 67}, 0.02f), m = randn({rows, 67}, 1e-3f);
    Tensor g = randn({rows, 67}, 1e-2f), v = randn({rows, 67}, 1e-3f);
    for (int64_t i = 0; i < v.numel(); ++i) v.f32()[i] = v.f32()[i] * v.f32()[i];
    Tensor wd = dev(w), md = dev(m), vd = dev(v), gd = dev(g);
    // The same update through the per-element path: views of 7 and 1 rows' worth of elements
    // (n % 8 != 0) over copies; both paths compute each element alike, so to the bit.
    Tensor w1 = dev(w).reshape({w.numel()}), m1 = dev(m).reshape({w.numel()});
    Tensor v1 = dev(v).reshape({w.numel()});
    const Tensor g1 = gd.reshape({w.numel()});
    for (auto [b, e] :
         {std::pair<int64_t, int64_t>{0, w.numel() - 1}, {w.numel() - 1, w.numel()}}) {
      Tensor wp = w1.slice(b, e), mp = m1.slice(b, e), vp = v1.slice(b, e);
      gpu().adamw_step(wp, mp, vp, g1.slice(b, e), s);
    }
    gpu().adamw_step(wd, md, vd, gd, s);
    cpu().adamw_step(w, m, v, g, s);
    EXPECT_CLOSE(wd, w, kF32Tol);
    EXPECT_CLOSE(md, m, kF32Tol);
    EXPECT_CLOSE(vd, v, kF32Tol);
    EXPECT_TRUE(bit_equal(wd.reshape({w.numel()}), w1) && bit_equal(md.reshape({w.numel()}), m1) &&
                bit_equal(vd.reshape({w.numel()}), v1));
  }

  for (int64_t n : {int64_t(0), int64_t(1), int64_t(255), int64_t(70001), int64_t(3000017)}) {
    Tensor x = randn({n});
    const double a = gpu().sum_squares(dev(x)), b = cpu().sum_squares(x);
    EXPECT_LE(std::abs(a - b), 1e-12 * std::max(b, 1.0)) << n;
    EXPECT_EQ(gpu().sum_squares(dev(x)), a) << "not deterministic at " << n;
  }
  size_t free_bytes = 0, total_bytes = 0;
  gpu().memory_info(free_bytes, total_bytes);
  EXPECT_GT(free_bytes, size_t(0));
  EXPECT_LE(free_bytes, total_bytes);
}

TEST_F(CudaBackendTest, EmbeddingForwardBackward) {
  const int64_t V = 50, C = 77, T = 301;  // T >> V: many repeated ids
  Tensor table = randn({V, C}), ids = randint({T}, 0, int32_t(V));
  Tensor out = Tensor::empty({T, C}), dout_g = poisoned({T, C});
  cpu().embedding_forward(out, table, ids);
  gpu().embedding_forward(dout_g, dev(table), dev(ids));
  EXPECT_CLOSE(dout_g, out, 0.0);
  Tensor dtable = randn({V, C}), g = randn({T, C});
  Tensor ddtable = dev(dtable);
  cpu().embedding_backward(dtable, g, ids);
  gpu().embedding_backward(ddtable, dev(g), dev(ids));
  EXPECT_CLOSE(ddtable, dtable, kF32Tol);
  // Deterministic: the same scatter twice gives the same bits.
  Tensor r1 = Tensor::zeros({V, C}, DType::F32, Device::CUDA), r2 = r1.clone();
  gpu().embedding_backward(r1, dev(g), dev(ids));
  gpu().embedding_backward(r2, dev(g), dev(ids));
  EXPECT_TRUE(bit_equal(r1, r2));
  Tensor bad = ids.clone();
  bad.i32()[17] = int32_t(V);
  // Index checks do not wait for the device: the error comes at the next read back.
  expect_index_error([&] { gpu().embedding_forward(dout_g, dev(table), dev(bad)); }, dout_g,
                     "embedding_forward: token id 50 at position 17 out of range [0, 50)");
  // The lookup checks its ids itself: a bad id reads row 0, and the first bad position is
  // reported even when a later one comes first in the launch's blocks (301 x 77 outputs: many
  // blocks; block 0 scans every id).
  Tensor fixed = ids.clone();
  fixed.i32()[17] = 0;
  cpu().embedding_forward(out, table, fixed);
  EXPECT_CLOSE(dout_g, out, 0.0);
  Tensor two = ids.clone();
  two.i32()[250] = -7;
  two.i32()[100] = int32_t(V) + 1;
  expect_index_error([&] { gpu().embedding_forward(dout_g, dev(table), dev(two)); }, dout_g,
                     "embedding_forward: token id 51 at position 100 out of range [0, 50)");
}

// A BF16 table (the frozen embedding of a bf16 model): each row is widened exactly, so the CPU
// lookup in the same table rounded to bf16 and held in fp32 is the oracle, bit for bit. C odd
// (rows start at odd 2-byte offsets), T >> V; out poisoned; the index check works as for F32.
TEST_F(CudaBackendTest, EmbeddingForwardBf16Table) {
  EXPECT_TRUE(gpu().supports(Op::Embedding, DType::BF16));
  EXPECT_FALSE(cpu().supports(Op::Embedding, DType::BF16));
  const int64_t V = 50, C = 77, T = 301;
  Tensor table = randn({V, C}), ids = randint({T}, 0, int32_t(V));
  ids.i32()[0] = 0;
  ids.i32()[1] = int32_t(V - 1);  // first and last rows
  const Tensor table16 = table.to_dtype(DType::BF16);
  Tensor ref = Tensor::empty({T, C}), out = poisoned({T, C});
  cpu().embedding_forward(ref, table16.to_f32(), ids);
  gpu().embedding_forward(out, dev(table16), dev(ids));
  EXPECT_CLOSE(out, ref, 0.0);
  EXPECT_TRUE(bit_equal(out, ref));
  // Rounding happened (the reference is not the fp32 table's lookup).
  Tensor ref32 = Tensor::empty({T, C});
  cpu().embedding_forward(ref32, table, ids);
  EXPECT_GT(rel_error(out, ref32), 0.0);
  Tensor bad = ids.clone();
  bad.i32()[17] = -1;
  expect_index_error([&] { gpu().embedding_forward(out, dev(table16), dev(bad)); }, out,
                     "embedding_forward: token id -1 at position 17 out of range [0, 50)");
  // Other table dtypes are refused by name.
  Tensor out2 = poisoned({T, C});
  expect_error_containing(
      [&] { gpu().embedding_forward(out2, dev(table.to_dtype(DType::F16)), dev(ids)); },
      "embedding_forward: tensor table is F16");
}

// The lookup's 8-wide row kernel (C a multiple of 8; the tests above take the one-element
// fallback, C = 77): F32 and BF16 tables against the CPU lookup of the same values, bit for bit.
// Of two bad ids the lower position is reported, though its row comes later in the launch.
TEST_F(CudaBackendTest, EmbeddingForwardVectorRows) {
  const int64_t V = 50, C = 96, T = 301;
  const Tensor table = randn({V, C}), ids = randint({T}, 0, int32_t(V));
  const Tensor table16 = table.to_dtype(DType::BF16);
  for (const Tensor* t : {&table, &table16}) {
    SCOPED_TRACE(dtype_name(t->dtype()));
    Tensor ref = Tensor::empty({T, C}), out = poisoned({T, C});
    cpu().embedding_forward(ref, t->to_f32(), ids);
    gpu().embedding_forward(out, dev(*t), dev(ids));
    EXPECT_TRUE(bit_equal(out, ref));
  }
  Tensor two = ids.clone();
  two.i32()[290] = -3;
  two.i32()[141] = int32_t(V) + 2;
  Tensor out = poisoned({T, C});
  expect_index_error([&] { gpu().embedding_forward(out, dev(table), dev(two)); }, out,
                     "embedding_forward: token id 52 at position 141 out of range [0, 50)");
}

TEST_F(CudaBackendTest, RmsNormForwardBackward) {
  for (auto [T, C] : {std::pair<int64_t, int64_t>{67, 300}, {150, 33}, {1, 7}}) {
    Tensor x = randn({T, C}), w = randn({C}, 0.3f);
    for (int64_t i = 0; i < C; ++i) w.f32()[i] += 1.0f;
    Tensor out = Tensor::empty({T, C}), rstd = Tensor::empty({T});
    Tensor dout = poisoned({T, C}), drstd = poisoned({T});
    cpu().rmsnorm_forward(out, rstd, x, w, 1e-6f);
    gpu().rmsnorm_forward(dout, drstd, dev(x), dev(w), 1e-6f);
    EXPECT_CLOSE(dout, out, kF32Tol);
    EXPECT_CLOSE(drstd, rstd, kF32Tol);
    Tensor g = randn({T, C}), dx = Tensor::empty({T, C}), dw = randn({C});
    Tensor ddx = poisoned({T, C}), ddw = dev(dw);
    cpu().rmsnorm_backward(dx, nullptr, &dw, g, x, w, rstd, false);
    gpu().rmsnorm_backward(ddx, nullptr, &ddw, dev(g), dev(x), dev(w), dev(rstd), false);
    EXPECT_CLOSE(ddx, dx, kF32Tol);
    EXPECT_CLOSE(ddw, dw, kF32Tol);
    gpu().rmsnorm_backward(ddx, nullptr, nullptr, dev(g), dev(x), dev(w), dev(rstd),
                           false);  // frozen weight
    EXPECT_CLOSE(ddx, dx, kF32Tol);
  }
}

// The forward's kernels by row length: the row held in registers, 16-byte loads (length a
// multiple of 4 on an aligned row: V2-Lite's 2048 and its latent's 512, one warp; a block whose
// last warp is partial; 16384, the register path's largest) or single floats (odd lengths, or a
// row 4 bytes off alignment), and the general loop beyond the registers' reach (16400, and 4097
// floats). The same fp32 tolerance as above; two runs give the same bits. A BF16 out (a norm read
// only by bf16 GEMMs writes its output rounded) is, on every path, the F32 out of the same op
// rounded to nearest even, bit for bit (the same fp32 arithmetic, rounded at the store), with the
// same rstd; the F32 out is checked against the CPU, so the equality is not of two wrong values.
TEST_F(CudaBackendTest, RmsNormForwardRowKernels) {
  EXPECT_TRUE(gpu().supports(Op::RmsNorm, DType::BF16));
  for (auto [T, C] : {std::pair<int64_t, int64_t>{67, 300},
                      {150, 33},
                      {1, 2048},
                      {1, 512},
                      {3, 2048},
                      {4, 2052},
                      {5, 1001},
                      {2, 16384},
                      {2, 16400},
                      {3, 4097},
                      {2, 36}}) {
    SCOPED_TRACE(testing::Message() << "T " << T << " C " << C);
    Tensor x = randn({T, C}), w = randn({C}, 0.3f);
    for (int64_t i = 0; i < C; ++i) w.f32()[i] += 1.0f;
    Tensor out = Tensor::empty({T, C}), rstd = Tensor::empty({T});
    cpu().rmsnorm_forward(out, rstd, x, w, 1e-6f);
    const Tensor dx = dev(x), dw = dev(w);
    Tensor dout = poisoned({T, C}), drstd = poisoned({T});
    gpu().rmsnorm_forward(dout, drstd, dx, dw, 1e-6f);
    EXPECT_CLOSE(dout, out, kF32Tol);
    EXPECT_CLOSE(drstd, rstd, kF32Tol);
    Tensor again = poisoned({T, C}), rstd2 = poisoned({T});
    gpu().rmsnorm_forward(again, rstd2, dx, dw, 1e-6f);
    EXPECT_TRUE(bit_equal(again, dout) && bit_equal(rstd2, drstd)) << "not deterministic";
    Tensor o16 = poisoned({T, C}, DType::BF16), r16 = poisoned({T}),
           rounded = poisoned({T, C}, DType::BF16);
    gpu().rmsnorm_forward(o16, r16, dx, dw, 1e-6f);
    gpu().round_bf16(rounded, dout);
    EXPECT_TRUE(bit_equal(o16, rounded)) << "bf16 out is not the f32 out rounded";
    EXPECT_TRUE(bit_equal(o16, dout.to_host().to_dtype(DType::BF16))) << "vs the host rounding";
    EXPECT_TRUE(bit_equal(r16, drstd)) << "rstd with a bf16 out";
    // x, w and out one float past a 16-byte boundary (views into larger buffers).
    auto shifted = [](const Tensor& t) {
      Tensor flat = Tensor::zeros({t.numel() + 1}, DType::F32, Device::CUDA);
      Tensor v = flat.slice(1, t.numel() + 1).reshape(t.shape());
      v.copy_from(t);
      return v;
    };
    Tensor sout = shifted(poisoned({T, C})), srstd = poisoned({T});
    gpu().rmsnorm_forward(sout, srstd, shifted(dx), shifted(dw), 1e-6f);
    EXPECT_CLOSE(sout, out, kF32Tol);
    EXPECT_CLOSE(srstd, rstd, kF32Tol);
  }
}

// rmsnorm_backward's accumulate mode and its dx_bf16 copy. accumulate: dx += the gradient, against
// the CPU op's accumulate (fp32 tolerance) and bit-identical to what it replaces on the GPU (the
// plain op into a temporary, then add); dw accumulates as in the plain mode. dx_bf16: the final dx
// (plain or accumulated) rounded to nearest even, bit for bit, with dx itself unchanged by asking
// for the copy. A dx_bf16 that is not BF16 is refused by name.
TEST_F(CudaBackendTest, RmsNormBackwardAccumulateAndBf16Copy) {
  for (auto [T, C] : {std::pair<int64_t, int64_t>{67, 300}, {150, 33}, {1, 7}, {4, 2048}}) {
    SCOPED_TRACE(testing::Message() << "T " << T << " C " << C);
    Tensor x = randn({T, C}), w = randn({C}, 0.3f), g = randn({T, C}), old = randn({T, C});
    for (int64_t i = 0; i < C; ++i) w.f32()[i] += 1.0f;
    Tensor out = Tensor::empty({T, C}), rstd = Tensor::empty({T});
    cpu().rmsnorm_forward(out, rstd, x, w, 1e-6f);
    const Tensor gx = dev(x), gw = dev(w), gg = dev(g), grstd = dev(rstd);

    Tensor dx = old.clone(), dw = randn({C});
    Tensor ddx = dev(old), ddw = dev(dw);
    cpu().rmsnorm_backward(dx, nullptr, &dw, g, x, w, rstd, true);
    gpu().rmsnorm_backward(ddx, nullptr, &ddw, gg, gx, gw, grstd, true);
    EXPECT_CLOSE(ddx, dx, kF32Tol);
    EXPECT_CLOSE(ddw, dw, kF32Tol);
    // The passes it replaces: the plain op into a temporary, then y += tmp.
    Tensor tmp = poisoned({T, C}), two_pass = dev(old);
    gpu().rmsnorm_backward(tmp, nullptr, nullptr, gg, gx, gw, grstd, false);
    gpu().add(two_pass, tmp, 1.0f);
    EXPECT_TRUE(bit_equal(ddx, two_pass)) << "accumulate differs from plain + add";

    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(accumulate ? "accumulate" : "assign");
      Tensor d32 = accumulate ? dev(old) : poisoned({T, C});
      Tensor d16 = poisoned({T, C}, DType::BF16);
      gpu().rmsnorm_backward(d32, &d16, nullptr, gg, gx, gw, grstd, accumulate);
      EXPECT_TRUE(bit_equal(d32, accumulate ? ddx : tmp)) << "dx changed by the copy";
      Tensor rounded = poisoned({T, C}, DType::BF16);
      gpu().round_bf16(rounded, d32);
      EXPECT_TRUE(bit_equal(d16, rounded)) << "dx_bf16 is not dx rounded";
    }
  }
  Tensor x = dev(randn({3, 8})), w = dev(randn({8})), rstd = dev(randn({3}));
  Tensor dx = poisoned({3, 8}), not_bf16 = poisoned({3, 8});
  expect_error_containing(
      [&] { gpu().rmsnorm_backward(dx, &not_bf16, nullptr, x, x, w, rstd, false); },
      "rmsnorm_backward: tensor dx_bf16 is F32");
}

// {123, 45}: the kernels' one-element path; {96, 40}: their 8-wide path (16-byte accesses).
TEST_F(CudaBackendTest, SwiGluForwardBackward) {
  for (const Shape& s : {Shape{123, 45}, Shape{96, 40}}) {
    SCOPED_TRACE(s.str());
    Tensor gate = randn(s, 2.0f), up = randn(s), dh = randn(s);
    Tensor h = Tensor::empty(s), dgate = Tensor::empty(s), dup = Tensor::empty(s);
    Tensor gh = poisoned(s), gdgate = poisoned(s), gdup = poisoned(s);
    cpu().swiglu_forward(h, gate, up);
    gpu().swiglu_forward(gh, dev(gate), dev(up));
    EXPECT_CLOSE(gh, h, kF32Tol);
    cpu().swiglu_backward(dgate, dup, dh, gate, up);
    gpu().swiglu_backward(gdgate, gdup, dev(dh), dev(gate), dev(up));
    EXPECT_CLOSE(gdgate, dgate, kF32Tol);
    EXPECT_CLOSE(gdup, dup, kF32Tol);
  }
}

// SwiGLU on bf16 activations (the MoE layer's path). Inputs hold bf16 values (exact in fp32), the
// math is fp32 on both sides (expf vs std::exp: a few ulps, within kF32Tol), and a BF16 output is
// rounded once, <= 2^-8 of the element: kF32Tol + 2^-8 against the CPU op's fp32 output on the
// same values. Forward all BF16; backward every combination of the gate/up, dh and dgate/dup
// dtypes (each F32 or BF16), outputs poisoned. A forward mixing dtypes is refused, naming the op.
// Both shapes as above (one-element and 8-wide paths).
TEST_F(CudaBackendTest, SwiGluBf16Activations) {
  for (const Shape& s : {Shape{123, 45}, Shape{96, 40}}) {
    SCOPED_TRACE(s.str());
    auto as = [](const Tensor& t, DType d) {
      return d == DType::BF16 ? t.to_dtype(DType::BF16) : t;
    };
    // bf16 values, so each tensor means the same in either dtype.
    const Tensor gate = randn(s, 2.0f).to_dtype(DType::BF16).to_f32();
    const Tensor up = randn(s).to_dtype(DType::BF16).to_f32();
    const Tensor dh = randn(s).to_dtype(DType::BF16).to_f32();
    const double bf16_out = std::ldexp(1.0, -8);
    Tensor h = Tensor::empty(s), gh = poisoned(s, DType::BF16);
    cpu().swiglu_forward(h, gate, up);
    gpu().swiglu_forward(gh, dev(as(gate, DType::BF16)), dev(as(up, DType::BF16)));
    EXPECT_CLOSE(gh, h, kF32Tol + bf16_out);
    Tensor dgate = Tensor::empty(s), dup = Tensor::empty(s);
    cpu().swiglu_backward(dgate, dup, dh, gate, up);
    for (DType in : {DType::F32, DType::BF16})
      for (DType dd : {DType::F32, DType::BF16})
        for (DType out : {DType::F32, DType::BF16}) {
          SCOPED_TRACE(testing::Message() << "gate/up " << dtype_name(in) << " dh "
                                          << dtype_name(dd) << " dgate/dup " << dtype_name(out));
          Tensor gdgate = poisoned(s, out), gdup = poisoned(s, out);
          gpu().swiglu_backward(gdgate, gdup, dev(as(dh, dd)), dev(as(gate, in)), dev(as(up, in)));
          const double tol = kF32Tol + (out == DType::BF16 ? bf16_out : 0.0);
          EXPECT_CLOSE(gdgate, dgate, tol);
          EXPECT_CLOSE(gdup, dup, tol);
        }
    // F32 gate and up with a BF16 h (a dense MLP under Bf16): the F32 result rounded once, to the
    // bit (what the down GEMM would have rounded it to).
    {
      const Tensor g32 = dev(randn(s, 2.0f)), u32 = dev(randn(s));
      Tensor h32 = poisoned(s), h16 = poisoned(s, DType::BF16), r16 = poisoned(s, DType::BF16);
      gpu().swiglu_forward(h32, g32, u32);
      gpu().swiglu_forward(h16, g32, u32);
      gpu().round_bf16(r16, h32);
      EXPECT_TRUE(bit_equal(h16, r16)) << "F32 in, BF16 h";
    }
    expect_error_containing([&] { gpu().swiglu_forward(gh, dev(gate), dev(as(up, DType::BF16))); },
                            "swiglu_forward");
  }
}

// The model's own RoPE table (theta 10000, no scaling): cos and sin [max_pos, rope_dim / 2].
RopeTable rope_table(int64_t max_pos, int64_t rope_dim) {
  ModelConfig c;
  c.qk_rope_head_dim = rope_dim;
  return RopeTable::build(c, max_pos, Device::CPU);
}

// In place (F32), against the CPU op within fp32 tolerance. Layouts: the 8-wide row kernel (stride,
// offset and rope_dim multiples of 8; MLA's q at 301 tokens: several row batches and blocks), and
// the pair-at-a-time fallback (odd stride and offset).
TEST_F(CudaBackendTest, RopeForwardAndInverse) {
  struct Layout {
    int64_t T, heads, stride, offset, rope_dim;
  };
  const int64_t max_pos = 64;
  for (const Layout& l :
       {Layout{29, 3, 40, 24, 16}, Layout{301, 2, 192, 128, 64}, Layout{301, 5, 37, 5, 12}}) {
    SCOPED_TRACE(testing::Message() << "T " << l.T << " heads " << l.heads << " stride " << l.stride
                                    << " offset " << l.offset << " rope_dim " << l.rope_dim);
    const RopeTable tab = rope_table(max_pos, l.rope_dim);
    const Tensor &cos = tab.cos, &sin = tab.sin;
    const Tensor pos = randint({l.T}, 0, int32_t(max_pos));
    for (bool inverse : {false, true}) {
      Tensor x = randn({l.T, l.heads, l.stride}), dx = dev(x);
      cpu().rope(x, x, l.heads, l.stride, l.offset, l.rope_dim, cos, sin, pos, inverse);
      gpu().rope(dx, dx, l.heads, l.stride, l.offset, l.rope_dim, dev(cos), dev(sin), dev(pos),
                 inverse);
      EXPECT_CLOSE(dx, x, kF32Tol);
    }
  }
  const int64_t T = 29, H = 3, stride = 40, offset = 24, rope_dim = 16;
  const RopeTable tab = rope_table(max_pos, rope_dim);
  const Tensor &cos = tab.cos, &sin = tab.sin;
  Tensor pos = randint({T}, 0, int32_t(max_pos));
  Tensor bad = pos.clone();
  bad.i32()[3] = int32_t(max_pos);
  Tensor x = randn({T, H, stride}), dx = dev(x);
  expect_index_error(
      [&] { gpu().rope(dx, dx, H, stride, offset, rope_dim, dev(cos), dev(sin), dev(bad), false); },
      dx, "rope: position 64 at position 3 out of range [0, 64)");
  // The kernel checks the positions itself: a bad one rotates by position 0.
  Tensor fixed = pos.clone();
  fixed.i32()[3] = 0;
  cpu().rope(x, x, H, stride, offset, rope_dim, cos, sin, fixed, false);
  EXPECT_CLOSE(dx, x, kF32Tol);
}

// RoPE into a separate output (MLA's q under the bf16 attention, dq for q_b_proj's bf16 GEMMs):
// F32 out equals the GPU's own in-place rotation and BF16 out that rotation rounded by round_bf16,
// both to the bit (the one kernel computes a pair by one expression for either output; the model's
// bf16 gradients are compared bit for bit with the path that rotates in place and rounds after,
// tests/model/test_gpu_bf16_inputs.cpp). x is not written. Against the CPU op: within fp32
// tolerance in place (the GPU may fuse a product and a sum), and the BF16 out within that plus a
// bf16 rounding (<= 2^-8 of an element); the elements outside the rope dims are copies, rounded
// alike on both sides, so there the BF16 outs agree to the bit. Layouts: q's (nope dims, then the
// pairs; MLA's q of V2-Lite, the 8-wide row kernel), odd sizes with elements on both sides of the
// pairs (the pair-at-a-time fallback), k_rope's (one head of pairs), and a stride that is a
// multiple of 8 around rope dims that are not (rope_dim 12: the fallback). 301 tokens: several
// row batches and blocks. A bad position is reported as in place.
TEST_F(CudaBackendTest, RopeIntoSeparateOutputF32AndBf16) {
  EXPECT_TRUE(gpu().supports(Op::Rope, DType::BF16));
  const int64_t T = 301, max_pos = 64;
  struct Layout {
    int64_t heads, stride, offset, rope_dim;
  };
  for (const Layout& l : {Layout{3, 40, 24, 16}, Layout{2, 192, 128, 64}, Layout{5, 37, 5, 12},
                          Layout{1, 16, 0, 16}, Layout{2, 24, 8, 12}}) {
    const RopeTable tab = rope_table(max_pos, l.rope_dim);
    const Tensor &cos = tab.cos, &sin = tab.sin;
    const Tensor pos = randint({T}, 0, int32_t(max_pos));
    const Tensor dcos = dev(cos), dsin = dev(sin), dpos = dev(pos);
    for (bool inverse : {false, true}) {
      SCOPED_TRACE(testing::Message()
                   << "heads " << l.heads << " stride " << l.stride << " offset " << l.offset
                   << " rope_dim " << l.rope_dim << " inverse " << inverse);
      const Shape s{T, l.heads * l.stride};
      const Tensor x = randn(s, 3.0f), dx = dev(x);
      auto gpu_rope = [&](Tensor& out, const Tensor& in) {
        gpu().rope(out, in, l.heads, l.stride, l.offset, l.rope_dim, dcos, dsin, dpos, inverse);
      };
      Tensor ref = x.clone(), ref16 = Tensor::empty(s, DType::BF16);
      cpu().rope(ref, ref, l.heads, l.stride, l.offset, l.rope_dim, cos, sin, pos, inverse);
      cpu().rope(ref16, x, l.heads, l.stride, l.offset, l.rope_dim, cos, sin, pos, inverse);

      Tensor in_place = dx.clone();
      gpu_rope(in_place, in_place);
      Tensor rounded = poisoned(s, DType::BF16);
      gpu().round_bf16(rounded, in_place);
      Tensor f32 = poisoned(s), bf16 = poisoned(s, DType::BF16);
      gpu_rope(f32, dx);
      gpu_rope(bf16, dx);
      EXPECT_TRUE(bit_equal(f32, in_place)) << "F32 out vs in place";
      EXPECT_TRUE(bit_equal(bf16, rounded)) << "BF16 out vs in place + round_bf16";
      EXPECT_TRUE(bit_equal(dx, x)) << "x written";
      EXPECT_CLOSE(in_place, ref, kF32Tol);
      EXPECT_CLOSE(bf16, ref, kF32Tol + std::ldexp(1.0, -8));
      const Tensor got16 = bf16.to_host();
      const auto *g = static_cast<const uint16_t*>(got16.raw()),
                 *r = static_cast<const uint16_t*>(ref16.raw());
      int64_t bad_copies = 0;
      for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % l.stride;
        bad_copies += (c < l.offset || c >= l.offset + l.rope_dim) && g[i] != r[i];
      }
      EXPECT_EQ(bad_copies, 0) << "elements outside the rope dims";
    }
    Tensor bad = pos.clone();
    bad.i32()[3] = int32_t(max_pos);
    Tensor out = poisoned({T, l.heads * l.stride}, DType::BF16);
    expect_index_error(
        [&] {
          gpu().rope(out, dev(randn({T, l.heads * l.stride})), l.heads, l.stride, l.offset,
                     l.rope_dim, dcos, dsin, dev(bad), false);
        },
        out, "rope: position 64 at position 3 out of range [0, 64)");
  }
  Tensor x = dev(randn({T, 8})), small = poisoned({T, 7}, DType::BF16);
  const RopeTable tab = rope_table(max_pos, 4);
  const Tensor dcos = dev(tab.cos), dsin = dev(tab.sin), dpos = dev(randint({T}, 0, 4));
  expect_error_containing([&] { gpu().rope(small, x, 2, 4, 0, 4, dcos, dsin, dpos, false); },
                          "rope: x [301, 8]");
}

// Sets a backend's precision for a scope and restores Fp32 after it, even when an op throws.
struct PrecisionScope {
  Backend& b;
  PrecisionScope(Backend& backend, Precision p) : b(backend) { b.set_precision(p); }
  ~PrecisionScope() { b.set_precision(Precision::Fp32); }
};

struct AttnCase {
  int64_t batch, seq, heads, dqk, dv;
};

std::ostream& operator<<(std::ostream& os, const AttnCase& c) {
  return os << "batch " << c.batch << " seq " << c.seq << " heads " << c.heads << " dqk " << c.dqk
            << " dv " << c.dv;
}

// What an attention test draws: q, k, v always; dO too where the test runs a backward. bf16:
// each rounded to bf16 (held in F32), the inputs of the Bf16 precision's checks.
struct AttnDraw {
  bool bf16 = false, dout = false;
};

// An attention case's inputs on both sides and its softmax scale, 1/sqrt(dqk). They are drawn in
// one order, q, k, v, then dO: the tolerances were measured on these draws, and a test that skips
// dO leaves the generator where the next case expects it.
struct AttnInputs {
  float scale = 0;
  Tensor q, k, v, dout;      // host, F32 [T, heads, dqk or dv]; dout undefined unless drawn
  Tensor gq, gk, gv, gdout;  // their device copies
};

AttnInputs CudaBackendTest::attn_inputs(const AttnCase& c, AttnDraw draw) {
  auto next = [&](int64_t d) {
    const Tensor t = randn({c.batch * c.seq, c.heads, d});
    return draw.bf16 ? t.to_dtype(DType::BF16).to_f32() : t;
  };
  AttnInputs in;
  in.scale = 1.0f / std::sqrt(float(c.dqk));
  in.q = next(c.dqk);
  in.k = next(c.dqk);
  in.v = next(c.dv);
  if (draw.dout) in.dout = next(c.dv);
  in.gq = dev(in.q);
  in.gk = dev(in.k);
  in.gv = dev(in.v);
  if (draw.dout) in.gdout = dev(in.dout);
  return in;
}

// The CPU reference of an attention case: the forward (out, lse) on its inputs and, where dO was
// drawn, the backward (dq, dk, dv) and dv_bound, the dv of |dO| (it bounds dv's error from
// rounding P elementwise).
struct AttnReference {
  Tensor out, lse, dq, dk, dv, dv_bound;
};
AttnReference attention_reference(Backend& cpu, const AttnCase& c, const AttnInputs& in) {
  const int64_t T = c.batch * c.seq;
  AttnReference r;
  r.out = Tensor::empty({T, c.heads, c.dv});
  r.lse = Tensor::empty({c.batch, c.heads, c.seq});
  cpu.attention_forward(r.out, r.lse, in.q, in.k, in.v, c.batch, c.seq, c.heads, in.scale);
  if (!in.dout.defined()) return r;
  r.dq = Tensor::empty(in.q.shape());
  r.dk = Tensor::empty(in.k.shape());
  r.dv = Tensor::empty(in.v.shape());
  cpu.attention_backward(r.dq, r.dk, r.dv, in.dout, r.out, r.lse, in.q, in.k, in.v, c.batch, c.seq,
                         c.heads, in.scale);
  Tensor abs_dout = in.dout.clone(), scratch_q = Tensor::empty(in.q.shape()),
         scratch_k = Tensor::empty(in.k.shape());
  for (int64_t i = 0; i < abs_dout.numel(); ++i) abs_dout.f32()[i] = std::abs(abs_dout.f32()[i]);
  r.dv_bound = Tensor::empty(in.v.shape());
  cpu.attention_backward(scratch_q, scratch_k, r.dv_bound, abs_dout, r.out, r.lse, in.q, in.k, in.v,
                         c.batch, c.seq, c.heads, in.scale);
  return r;
}

// Sets an environment variable for a scope (MOEKIT_CUDA_FLASH, read per call), then restores it.
struct EnvScope {
  std::string name, old;
  bool had = false;
  EnvScope(const char* n, const char* value) : name(n) {
    if (const char* o = std::getenv(n)) {
      had = true;
      old = o;
    }
    setenv(n, value, 1);
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

// The flash kernels' tiling variants (MOEKIT_FLASH_FWD_VARIANT / MOEKIT_FLASH_BWD_VARIANT, see
// the headers of ops/cuda/cuda_flash_attention.cu and _bwd.cu; an id out of range runs the
// default). Forward variants 5-7 are the Hopper (wgmma) kernel in its three tilings (see
// cuda_flash_attention_hopper.cu), backward variants 5-7 the Hopper kernels in their three (see
// cuda_flash_attention_hopper_bwd.cu), where the build and the device have them (else variant 1).
constexpr int kFlashFwdVariants = 8, kFlashBwdVariants = 8;

#if defined(MOEKIT_HAVE_CUDA)
// The switch itself (cuda::flash_variant, host code: no GPU needed, so no fixture): an id in
// range is taken, an integer out of range or an empty value runs the default, and a value that is
// not an integer is an error naming the variable and the value.
TEST(CudaFlashVariant, IntegersSelectOrFallBackOtherValuesAreErrors) {
  const char* name = "MOEKIT_FLASH_FWD_VARIANT";
  auto variant = [&](const char* value) {
    EnvScope env(name, value);
    return cuda::flash_variant(name, 5, 1);
  };
  EXPECT_EQ(variant("3"), 3);
  EXPECT_EQ(variant("0"), 0);
  EXPECT_EQ(variant("5"), 1);
  EXPECT_EQ(variant("-1"), 1);
  EXPECT_EQ(variant(""), 1);
  for (const char* value : {"abc", "2x", "1.5", " ", "3 "})
    expect_error_containing(
        [&] { (void)variant(value); },
        fmt::format("{} must be an integer (a flash-attention kernel variant), got \"{}\"", name,
                    value));
}
#endif

TEST_F(CudaBackendTest, CausalAttentionForwardBackward) {
  // Odd sequence lengths (partial tiles), one token, and an MLA shape (q/k 192, v 128).
  for (const AttnCase& c : {AttnCase{2, 45, 3, 24, 16}, AttnCase{1, 1, 2, 8, 8},
                            AttnCase{1, 100, 2, 192, 128}, AttnCase{3, 33, 1, 5, 7}}) {
    SCOPED_TRACE(testing::Message() << c);
    const AttnInputs in = attn_inputs(c, {.dout = true});
    const AttnReference ref = attention_reference(cpu(), c, in);
    Tensor gout = poisoned(ref.out.shape()), glse = poisoned(ref.lse.shape());
    gpu().attention_forward(gout, glse, in.gq, in.gk, in.gv, c.batch, c.seq, c.heads, in.scale);
    EXPECT_CLOSE(gout, ref.out, kF32Tol);
    EXPECT_CLOSE(glse, ref.lse, kF32Tol);
    Tensor gdq = poisoned(in.q.shape()), gdk = poisoned(in.k.shape()), gdv = poisoned(in.v.shape());
    gpu().attention_backward(gdq, gdk, gdv, in.gdout, gout, glse, in.gq, in.gk, in.gv, c.batch,
                             c.seq, c.heads, in.scale);
    if (c.seq == 1) {  // dq = dk = 0 exactly: compare absolute noise
      EXPECT_LE(max_abs(gdq), 1e-5);
      EXPECT_LE(max_abs(gdk), 1e-5);
    } else {
      EXPECT_CLOSE(gdq, ref.dq, kF32Tol);
      EXPECT_CLOSE(gdk, ref.dk, kF32Tol);
    }
    EXPECT_CLOSE(gdv, ref.dv, kF32Tol);
  }
}

// Attention under Precision::Bf16 (ops/cuda/cuda_attention_tc.cpp): q, k, v and dO are rounded
// to bf16, P (and dS in backward) are rounded to bf16 before the GEMMs they feed; scores,
// softmax, lse and every accumulation stay fp32. The oracle is the CPU op on the same
// bf16-rounded q, k, v, dO, and backward gets the oracle's out and lse too, so each check sees only
// the roundings inside the op. A rounding to bf16 (8 significant bits, to nearest) has relative
// error <= u = 2^-8.
// - out_i = sum_j p_ij v_j with each p_ij off by <= u p_ij: |error| <= u sum_j p_ij |v_j| <=
//   u max|v| (a row of P sums to 1), so normwise tol = u max|v| / max|out|.
// - lse: fp32 scores of the same inputs (bf16 x bf16 products are exact in fp32): kF32Tol.
// - dv = P^T dO with P rounded: |error| <= u (P^T |dO|) elementwise, and P^T |dO| is the CPU op's
//   dv for dout = |dO|: tol = u max(P^T |dO|) / max|dv|.
// - dq = dS K, dk = dS^T Q with each dS_ij off by <= u of itself: over `seq` terms of random sign
//   the error grows like sqrt(seq) terms while the result stays at least about one term (the
//   argument of the bf16 GEMM tolerance above), so tol = u sqrt(seq).
// Each tolerance adds the fp32 term (kF32Tol, scaled like the bf16 one): the GPU's fp32 scores
// sum in another order. A wrong mask, chunk or head offset shows up as O(1).
// Shapes: partial row chunks (the path splits queries into 256-row chunks: 300 and 600 tokens
// give 2 and 3 chunks), one token, batch > 1, Dqk != Dv (MLA 192/128), odd head dims.
TEST_F(CudaBackendTest, CausalAttentionBf16Precision) {
  const double u = std::ldexp(1.0, -8);
  for (const AttnCase& c :
       {AttnCase{2, 45, 3, 24, 16}, AttnCase{1, 1, 2, 8, 8}, AttnCase{1, 100, 2, 192, 128},
        AttnCase{3, 33, 1, 5, 7}, AttnCase{2, 300, 2, 64, 48}, AttnCase{1, 600, 3, 192, 128}}) {
    SCOPED_TRACE(testing::Message() << c);
    const AttnInputs in = attn_inputs(c, {.bf16 = true, .dout = true});
    const AttnReference ref = attention_reference(cpu(), c, in);
    // Through the flash kernels (forward and backward, variant `mode` of each) where they take
    // the shape, then (mode = the variant count) through the GEMM path.
    const int modes = std::max(kFlashFwdVariants, kFlashBwdVariants);
    for (int mode = 0; mode <= modes; ++mode) {
      const bool flash = mode < modes;
      const std::string id = std::to_string(flash ? mode : 0);
      SCOPED_TRACE(testing::Message() << "MOEKIT_CUDA_FLASH=" << flash << " variant " << id);
      EnvScope env("MOEKIT_CUDA_FLASH", flash ? "1" : "0"), opt_in("MOEKIT_CUDA_FLASH_BWD", "1");
      EnvScope fv("MOEKIT_FLASH_FWD_VARIANT", id.c_str()),
          bv("MOEKIT_FLASH_BWD_VARIANT", id.c_str());
      Tensor gout = poisoned(ref.out.shape()), glse = poisoned(ref.lse.shape());
      Tensor gdq = poisoned(in.q.shape()), gdk = poisoned(in.k.shape()),
             gdv = poisoned(in.v.shape());
      {
        PrecisionScope bf16(gpu(), Precision::Bf16);
        gpu().attention_forward(gout, glse, in.gq, in.gk, in.gv, c.batch, c.seq, c.heads, in.scale);
        gpu().attention_backward(gdq, gdk, gdv, in.gdout, dev(ref.out), dev(ref.lse), in.gq, in.gk,
                                 in.gv, c.batch, c.seq, c.heads, in.scale);
      }

      EXPECT_CLOSE(gout, ref.out, (u + kF32Tol) * max_abs(in.v) / max_abs(ref.out));
      EXPECT_CLOSE(glse, ref.lse, kF32Tol);
      EXPECT_CLOSE(gdv, ref.dv, (u + kF32Tol) * max_abs(ref.dv_bound) / max_abs(ref.dv));
      if (c.seq == 1) {  // dq = dk = 0 exactly: compare absolute noise
        EXPECT_LE(max_abs(gdq), 1e-5);
        EXPECT_LE(max_abs(gdk), 1e-5);
      } else {
        const double tol = (u + kF32Tol) * std::sqrt(double(c.seq));
        EXPECT_CLOSE(gdq, ref.dq, tol);
        EXPECT_CLOSE(gdk, ref.dk, tol);
      }
    }
  }
  EXPECT_EQ(gpu().precision(), Precision::Fp32);
}

// The fused flash-attention forward (ops/cuda/cuda_flash_attention.cu, the Bf16 forward wherever
// dqk and dv are multiples of 16 up to 256) against the CPU op on the same bf16-rounded q, k, v,
// against the cuBLAS path (MOEKIT_CUDA_FLASH=0), and against itself (bit-identical reruns), each
// tiling variant (MOEKIT_FLASH_FWD_VARIANT) alike. Tolerances, as in CausalAttentionBf16Precision:
// the only rounding inside the op is P to bf16 before P V (relative error <= u = 2^-8 per entry;
// the kernel rounds exp(s - running max) rather than the normalised P, the same relative bound), so
// |out error| <= u sum_j p_ij |v_j| <= u max|v|: normwise tol (u + kF32Tol) max|v| / max|out|. lse
// comes from fp32 scores of exact bf16 products: kF32Tol. The two GPU paths are each within those
// bounds of the CPU, so within twice them of each other. A wrong fragment index, mask or tile
// offset shows up as O(1). Shapes: DeepSeek-V2 (192/128, 16 heads, seq 2048, batch 2), a sequence
// not a multiple of the 64-row tile (300), one token, 64/64 (the small instance), 256/256 (two
// v-column chunks), 96/160 (a partial second chunk, K tile wider than dqk), 16/32.
TEST_F(CudaBackendTest, FlashAttentionForwardBf16) {
  const double u = std::ldexp(1.0, -8);
  for (const AttnCase& c :
       {AttnCase{2, 2048, 16, 192, 128}, AttnCase{1, 300, 3, 192, 128}, AttnCase{2, 1, 4, 192, 128},
        AttnCase{2, 300, 2, 64, 64}, AttnCase{1, 130, 2, 256, 256}, AttnCase{2, 200, 2, 96, 160},
        AttnCase{1, 77, 2, 16, 32}}) {
    SCOPED_TRACE(testing::Message() << c);
    const AttnInputs in = attn_inputs(c, {.bf16 = true});
    const AttnReference ref = attention_reference(cpu(), c, in);
    auto run = [&](const char* flash, int variant, Tensor& o, Tensor& l) {
      EnvScope env("MOEKIT_CUDA_FLASH", flash);
      EnvScope fv("MOEKIT_FLASH_FWD_VARIANT", std::to_string(variant).c_str());
      PrecisionScope bf16(gpu(), Precision::Bf16);
      gpu().attention_forward(o, l, in.gq, in.gk, in.gv, c.batch, c.seq, c.heads, in.scale);
    };
    Tensor gout = poisoned(ref.out.shape()), glse = poisoned(ref.lse.shape());
    run("0", 0, gout, glse);
    const double out_tol = (u + kF32Tol) * max_abs(in.v) / max_abs(ref.out);
    Tensor variant1_out;  // to tell the Hopper kernel's result from variant 1's
    for (int variant = 0; variant < kFlashFwdVariants; ++variant) {
      SCOPED_TRACE(testing::Message() << "MOEKIT_FLASH_FWD_VARIANT=" << variant);
      Tensor fout = poisoned(ref.out.shape()), flse = poisoned(ref.lse.shape());
      Tensor fout2 = poisoned(ref.out.shape()), flse2 = poisoned(ref.lse.shape());
      run("1", variant, fout, flse);
      run("1", variant, fout2, flse2);
      EXPECT_CLOSE(fout, ref.out, out_tol);
      EXPECT_CLOSE(flse, ref.lse, kF32Tol);
      EXPECT_CLOSE(fout, gout.to_host(), 2 * out_tol);
      EXPECT_CLOSE(flse, glse.to_host(), 2 * kF32Tol);
      EXPECT_TRUE(bit_equal(fout, fout2) && bit_equal(flse, flse2)) << "flash rerun differs";
      // The paths round different P (unnormalised vs normalised), so over a long sequence their
      // outputs differ somewhere: equal bits would mean the flash kernel did not run.
      if (c.seq >= 64) {
        EXPECT_FALSE(bit_equal(fout, gout)) << "flash path not taken?";
      }
      if (variant == 1) variant1_out = fout;
#if defined(MOEKIT_CUDA_WGMMA)
      // Built for sm_90a, which runs on Hopper only: variant 5 is the wgmma kernel, whose
      // softmax weights come from one fused multiply-add per score (variant 1: a multiply, then a
      // subtraction), so some round differently.
      if (variant == 5 && c.seq >= 256) {
        EXPECT_FALSE(bit_equal(fout, variant1_out)) << "the Hopper kernel did not run?";
      }
#endif
    }
  }
}

// The fused flash-attention backward (ops/cuda/cuda_flash_attention_bwd.cu, the Bf16 backward
// wherever dqk and dv are multiples of 16 up to 256) against the CPU op, against the cuBLAS path
// (MOEKIT_CUDA_FLASH=0) and against itself (bit-identical reruns), each tiling variant
// (MOEKIT_FLASH_BWD_VARIANT) alike. Inputs as in
// CausalAttentionBf16Precision: q, k, v, dO rounded to bf16, out and lse from the CPU forward, so
// only the backward is checked. The kernels round what the GEMM path rounds, P and dS to bf16
// (relative error <= u = 2^-8 per entry; P = exp2 of base-2 scaled scores differs from exp() of
// the scaled scores by fp32 rounding only (ex2.approx in the Hopper kernels: ~2^-22), far below
// u), so the tolerances are that test's:
// - dv = P^T dO: (u + kF32Tol) max(P^T |dO|) / max|dv| (the CPU op's dv for |dO| bounds the
//   error elementwise);
// - dq = dS K, dk = dS^T Q: (u + kF32Tol) sqrt(seq) (errors of random sign over seq terms);
// - seq 1: dq = dk = 0 exactly (P = 1, dP = delta); both sides hold only fp32 noise (|dP - delta|
//   ~ a few ulp of a sum of 128 products, times scale and |k|: ~1e-6), so <= 1e-5 absolute.
// The two GPU paths are each within those bounds of the CPU, so within twice them of each other.
// Shapes: sequences that are not multiples of the 64-row tiles (1, 63, 65, 77, 130, 200) and two
// full tiles (128), batch > 1, 3 heads; DeepSeek-V2's 192/128, 64/64 (the small instance), 48/32
// and 16/32 (dims narrower than the 64-wide shared tiles: column halves partly or wholly past the
// dim), 128/128, 256/256 (the largest instance), 96/160 (the 256/256 instance with both dims
// partial); several of the Hopper kernels' 128-row blocks with a partial last one (300, 520).
TEST_F(CudaBackendTest, FlashAttentionBackwardBf16) {
  const double u = std::ldexp(1.0, -8);
  for (const AttnCase& c :
       {AttnCase{2, 1, 3, 192, 128}, AttnCase{1, 63, 3, 192, 128}, AttnCase{2, 65, 3, 192, 128},
        AttnCase{2, 200, 3, 192, 128}, AttnCase{2, 65, 3, 64, 64}, AttnCase{1, 200, 3, 64, 64},
        AttnCase{2, 200, 3, 48, 32}, AttnCase{1, 63, 2, 48, 32}, AttnCase{1, 77, 2, 16, 32},
        AttnCase{1, 128, 2, 128, 128}, AttnCase{1, 130, 2, 256, 256}, AttnCase{2, 77, 2, 96, 160},
        AttnCase{2, 300, 2, 192, 128}, AttnCase{1, 520, 2, 128, 128}}) {
    SCOPED_TRACE(testing::Message() << c);
    const AttnInputs in = attn_inputs(c, {.bf16 = true, .dout = true});
    const AttnReference ref = attention_reference(cpu(), c, in);
    const Tensor gout = dev(ref.out), glse = dev(ref.lse);
    struct Grads {
      Tensor dq, dk, dv;
    };
    auto run = [&](const char* flash, int variant) {
      EnvScope env("MOEKIT_CUDA_FLASH", flash), opt_in("MOEKIT_CUDA_FLASH_BWD", "1");
      EnvScope bv("MOEKIT_FLASH_BWD_VARIANT", std::to_string(variant).c_str());
      PrecisionScope bf16(gpu(), Precision::Bf16);
      Grads r{poisoned(in.q.shape()), poisoned(in.k.shape()), poisoned(in.v.shape())};
      gpu().attention_backward(r.dq, r.dk, r.dv, in.gdout, gout, glse, in.gq, in.gk, in.gv, c.batch,
                               c.seq, c.heads, in.scale);
      return r;
    };
    const Grads g = run("0", 0);
    Grads variant1;  // to tell the Hopper kernels' result from variant 1's
    for (int variant = 0; variant < kFlashBwdVariants; ++variant) {
      SCOPED_TRACE(testing::Message() << "MOEKIT_FLASH_BWD_VARIANT=" << variant);
      const Grads f = run("1", variant), f2 = run("1", variant);

      const double dv_tol = (u + kF32Tol) * max_abs(ref.dv_bound) / max_abs(ref.dv);
      EXPECT_CLOSE(f.dv, ref.dv, dv_tol);
      EXPECT_CLOSE(f.dv, g.dv.to_host(), 2 * dv_tol);
      if (c.seq == 1) {  // dq = dk = 0 exactly: compare absolute noise
        EXPECT_LE(max_abs(f.dq), 1e-5);
        EXPECT_LE(max_abs(f.dk), 1e-5);
      } else {
        const double tol = (u + kF32Tol) * std::sqrt(double(c.seq));
        EXPECT_CLOSE(f.dq, ref.dq, tol);
        EXPECT_CLOSE(f.dk, ref.dk, tol);
        EXPECT_CLOSE(f.dq, g.dq.to_host(), 2 * tol);
        EXPECT_CLOSE(f.dk, g.dk.to_host(), 2 * tol);
      }
      EXPECT_TRUE(bit_equal(f.dq, f2.dq) && bit_equal(f.dk, f2.dk) && bit_equal(f.dv, f2.dv))
          << "flash backward rerun differs";
      // The paths compute P differently (exp2 of base-2 scores vs exp) and sum in other orders, so
      // over a long sequence with dqk != dv the gradients differ somewhere (measured: every such
      // case here): equal bits would mean the flash kernels did not run. At 128/128 they came out
      // bit-equal on the H200, so that case is not asked.
      if (c.seq >= 64 && c.dqk != c.dv) {
        EXPECT_FALSE(bit_equal(f.dq, g.dq) && bit_equal(f.dk, g.dk) && bit_equal(f.dv, g.dv))
            << "flash backward not taken?";
      }
      if (variant == 1) variant1 = f;
      // Variants 5-7 (the wgmma kernels where the build, device and dims have them, else variant
      // 1) give variant 1's bits: see FlashAttentionBackwardHopperGivesVariant1Bits.
      if (variant >= 5) {
        EXPECT_TRUE(bit_equal(f.dq, variant1.dq) && bit_equal(f.dk, variant1.dk) &&
                    bit_equal(f.dv, variant1.dv))
            << "the Hopper backward's bits differ from variant 1's";
      }
    }
  }
  EXPECT_EQ(gpu().precision(), Precision::Fp32);
}

#if defined(MOEKIT_CUDA_WGMMA)
// The wgmma backward (ops/cuda/cuda_flash_attention_hopper_bwd.cu, each tiling) called directly,
// so that no fallback can answer for it: it returns success, overwrites every poisoned element of
// dq, dk and dv, and gives the mma.sync kernels' (variant 1's) bits. It computes the same fp32 P
// (variant 1's multiply-subtract contracts to the same FMA, and exp2f is the same ex2 away from
// subnormals) and dS, rounds them alike, and each gradient element adds the same bf16 products in
// the same k order (query or key tiles in order, 16 at a time), so equal bits are expected; a
// wrong fragment, mask or offset breaks them (the tolerance checks are
// FlashAttentionBackwardBf16's). Shapes: the three instances (64/64, 128/128, 192/128), dims
// narrower than the instance (48/32), 128-row blocks with a partial last one.
TEST_F(CudaBackendTest, FlashAttentionBackwardHopperGivesVariant1Bits) {
  if (!cuda::flash_attention_hopper_available()) GTEST_SKIP() << "not a Hopper (sm_90) device";
  for (const AttnCase& c :
       {AttnCase{2, 300, 2, 192, 128}, AttnCase{1, 200, 3, 64, 64}, AttnCase{1, 520, 2, 128, 128},
        AttnCase{2, 77, 2, 48, 32}, AttnCase{1, 1, 2, 192, 128}}) {
    SCOPED_TRACE(testing::Message() << c);
    const AttnInputs in = attn_inputs(c, {.bf16 = true, .dout = true});
    const AttnReference ref = attention_reference(cpu(), c, in);
    auto bf16 = [&](const Tensor& t) { return dev(t.to_dtype(DType::BF16)); };
    const Tensor q = bf16(in.q), k = bf16(in.k), v = bf16(in.v), dout = bf16(in.dout);
    const Tensor out = dev(ref.out), lse = dev(ref.lse);
    Tensor delta = poisoned({c.batch, c.heads, c.seq});
    const cuda::AttentionShape shape{c.batch, c.seq, c.heads, c.dqk, c.dv, in.scale};
    ASSERT_EQ(cuda::attention_delta(delta.f32(), in.gdout.f32(), out.raw(), false, shape),
              cudaSuccess);
    struct Grads {
      Tensor dq, dk, dv;
    };
    auto grads = [&] {
      return Grads{poisoned(in.q.shape()), poisoned(in.k.shape()), poisoned(in.v.shape())};
    };
    Grads want = grads();
    {
      EnvScope bv("MOEKIT_FLASH_BWD_VARIANT", "1");
      ASSERT_EQ(
          cuda::flash_attention_backward(want.dq.f32(), want.dk.f32(), want.dv.f32(), dout.raw(),
                                         lse.f32(), delta.f32(), q.raw(), k.raw(), v.raw(), shape),
          cudaSuccess);
    }
    ASSERT_TRUE(cuda::flash_attention_backward_hopper_supported(int(c.dqk), int(c.dv)));
    for (int tiling = 0; tiling < cuda::kHopperBwdTilings; ++tiling) {
      SCOPED_TRACE(testing::Message() << "tiling " << tiling);
      Grads got = grads();
      const cuda::FlashBwdArgs args{got.dq.f32(),
                                    got.dk.f32(),
                                    got.dv.f32(),
                                    static_cast<const uint16_t*>(q.raw()),
                                    static_cast<const uint16_t*>(k.raw()),
                                    static_cast<const uint16_t*>(v.raw()),
                                    static_cast<const uint16_t*>(dout.raw()),
                                    lse.f32(),
                                    delta.f32(),
                                    int(c.seq),
                                    int(c.heads),
                                    int(c.dqk),
                                    int(c.dv),
                                    in.scale,
                                    in.scale * 1.4426950408889634f};
      ASSERT_EQ(cuda::flash_attention_backward_hopper(args, c.batch, tiling), cudaSuccess);
      EXPECT_TRUE(std::isfinite(max_abs(got.dq)) && std::isfinite(max_abs(got.dk)) &&
                  std::isfinite(max_abs(got.dv)))
          << "an element was not written";
      EXPECT_TRUE(bit_equal(got.dq, want.dq)) << "dq";
      EXPECT_TRUE(bit_equal(got.dk, want.dk)) << "dk";
      EXPECT_TRUE(bit_equal(got.dv, want.dv)) << "dv";
    }
  }
}
#endif

// attention_forward with a BF16 out under Precision::Bf16 (MLA's o, which only o_proj's bf16 GEMMs
// and the backward's delta read): bit for bit the F32 out of the same path rounded to nearest
// even, with the same lse, through the flash kernel (each tiling variant) and through the GEMM path
// (MOEKIT_CUDA_FLASH=0, and shapes the flash kernel does not take: dims not multiples of 16). The
// F32 out itself is checked against the CPU at CausalAttentionBf16Precision's tolerance, so the
// equality is not of two wrong values. A BF16 out outside the bf16 precision is refused.
TEST_F(CudaBackendTest, AttentionForwardBf16OutIsTheRoundedF32Out) {
  const double u = std::ldexp(1.0, -8);
  for (const AttnCase& c :
       {AttnCase{2, 45, 3, 24, 16}, AttnCase{1, 100, 2, 192, 128}, AttnCase{2, 300, 2, 64, 64},
        AttnCase{1, 130, 2, 256, 256}, AttnCase{2, 77, 2, 96, 160}, AttnCase{2, 1, 4, 192, 128}}) {
    SCOPED_TRACE(testing::Message() << c);
    const AttnInputs in = attn_inputs(c, {.bf16 = true});
    const AttnReference ref = attention_reference(cpu(), c, in);
    const double out_tol = (u + kF32Tol) * max_abs(in.v) / max_abs(ref.out);
    for (int mode = 0; mode <= kFlashFwdVariants; ++mode) {
      const bool flash = mode < kFlashFwdVariants;
      SCOPED_TRACE(testing::Message() << "MOEKIT_CUDA_FLASH=" << flash << " variant " << mode);
      EnvScope env("MOEKIT_CUDA_FLASH", flash ? "1" : "0");
      EnvScope fv("MOEKIT_FLASH_FWD_VARIANT", std::to_string(flash ? mode : 0).c_str());
      PrecisionScope bf16(gpu(), Precision::Bf16);
      Tensor o32 = poisoned(ref.out.shape()), l32 = poisoned(ref.lse.shape());
      Tensor o16 = poisoned(ref.out.shape(), DType::BF16), l16 = poisoned(ref.lse.shape());
      gpu().attention_forward(o32, l32, in.gq, in.gk, in.gv, c.batch, c.seq, c.heads, in.scale);
      gpu().attention_forward(o16, l16, in.gq, in.gk, in.gv, c.batch, c.seq, c.heads, in.scale);
      EXPECT_CLOSE(o32, ref.out, out_tol);
      EXPECT_TRUE(bit_equal(o16, o32.to_host().to_dtype(DType::BF16)))
          << "bf16 out is not the f32 out rounded";
      EXPECT_TRUE(bit_equal(l16, l32)) << "lse";
    }
  }
  const Tensor q = dev(randn({8, 2, 16})), v = dev(randn({8, 2, 16}));
  Tensor o16 = poisoned({8, 2, 16}, DType::BF16), lse = poisoned({1, 2, 8});
  expect_error_containing([&] { gpu().attention_forward(o16, lse, q, q, v, 1, 8, 2, 0.25f); },
                          "attention_forward: BF16 out needs the bf16 precision");
}

// attention_backward with a BF16 O (the output the forward stored rounded): O is read only for
// delta = rowsum(dO * O), widened exactly, so the gradients are bit-identical to those from an F32
// O holding the same (rounded) values, on the flash and the GEMM path. Against the CPU op given
// that rounded O (the reference of what the op computes), the tolerances of
// CausalAttentionBf16Precision: dv (which does not read O) (u + kF32Tol) max(P^T |dO|) / max|dv|,
// dq and dk (u + kF32Tol) sqrt(seq); seq 1: dq = dk = 0, fp32 noise <= 1e-5. And the rounded O
// does move the gradients (delta from other values), so dq differs from the F32-O run's bits.
TEST_F(CudaBackendTest, AttentionBackwardReadsABf16Out) {
  const double u = std::ldexp(1.0, -8);
  for (const AttnCase& c :
       {AttnCase{2, 45, 3, 24, 16}, AttnCase{1, 100, 2, 192, 128}, AttnCase{2, 200, 3, 64, 64},
        AttnCase{2, 1, 3, 192, 128}, AttnCase{2, 77, 2, 96, 160}}) {
    SCOPED_TRACE(testing::Message() << c);
    const AttnInputs in = attn_inputs(c, {.bf16 = true, .dout = true});
    const AttnReference ref = attention_reference(cpu(), c, in);
    // The CPU backward on O rounded to bf16 (held in fp32): the reference of the BF16-O op.
    const Tensor out16 = ref.out.to_dtype(DType::BF16), out_r = out16.to_f32();
    Tensor dq = Tensor::empty(in.q.shape()), dk = Tensor::empty(in.k.shape()),
           dv = Tensor::empty(in.v.shape());
    cpu().attention_backward(dq, dk, dv, in.dout, out_r, ref.lse, in.q, in.k, in.v, c.batch, c.seq,
                             c.heads, in.scale);
    const Tensor glse = dev(ref.lse);
    struct Grads {
      Tensor dq, dk, dv;
    };
    auto run = [&](const Tensor& o) {
      PrecisionScope bf16(gpu(), Precision::Bf16);
      Grads r{poisoned(in.q.shape()), poisoned(in.k.shape()), poisoned(in.v.shape())};
      gpu().attention_backward(r.dq, r.dk, r.dv, in.gdout, o, glse, in.gq, in.gk, in.gv, c.batch,
                               c.seq, c.heads, in.scale);
      return r;
    };
    for (const char* flash : {"1", "0"}) {
      SCOPED_TRACE(testing::Message() << "MOEKIT_CUDA_FLASH=" << flash);
      EnvScope env("MOEKIT_CUDA_FLASH", flash), opt_in("MOEKIT_CUDA_FLASH_BWD", "1");
      const Grads b = run(dev(out16)), f = run(dev(out_r)), unrounded = run(dev(ref.out));
      EXPECT_TRUE(bit_equal(b.dq, f.dq) && bit_equal(b.dk, f.dk) && bit_equal(b.dv, f.dv))
          << "a BF16 O is not read as its exact fp32 value";
      EXPECT_CLOSE(b.dv, dv, (u + kF32Tol) * max_abs(ref.dv_bound) / max_abs(dv));
      if (c.seq == 1) {  // dq = dk = 0 exactly: compare absolute noise
        EXPECT_LE(max_abs(b.dq), 1e-5);
        EXPECT_LE(max_abs(b.dk), 1e-5);
      } else {
        const double tol = (u + kF32Tol) * std::sqrt(double(c.seq));
        EXPECT_CLOSE(b.dq, dq, tol);
        EXPECT_CLOSE(b.dk, dk, tol);
        EXPECT_FALSE(bit_equal(b.dq, unrounded.dq)) << "the rounded O changed nothing?";
      }
    }
  }
}

// Not a check of values: times the fused attention at a training-like MLA shape (seq 2048, 16
// heads, q/k 192, v 128) so tools/cuda_check.sh reports a throughput; asserts only finite output.
TEST_F(CudaBackendTest, AttentionThroughput) {
  const int64_t B = 1, S = 2048, H = 16, DQK = 192, DV = 128;
  const float scale = 1.0f / std::sqrt(float(DQK));
  Tensor q = dev(randn({B * S, H, DQK})), k = dev(randn({B * S, H, DQK}));
  Tensor v = dev(randn({B * S, H, DV})), dout = dev(randn({B * S, H, DV}));
  Tensor out = poisoned({B * S, H, DV}), lse = poisoned({B, H, S});
  Tensor dq = poisoned(q.shape()), dk = poisoned(k.shape()), dv = poisoned(v.shape());
  auto sync = [&] { (void)lse.slice(0, 1).to_host(); };  // a device-to-host copy waits
  auto time_ms = [&](const std::function<void()>& f) {
    f();
    sync();
    const int reps = 5;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    sync();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
               .count() /
           reps;
  };
  const double fwd = time_ms([&] { gpu().attention_forward(out, lse, q, k, v, B, S, H, scale); });
  const double bwd = time_ms(
      [&] { gpu().attention_backward(dq, dk, dv, dout, out, lse, q, k, v, B, S, H, scale); });
  // Causal FLOPs: forward 2 GEMMs over half the [S, S] scores; backward recomputes S and does 4.
  const double half = double(B * H) * double(S) * double(S) / 2.0;
  const double fwd_flop = 2.0 * half * double(DQK + DV);
  const double bwd_flop = 2.0 * half * double(2 * DQK + 2 * DV + DQK + DV);
  std::printf("    attention fwd %.3f ms (%.1f TFLOP/s), bwd %.3f ms (%.1f TFLOP/s)\n", fwd,
              fwd_flop / fwd * 1e-9, bwd, bwd_flop / bwd * 1e-9);
  EXPECT_TRUE(std::isfinite(max_abs(out)) && std::isfinite(max_abs(dq)));
  // The same shape under Precision::Bf16 (tensor-core GEMMs); FLOPs counted as above (causal
  // work only, though the path computes some masked scores too).
  double fwd16 = 0, bwd16 = 0;
  {
    PrecisionScope bf16(gpu(), Precision::Bf16);
    fwd16 = time_ms([&] { gpu().attention_forward(out, lse, q, k, v, B, S, H, scale); });
    bwd16 = time_ms(
        [&] { gpu().attention_backward(dq, dk, dv, dout, out, lse, q, k, v, B, S, H, scale); });
  }
  std::printf("    attention bf16 fwd %.3f ms (%.1f TFLOP/s), bwd %.3f ms (%.1f TFLOP/s)\n", fwd16,
              fwd_flop / fwd16 * 1e-9, bwd16, bwd_flop / bwd16 * 1e-9);
  EXPECT_TRUE(std::isfinite(max_abs(out)) && std::isfinite(max_abs(dq)));
  // The bf16 forward without the flash kernel (the cuBLAS GEMMs around the softmax kernel).
  {
    EnvScope env("MOEKIT_CUDA_FLASH", "0");
    PrecisionScope bf16(gpu(), Precision::Bf16);
    const double gemm =
        time_ms([&] { gpu().attention_forward(out, lse, q, k, v, B, S, H, scale); });
    std::printf("    attention bf16 fwd, cuBLAS path %.3f ms (%.1f TFLOP/s)\n", gemm,
                fwd_flop / gemm * 1e-9);
    const double gemm_bwd = time_ms(
        [&] { gpu().attention_backward(dq, dk, dv, dout, out, lse, q, k, v, B, S, H, scale); });
    std::printf("    attention bf16 bwd, cuBLAS path %.3f ms (%.1f TFLOP/s)\n", gemm_bwd,
                bwd_flop / gemm_bwd * 1e-9);
  }
  {  // the cuBLAS backward after the flash forward (MOEKIT_CUDA_FLASH_BWD=0)
    EnvScope env("MOEKIT_CUDA_FLASH_BWD", "0");
    PrecisionScope bf16(gpu(), Precision::Bf16);
    const double gemm_bwd = time_ms(
        [&] { gpu().attention_backward(dq, dk, dv, dout, out, lse, q, k, v, B, S, H, scale); });
    std::printf("    attention bf16 bwd, MOEKIT_CUDA_FLASH_BWD=0 %.3f ms (%.1f TFLOP/s)\n",
                gemm_bwd, bwd_flop / gemm_bwd * 1e-9);
  }
  EXPECT_TRUE(std::isfinite(max_abs(out)));

  // Every tiling variant of the flash kernels (MOEKIT_FLASH_FWD_VARIANT / _BWD_VARIANT), at this
  // shape and at batch 4 (the training shape), to choose the defaults from.
  for (const int64_t batch : {int64_t(1), int64_t(4)}) {
    const int64_t T = batch * S;
    Tensor bq = dev(randn({T, H, DQK})), bk = dev(randn({T, H, DQK}));
    Tensor bv = dev(randn({T, H, DV})), bdout = dev(randn({T, H, DV}));
    Tensor bout = poisoned({T, H, DV}), blse = poisoned({batch, H, S});
    Tensor bdq = poisoned(bq.shape()), bdk = poisoned(bk.shape()), bdv = poisoned(bv.shape());
    const double scale_b = double(batch);
    EnvScope opt_in("MOEKIT_CUDA_FLASH_BWD", "1");
    PrecisionScope bf16(gpu(), Precision::Bf16);
    for (int variant = 0; variant < kFlashFwdVariants; ++variant) {
      EnvScope fv("MOEKIT_FLASH_FWD_VARIANT", std::to_string(variant).c_str());
      const double ms =
          time_ms([&] { gpu().attention_forward(bout, blse, bq, bk, bv, batch, S, H, scale); });
      std::printf("    attention bf16 fwd variant %d: %.3f ms (%.1f TFLOP/s) [batch %lld x %lld]\n",
                  variant, ms, scale_b * fwd_flop / ms * 1e-9, static_cast<long long>(batch),
                  static_cast<long long>(S));
      EXPECT_TRUE(std::isfinite(max_abs(bout)));
    }
    {  // the cuBLAS backward at this batch
      EnvScope off("MOEKIT_CUDA_FLASH_BWD", "0");
      const double ms = time_ms([&] {
        gpu().attention_backward(bdq, bdk, bdv, bdout, bout, blse, bq, bk, bv, batch, S, H, scale);
      });
      std::printf("    attention bf16 bwd (cuBLAS): %.3f ms (%.1f TFLOP/s) [batch %lld x %lld]\n",
                  ms, scale_b * bwd_flop / ms * 1e-9, static_cast<long long>(batch),
                  static_cast<long long>(S));
    }
    for (int variant = 0; variant < kFlashBwdVariants; ++variant) {
      EnvScope bv_env("MOEKIT_FLASH_BWD_VARIANT", std::to_string(variant).c_str());
      const double ms = time_ms([&] {
        gpu().attention_backward(bdq, bdk, bdv, bdout, bout, blse, bq, bk, bv, batch, S, H, scale);
      });
      std::printf(
          "    attention bf16 bwd variant %d (flash): %.3f ms (%.1f TFLOP/s) [batch %lld x %lld]\n",
          variant, ms, scale_b * bwd_flop / ms * 1e-9, static_cast<long long>(batch),
          static_cast<long long>(S));
      EXPECT_TRUE(std::isfinite(max_abs(bdq)) && std::isfinite(max_abs(bdk)) &&
                  std::isfinite(max_abs(bdv)));
    }
  }
}

TEST_F(CudaBackendTest, CrossEntropyWithIgnoredTargets) {
  for (int64_t V : {1000, 50257}) {
    const int64_t T = 33;
    Tensor logits = randn({T, V}, 3.0f), targets = randint({T}, 0, int32_t(V));
    for (int64_t t = 0; t < T; t += 5) targets.i32()[t] = -1;  // ignored positions
    Tensor losses = Tensor::empty({T}), glosses = poisoned({T});
    cpu().cross_entropy_forward(losses, logits, targets);
    gpu().cross_entropy_forward(glosses, dev(logits), dev(targets));
    EXPECT_CLOSE(glosses, losses, kF32Tol);
    Tensor d = Tensor::empty({T, V}), gd = poisoned({T, V});
    cpu().cross_entropy_backward(d, logits, targets, 1.0f / 27.0f);
    gpu().cross_entropy_backward(gd, dev(logits), dev(targets), 1.0f / 27.0f);
    EXPECT_CLOSE(gd, d, kF32Tol);
    // BF16 dlogits (the LM head's under Bf16): the F32 gradient rounded once, to the bit.
    Tensor gd16 = poisoned({T, V}, DType::BF16), r16 = poisoned({T, V}, DType::BF16);
    gpu().cross_entropy_backward(gd16, dev(logits), dev(targets), 1.0f / 27.0f);
    gpu().round_bf16(r16, gd);
    EXPECT_TRUE(bit_equal(gd16, r16)) << "BF16 dlogits";
    Tensor bad = targets.clone();
    bad.i32()[1] = int32_t(V);
    expect_index_error([&] { gpu().cross_entropy_forward(glosses, dev(logits), dev(bad)); },
                       glosses, "cross_entropy_forward: target");
  }
}

// The fused loss + gradient kernel. Against the two separate CUDA ops: bit equality (it shares
// their row statistics, block size, loss and gradient expressions; only the order in which a
// block writes its gradient row differs). Against the CPU: kF32Tol, as the separate ops. V up to
// V2-Lite's 102,400 (the gradient pass walks a row from its last 256-wide chunk down, so V is
// also chosen off multiples of 256), every fifth target ignored, both vocabulary ends targeted.
TEST_F(CudaBackendTest, CrossEntropyFused) {
  for (int64_t V : {1000, 50257, 102400}) {
    SCOPED_TRACE(testing::Message() << "V " << V);
    const int64_t T = 33;
    const float scale = 1.0f / 27.0f;
    Tensor logits = randn({T, V}, 3.0f), targets = randint({T}, 0, int32_t(V));
    for (int64_t t = 0; t < T; t += 5) targets.i32()[t] = -1;  // ignored positions
    targets.i32()[1] = 0;
    targets.i32()[2] = int32_t(V) - 1;
    const Tensor gl = dev(logits), gt = dev(targets);
    Tensor losses = Tensor::empty({T}), d = Tensor::empty({T, V});
    cpu().cross_entropy_forward(losses, logits, targets);
    cpu().cross_entropy_backward(d, logits, targets, scale);
    Tensor s_losses = poisoned({T}), s_d = poisoned({T, V}), s_d16 = poisoned({T, V}, DType::BF16);
    gpu().cross_entropy_forward(s_losses, gl, gt);
    gpu().cross_entropy_backward(s_d, gl, gt, scale);
    gpu().cross_entropy_backward(s_d16, gl, gt, scale);

    // F32 into a separate tensor.
    Tensor f_losses = poisoned({T}), f_d = poisoned({T, V});
    gpu().cross_entropy_fused(f_losses, f_d, gl, gt, scale);
    EXPECT_CLOSE(f_losses, losses, kF32Tol);
    EXPECT_CLOSE(f_d, d, kF32Tol);
    EXPECT_TRUE(bit_equal(f_losses, s_losses)) << "losses vs cross_entropy_forward";
    EXPECT_TRUE(bit_equal(f_d, s_d)) << "dlogits vs cross_entropy_backward";
    const Tensor lh = f_losses.to_host(), dh = f_d.to_host();
    for (int64_t t = 0; t < T; t += 5) {
      EXPECT_EQ(lh.f32()[t], 0.0f) << "ignored row " << t;
      EXPECT_EQ(max_abs(dh.slice(t, t + 1)), 0.0) << "ignored row " << t;
    }

    // F32 in place (the LM head's training step under Fp32): the loss reads the target logit
    // before any thread of its block overwrites the row.
    Tensor p_losses = poisoned({T}), in_place = gl.clone();
    gpu().cross_entropy_fused(p_losses, in_place, in_place, gt, scale);
    EXPECT_TRUE(bit_equal(p_losses, s_losses)) << "losses (in place)";
    EXPECT_TRUE(bit_equal(in_place, s_d)) << "dlogits (in place)";

    // BF16 dlogits (under Bf16): the separate backward's bits, i.e. the F32 gradient rounded once.
    Tensor b_losses = poisoned({T}), b_d = poisoned({T, V}, DType::BF16);
    gpu().cross_entropy_fused(b_losses, b_d, gl, gt, scale);
    EXPECT_TRUE(bit_equal(b_losses, s_losses)) << "losses (BF16 dlogits)";
    EXPECT_TRUE(bit_equal(b_d, s_d16)) << "BF16 dlogits";

    // Deterministic: a second run gives the same bits.
    Tensor r_losses = poisoned({T}), r_d = poisoned({T, V}), r_d16 = poisoned({T, V}, DType::BF16);
    gpu().cross_entropy_fused(r_losses, r_d, gl, gt, scale);
    EXPECT_TRUE(bit_equal(r_losses, f_losses) && bit_equal(r_d, f_d)) << "second run (F32)";
    gpu().cross_entropy_fused(r_losses, r_d16, gl, gt, scale);
    EXPECT_TRUE(bit_equal(r_losses, f_losses) && bit_equal(r_d16, b_d)) << "second run (BF16)";

    Tensor bad = targets.clone();
    bad.i32()[1] = int32_t(V);
    expect_index_error([&] { gpu().cross_entropy_fused(r_losses, r_d, gl, dev(bad), scale); },
                       r_losses, "cross_entropy_fused: target");
  }
}

// The fused op on BF16 logits (the LM head's training chunk under Bf16), with BF16 dlogits. The
// reference is the CPU op on the same bf16 values widened to fp32 (exactly). Tolerances:
// - losses: kF32Tol, as for fp32 logits: the inputs are the same numbers, the statistics are fp32
//   max and double sums (the staged kernel adds each run of eight exp terms in fp32 first, a
//   relative error under 2^-21 of the sum, far below 1e-5).
// - dlogits: the fp32 gradient rounded once to bf16 (8 significant bits: relative error <= 2^-8 of
//   each element, so of the row's largest) on top of the fp32 ops' 1e-5: 2^-8 + kF32Tol.
// V: 1000 (aligned rows), 1003 and 50257 (odd: every row at another 16-byte phase, whole chunks
// in the middle, element-wise ends) and V2-Lite's 102,400 take the staged kernel (one read of the
// row from shared memory) on Hopper's 227 KB (the test prints the path per V); 120,001 and
// DeepSeek-V3's 129,280 do not fit and take the two-pass kernel on bf16 logits, whose statistics
// are the fp32 kernel's in the same order, so there the result must be that kernel's on the
// widened logits to the bit. Every fifth target is ignored (loss 0, zero gradient row) and both
// vocabulary ends are targeted. In place (dlogits = logits, as loss_and_backward calls it) and
// into a tensor of another 16-byte phase (odd V: the stores go element by element) must give the
// separate tensor's bits.
TEST_F(CudaBackendTest, CrossEntropyFusedBf16Logits) {
  constexpr double kBf16OutTol = 1.0 / 256.0 + kF32Tol;
  for (int64_t V : {1000, 1003, 50257, 102400, 120001, 129280}) {
    SCOPED_TRACE(testing::Message() << "V " << V);
    const int64_t T = 33;
    const float scale = 1.0f / 27.0f;
    const Tensor logits16 = randn({T, V}, 3.0f).to_dtype(DType::BF16);
    const Tensor logits = logits16.to_f32();  // the bf16 values, exactly
    Tensor targets = randint({T}, 0, int32_t(V));
    for (int64_t t = 0; t < T; t += 5) targets.i32()[t] = -100;  // ignored positions
    targets.i32()[1] = 0;
    targets.i32()[2] = int32_t(V) - 1;
    const Tensor gl16 = dev(logits16), gt = dev(targets);
    Tensor losses = Tensor::empty({T}), d = Tensor::empty({T, V});
    cpu().cross_entropy_forward(losses, logits, targets);
    cpu().cross_entropy_backward(d, logits, targets, scale);
#if defined(MOEKIT_HAVE_CUDA)
    const bool staged = cuda::cross_entropy_stages_rows(V);
#else
    const bool staged = false;  // (unreached: the fixture skips without CUDA)
#endif
    if (V <= 1003) {
      EXPECT_TRUE(staged) << "a 2 KB row fits any GPU's shared memory";
    }
    std::printf("    V %-6lld %s\n", static_cast<long long>(V),
                staged ? "staged in shared memory (one read)" : "two-pass kernel");

    Tensor b_losses = poisoned({T}), b_d = poisoned({T, V}, DType::BF16);
    gpu().cross_entropy_fused(b_losses, b_d, gl16, gt, scale);
    EXPECT_CLOSE(b_losses, losses, kF32Tol);
    EXPECT_CLOSE(b_d, d, kBf16OutTol);
    const Tensor lh = b_losses.to_host(), dh = b_d.to_host().to_f32();
    for (int64_t t = 0; t < T; t += 5) {
      EXPECT_EQ(lh.f32()[t], 0.0f) << "ignored row " << t;
      EXPECT_EQ(max_abs(dh.slice(t, t + 1)), 0.0) << "ignored row " << t;
    }
    if (!staged) {
      Tensor f_losses = poisoned({T}), f_d = poisoned({T, V}, DType::BF16);
      gpu().cross_entropy_fused(f_losses, f_d, dev(logits), gt, scale);
      EXPECT_TRUE(bit_equal(b_losses, f_losses)) << "losses vs F32 logits";
      EXPECT_TRUE(bit_equal(b_d, f_d)) << "dlogits vs F32 logits";
    }

    // In place: the loss and the gradient come from the logits, not from what overwrites them.
    Tensor p_losses = poisoned({T}), in_place = gl16.clone();
    gpu().cross_entropy_fused(p_losses, in_place, in_place, gt, scale);
    EXPECT_TRUE(bit_equal(p_losses, b_losses)) << "losses (in place)";
    EXPECT_TRUE(bit_equal(in_place, b_d)) << "dlogits (in place)";

    // dlogits one row into a larger tensor: for an odd V its rows sit at other 16-byte phases than
    // the logits' rows.
    Tensor shifted = poisoned({T + 1, V}, DType::BF16), s_losses = poisoned({T});
    Tensor s_d = shifted.slice(1, T + 1);
    gpu().cross_entropy_fused(s_losses, s_d, gl16, gt, scale);
    EXPECT_TRUE(bit_equal(s_losses, b_losses)) << "losses (shifted dlogits)";
    EXPECT_TRUE(bit_equal(s_d, b_d)) << "dlogits (shifted dlogits)";

    // Deterministic: a second run gives the same bits.
    Tensor r_losses = poisoned({T}), r_d = poisoned({T, V}, DType::BF16);
    gpu().cross_entropy_fused(r_losses, r_d, gl16, gt, scale);
    EXPECT_TRUE(bit_equal(r_losses, b_losses) && bit_equal(r_d, b_d)) << "second run";

    // BF16 logits take BF16 dlogits only (an F32 gradient could not overwrite them in place).
    Tensor f32_d = poisoned({T, V});
    expect_error_containing([&] { gpu().cross_entropy_fused(r_losses, f32_d, gl16, gt, scale); },
                            "BF16 logits take BF16 dlogits");
  }
}

// Not a check of values: times the loss at the LM head's training chunk (2048 rows of V2-Lite's
// 102,400-entry vocabulary, 840 MB of fp32 logits), the two separate ops against the fused one,
// so that a GPU run reports what the fusion saves, and the fused op on bf16 logits; asserts only
// finite output. GB/s counts the DRAM traffic each would need without L2 reuse: separate 3 reads +
// 1 write of the logits, fused 2 reads + 1 write, bf16 logits 1 read + 1 write of half the bytes
// (a figure above the H200's ~4.8 TB/s means re-reads hit L2).
TEST_F(CudaBackendTest, CrossEntropyThroughput) {
  const int64_t T = 2048, V = 102400;
  const float scale = 1.0f / float(T);
  Tensor logits = poisoned({T, V}), targets = dev(randint({T}, 0, int32_t(V)));
  Tensor losses = poisoned({T}), d = poisoned({T, V}), d16 = poisoned({T, V}, DType::BF16);
  auto sync = [&] { (void)losses.slice(0, 1).to_host(); };  // a device-to-host copy waits
  auto time_ms = [&](const std::function<void()>& f) {
    f();
    sync();
    const int reps = 5;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    sync();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
               .count() /
           reps;
  };
  // Logits of a realistic spread (not NaN): a copy of random values, tiled.
  const Tensor block = dev(randn({64, V}, 3.0f));
  for (int64_t r = 0; r < T; r += 64) {
    Tensor dst = logits.slice(r, r + 64);
    gpu().copy(dst, block);
  }
  const double row_gb = double(T) * double(V) * 4.0 * 1e-9;
  auto report = [&](const char* what, double ms, double passes) {
    std::printf("    %-40s %.3f ms (%.0f GB/s at %.1f passes) [%lld x %lld]\n", what, ms,
                passes * row_gb / ms * 1e3, passes, static_cast<long long>(T),
                static_cast<long long>(V));
  };
  report("cross entropy separate, F32 dlogits", time_ms([&] {
           gpu().cross_entropy_forward(losses, logits, targets);
           gpu().cross_entropy_backward(d, logits, targets, scale);
         }),
         4.0);
  report("cross entropy fused, F32 dlogits",
         time_ms([&] { gpu().cross_entropy_fused(losses, d, logits, targets, scale); }), 3.0);
  report("cross entropy separate, BF16 dlogits", time_ms([&] {
           gpu().cross_entropy_forward(losses, logits, targets);
           gpu().cross_entropy_backward(d16, logits, targets, scale);
         }),
         3.5);
  report("cross entropy fused, BF16 dlogits",
         time_ms([&] { gpu().cross_entropy_fused(losses, d16, logits, targets, scale); }), 2.5);
  // BF16 logits (loss_and_backward under Bf16): one read of the bf16 row and one bf16 write, 1.0
  // pass in the fp32 passes counted here. Into another tensor (in place would feed each rep the
  // previous gradients; the traffic is the same).
  Tensor logits16 = poisoned({T, V}, DType::BF16);
  gpu().round_bf16(logits16, logits);
  report("cross entropy fused, BF16 logits + dlogits",
         time_ms([&] { gpu().cross_entropy_fused(losses, d16, logits16, targets, scale); }), 1.0);
  EXPECT_TRUE(std::isfinite(max_abs(losses)) && std::isfinite(max_abs(d.slice(0, 8))));
}

// Every seventh row is -1 (a dispatch plan's padding slot: no row). C = 304 takes the gather's and
// the scatter's 8-wide paths (16-byte accesses), 301 their one-element paths.
TEST_F(CudaBackendTest, GatherScatter) {
  for (const int64_t C : {304, 301}) {
    SCOPED_TRACE(testing::Message() << "C " << C);
    const int64_t R = 41, N = 157;  // N > R: destinations repeat
    Tensor x = randn({R, C}), rows = randint({N}, 0, int32_t(R)), w = randn({N});
    for (int64_t i = 0; i < N; i += 7) rows.i32()[i] = -1;
    for (const Tensor* wp : std::initializer_list<const Tensor*>{nullptr, &w}) {
      Tensor out = Tensor::empty({N, C}), gout = poisoned({N, C});
      Tensor gw = dev(w);
      cpu().gather_rows(out, x, rows, wp);
      gpu().gather_rows(gout, dev(x), dev(rows), wp ? &gw : nullptr);
      EXPECT_CLOSE(gout, out, kF32Tol);
      Tensor src = randn({N, C}), acc = randn({R, C}), gacc = dev(acc);
      cpu().scatter_add_rows(acc, src, rows, wp);
      gpu().scatter_add_rows(gacc, dev(src), dev(rows), wp ? &gw : nullptr);
      EXPECT_CLOSE(gacc, acc, kF32Tol);
      Tensor again = Tensor::zeros({R, C}, DType::F32, Device::CUDA), again2 = again.clone();
      gpu().scatter_add_rows(again, dev(src), dev(rows), wp ? &gw : nullptr);
      gpu().scatter_add_rows(again2, dev(src), dev(rows), wp ? &gw : nullptr);
      EXPECT_TRUE(bit_equal(again, again2)) << "scatter is not deterministic";
    }
  }
}

// The MoE dispatch into BF16 rows (bf16 activations: xs, and backward's weighted dys): the value
// (times its weight: one fp32 multiplication, correctly rounded on both sides) is rounded to
// nearest even once, as Tensor::to_dtype rounds, so the CPU gather's output rounded on the host is
// the oracle at tolerance 0.
TEST_F(CudaBackendTest, GatherRowsBf16Output) {
  const int64_t R = 41, C = 304, N = 157;  // C: the 8-wide paths  // N > R: rows repeat
  Tensor x = randn({R, C}), rows = randint({N}, 0, int32_t(R)), w = randn({N});
  for (int64_t i = 3; i < N; i += 7) rows.i32()[i] = -1;  // padding slots: zero rows
  for (const Tensor* wp : std::initializer_list<const Tensor*>{nullptr, &w}) {
    SCOPED_TRACE(wp ? "weighted" : "plain");
    Tensor out = Tensor::empty({N, C}), gout = poisoned({N, C}, DType::BF16);
    Tensor gw = dev(w);
    cpu().gather_rows(out, x, rows, wp);
    gpu().gather_rows(gout, dev(x), dev(rows), wp ? &gw : nullptr);
    ASSERT_EQ(gout.dtype(), DType::BF16);
    EXPECT_CLOSE(gout, out.to_dtype(DType::BF16).to_f32(), 0.0);
  }
}

// The gather from a BF16 source (the MoE layer's input rounded once for its GEMMs; backward gathers
// the trainable experts' rows from it again): widened exactly, so the CPU gather of the widened
// values is the oracle at tolerance 0, into F32 and (rounded once) into BF16 rows.
TEST_F(CudaBackendTest, GatherRowsFromBf16Source) {
  for (const int64_t C : {304, 301}) {  // the 8-wide and the scalar paths
    SCOPED_TRACE(testing::Message() << "C " << C);
    const int64_t R = 41, N = 157;
    const Tensor x16 = randn({R, C}).to_dtype(DType::BF16), x = x16.to_f32();
    Tensor rows = randint({N}, 0, int32_t(R)), w = randn({N});
    for (int64_t i = 2; i < N; i += 7) rows.i32()[i] = -1;  // padding slots: zero rows
    for (const Tensor* wp : std::initializer_list<const Tensor*>{nullptr, &w}) {
      SCOPED_TRACE(wp ? "weighted" : "plain");
      Tensor out = Tensor::empty({N, C}), gw = dev(w);
      cpu().gather_rows(out, x, rows, wp);
      for (DType d : {DType::F32, DType::BF16}) {
        Tensor gout = poisoned({N, C}, d);
        gpu().gather_rows(gout, dev(x16), dev(rows), wp ? &gw : nullptr);
        EXPECT_CLOSE(gout, d == DType::BF16 ? out.to_dtype(DType::BF16).to_f32() : out, 0.0);
      }
    }
  }
}

// I32 rows (the MoE backward's slot tokens, compacted to the trainable experts' slots; 1-D, so
// 1-wide rows) against the CPU op at equality: a bit copy, including values that are NaN,
// infinity or denormal as floats (which a pass through fp32 could change); padding rows give 0.
// The poison, -1, is no input value. Weights and mixed dtypes are refused.
TEST_F(CudaBackendTest, GatherRowsI32IsABitCopy) {
  EXPECT_TRUE(gpu().supports(Op::GatherRows, DType::I32));
  const int32_t special[] = {INT32_MIN, INT32_MAX, 0x7fc00001, 0x7f800001, 0x7f800000, 1};
  for (const int64_t C : {1, 3}) {
    SCOPED_TRACE(testing::Message() << "C " << C);
    const int64_t R = 41, N = 157;
    Tensor x = randint({R, C}, 0, 1 << 30), rows = randint({N}, 0, int32_t(R));
    std::copy(std::begin(special), std::end(special), x.i32());
    for (int32_t i = 1; i <= 6; ++i) rows.i32()[i] = i - 1;  // the rows holding them
    for (int64_t i = 0; i < N; i += 7) rows.i32()[i] = -1;
    Tensor out = Tensor::empty({N, C}, DType::I32), gout = poisoned({N, C}, DType::I32);
    cpu().gather_rows(out, x, rows, nullptr);
    gpu().gather_rows(gout, dev(x), dev(rows), nullptr);
    expect_equal_i32(gout, out);
  }
  const Tensor x = dev(Tensor::zeros({4, 1}, DType::I32)),
               rows = dev(Tensor::zeros({5}, DType::I32));
  const Tensor w = dev(Tensor::zeros({5})), xf = dev(Tensor::zeros({4, 1}));
  Tensor out = poisoned({5, 1}, DType::I32), outf = poisoned({5, 1});
  expect_error_containing([&] { gpu().gather_rows(out, x, rows, &w); }, "gather_rows");
  expect_error_containing([&] { gpu().gather_rows(outf, x, rows, nullptr); }, "gather_rows");
  expect_error_containing([&] { gpu().gather_rows(out, xf, rows, nullptr); }, "gather_rows");
}

// swiglu_scaled_backward (the MoE layer's combine weight folded into SwiGLU's backward) against
// the CPU op on the same values (bf16 values, so F32 and BF16 operands mean the same numbers):
// dgate and dup at kF32Tol, plus 2^-8 when written as BF16 (rounded once); dscale, a row's fp32
// sum of dout * h, at kF32Tol in both dtypes. Rows with scale 0 and dout 0 (the plan's padding)
// give exact zeros. Widths 1408 (V2-Lite's experts: the 8-wide path) and 45 (scalar).
TEST_F(CudaBackendTest, SwiGluScaledBackward) {
  for (const Shape& s : {Shape{53, 1408}, Shape{37, 45}}) {
    SCOPED_TRACE(s.str());
    const int64_t R = s[0], I = s[1];
    auto as = [](const Tensor& t, DType d) {
      return d == DType::BF16 ? t.to_dtype(DType::BF16) : t;
    };
    const Tensor gate = randn(s, 2.0f).to_dtype(DType::BF16).to_f32();
    const Tensor up = randn(s).to_dtype(DType::BF16).to_f32();
    Tensor dout = randn(s).to_dtype(DType::BF16).to_f32(), scale = randn({R});
    for (int64_t r = 0; r < R; r += 5) {  // padding rows
      scale.f32()[r] = 0.0f;
      std::fill_n(dout.f32() + r * I, I, 0.0f);
    }
    Tensor dgate = Tensor::empty(s), dup = Tensor::empty(s), dscale = Tensor::empty({R});
    cpu().swiglu_scaled_backward(dgate, dup, dscale, dout, gate, up, scale);
    for (DType d : {DType::F32, DType::BF16}) {
      SCOPED_TRACE(dtype_name(d));
      Tensor gdg = poisoned(s, d), gdu = poisoned(s, d), gds = poisoned({R});
      gpu().swiglu_scaled_backward(gdg, gdu, gds, dev(as(dout, d)), dev(as(gate, d)),
                                   dev(as(up, d)), dev(scale));
      const double tol = kF32Tol + (d == DType::BF16 ? std::ldexp(1.0, -8) : 0.0);
      EXPECT_CLOSE(gdg, dgate, tol);
      EXPECT_CLOSE(gdu, dup, tol);
      EXPECT_CLOSE(gds, dscale, kF32Tol);
      const Tensor hs = gds.to_host(), hg = gdg.to_host().to_f32();
      for (int64_t r = 0; r < R; r += 5) {
        EXPECT_EQ(hs.f32()[r], 0.0f) << "padding row " << r;
        EXPECT_EQ(max_abs(hg.slice(r, r + 1)), 0.0) << "padding row " << r;
      }
    }
  }
}

// The combine on BF16 expert outputs: x BF16, widened exactly, sums in fp32: the CPU op on the same
// values at kF32Tol; the scatter stays deterministic (two runs bit-equal).
TEST_F(CudaBackendTest, ScatterAddRowsBf16Inputs) {
  const int64_t R = 41, C = 304, N = 157;  // C: the 8-wide paths
  Tensor rows = randint({N}, 0, int32_t(R)), w = randn({N});
  for (int64_t i = 5; i < N; i += 7) rows.i32()[i] = -1;  // padding slots: skipped
  const Tensor src16 = randn({N, C}).to_dtype(DType::BF16), src = src16.to_f32();
  for (const Tensor* wp : std::initializer_list<const Tensor*>{nullptr, &w}) {
    SCOPED_TRACE(wp ? "weighted" : "plain");
    Tensor gw = dev(w);
    Tensor acc = randn({R, C}), gacc = dev(acc), again = dev(acc);
    cpu().scatter_add_rows(acc, src, rows, wp);
    gpu().scatter_add_rows(gacc, dev(src16), dev(rows), wp ? &gw : nullptr);
    EXPECT_CLOSE(gacc, acc, kF32Tol);
    gpu().scatter_add_rows(again, dev(src16), dev(rows), wp ? &gw : nullptr);
    EXPECT_TRUE(bit_equal(gacc, again)) << "scatter is not deterministic";
  }
}

// copy_columns and the MLA k/v split move values (accumulate adds one fp32 term per element on
// both sides; dk_rope sums the heads in head order from 0 on both sides), so the CPU op is the
// oracle to the bit. Shapes that take the 8-wide row kernels (widths and column offsets multiples
// of 8, rows 16-byte aligned) and shapes that take the one-element fallback (an odd width, a
// leading dimension or offset that breaks the alignment); 301 rows span several row batches and
// blocks, and 5 heads leave a partial batch in dk_rope's sum over heads.
TEST_F(CudaBackendTest, CopyColumnsAndMlaSplit) {
  struct CopyCase {
    int64_t rows, dst_cols, dst_col, src_cols, src_col, n;
  };
  for (const CopyCase& c : {CopyCase{19, 40, 7, 23, 3, 17}, CopyCase{301, 40, 8, 24, 16, 8},
                            CopyCase{301, 64, 0, 576, 512, 64}, CopyCase{37, 41, 8, 24, 0, 16},
                            CopyCase{37, 40, 4, 24, 0, 16}}) {
    SCOPED_TRACE(testing::Message()
                 << "copy " << c.rows << " x " << c.n << " from col " << c.src_col << " of "
                 << c.src_cols << " to col " << c.dst_col << " of " << c.dst_cols);
    const Tensor dst = randn({c.rows, c.dst_cols}), src = randn({c.rows, c.src_cols});
    for (bool acc : {false, true}) {
      Tensor d = dst.clone(), gd = dev(dst);
      cpu().copy_columns(d, c.dst_col, src, c.src_col, c.n, acc);
      gpu().copy_columns(gd, c.dst_col, dev(src), c.src_col, c.n, acc);
      EXPECT_TRUE(bit_equal(gd, d)) << "accumulate " << acc;
    }
  }
  struct SplitCase {
    int64_t T, H, dn, dr, dv;
  };
  for (const SplitCase& c : {SplitCase{21, 3, 16, 8, 12}, SplitCase{301, 5, 32, 16, 24},
                             SplitCase{23, 4, 128, 64, 128}}) {
    const int64_t T = c.T, H = c.H, dn = c.dn, dr = c.dr, dv = c.dv;
    SCOPED_TRACE(testing::Message()
                 << "split T " << T << " H " << H << " dn " << dn << " dr " << dr << " dv " << dv);
    Tensor kv_b = randn({T, H * (dn + dv)}), k_rope = randn({T, dr});
    Tensor k = Tensor::empty({T, H, dn + dr}), v = Tensor::empty({T, H, dv});
    Tensor gk = poisoned(k.shape()), gv = poisoned(v.shape());
    cpu().mla_split_kv(k, v, kv_b, k_rope, H, dn, dr, dv);
    gpu().mla_split_kv(gk, gv, dev(kv_b), dev(k_rope), H, dn, dr, dv);
    EXPECT_TRUE(bit_equal(gk, k)) << "k";
    EXPECT_TRUE(bit_equal(gv, v)) << "v";
    Tensor dk = randn(k.shape()), dvv = randn(v.shape());
    Tensor dkv_b = Tensor::empty(kv_b.shape()), dk_rope = Tensor::empty(k_rope.shape());
    Tensor gdkv_b = poisoned(kv_b.shape()), gdk_rope = poisoned(k_rope.shape());
    cpu().mla_split_kv_backward(dkv_b, dk_rope, dk, dvv, H, dn, dr, dv);
    gpu().mla_split_kv_backward(gdkv_b, gdk_rope, dev(dk), dev(dvv), H, dn, dr, dv);
    EXPECT_TRUE(bit_equal(gdkv_b, dkv_b)) << "dkv_b";
    EXPECT_TRUE(bit_equal(gdk_rope, dk_rope)) << "dk_rope";
    // BF16 outputs (MLA under Bf16): the F32 results rounded once, to the bit (host rounding is
    // round-to-nearest-even as the kernels'); dk_rope stays F32 and unchanged.
    const Tensor k16 = k.to_dtype(DType::BF16), v16 = v.to_dtype(DType::BF16);
    Tensor bk = poisoned(k.shape(), DType::BF16), bv = poisoned(v.shape(), DType::BF16);
    gpu().mla_split_kv(bk, bv, dev(kv_b), dev(k_rope), H, dn, dr, dv);
    EXPECT_TRUE(bit_equal(bk.to_host(), k16)) << "k";
    EXPECT_TRUE(bit_equal(bv.to_host(), v16)) << "v";
    Tensor bdkv_b = poisoned(kv_b.shape(), DType::BF16), bdk_rope = poisoned(k_rope.shape());
    gpu().mla_split_kv_backward(bdkv_b, bdk_rope, dev(dk), dev(dvv), H, dn, dr, dv);
    EXPECT_TRUE(bit_equal(bdkv_b.to_host(), dkv_b.to_dtype(DType::BF16))) << "dkv_b";
    EXPECT_TRUE(bit_equal(bdk_rope, gdk_rope)) << "dk_rope";
    // A BF16 kv_b (the kv_b GEMM's output under the bf16 attention): into BF16 k and v the
    // split copies, giving exactly the F32 kv_b's split rounded; into F32 k and v it widens,
    // giving the CPU split of the rounded kv_b.
    const Tensor kv_b16 = kv_b.to_dtype(DType::BF16);
    Tensor ck = poisoned(k.shape(), DType::BF16), cv = poisoned(v.shape(), DType::BF16);
    gpu().mla_split_kv(ck, cv, dev(kv_b16), dev(k_rope), H, dn, dr, dv);
    EXPECT_TRUE(bit_equal(ck.to_host(), k16)) << "k from BF16 kv_b";
    EXPECT_TRUE(bit_equal(cv.to_host(), v16)) << "v from BF16 kv_b";
    Tensor wk = Tensor::empty(k.shape()), wv = Tensor::empty(v.shape());
    cpu().mla_split_kv(wk, wv, kv_b16.to_f32(), k_rope, H, dn, dr, dv);
    Tensor fk = poisoned(k.shape()), fv = poisoned(v.shape());
    gpu().mla_split_kv(fk, fv, dev(kv_b16), dev(k_rope), H, dn, dr, dv);
    EXPECT_TRUE(bit_equal(fk, wk)) << "F32 k from BF16 kv_b";
    EXPECT_TRUE(bit_equal(fv, wv)) << "F32 v from BF16 kv_b";
  }
  EXPECT_TRUE(gpu().supports(Op::MlaSplitKv, DType::BF16));
  EXPECT_FALSE(cpu().supports(Op::MlaSplitKv, DType::BF16));
}

// Attention under Bf16 with q, k, v given as BF16 (a layer rounded them once) against the same
// op on their F32 values: the bf16 path rounds F32 inputs to exactly those values, so out, lse and
// every gradient are bit-identical (whichever kernels run). A BF16 input under Fp32 is refused.
TEST_F(CudaBackendTest, AttentionTakesBf16InputsUnderBf16) {
  const int64_t B = 2, S = 37, H = 3, dqk = 48, dv = 32;
  const float scale = 0.2f;
  const Tensor q = dev(randn({B * S, H, dqk})), k = dev(randn({B * S, H, dqk}));
  const Tensor v = dev(randn({B * S, H, dv})), dout = dev(randn({B * S, H, dv}));
  const Tensor q16 = q.to_host().to_dtype(DType::BF16).to_device(Device::CUDA);
  const Tensor k16 = k.to_host().to_dtype(DType::BF16).to_device(Device::CUDA);
  const Tensor v16 = v.to_host().to_dtype(DType::BF16).to_device(Device::CUDA);
  struct Run {
    Tensor out, lse, dq, dk, dv;
  };
  auto run = [&](const Tensor& qi, const Tensor& ki, const Tensor& vi) {
    PrecisionScope bf16(gpu(), Precision::Bf16);
    Run r{poisoned({B * S, H, dv}), poisoned({B, H, S}), poisoned({B * S, H, dqk}),
          poisoned({B * S, H, dqk}), poisoned({B * S, H, dv})};
    gpu().attention_forward(r.out, r.lse, qi, ki, vi, B, S, H, scale);
    gpu().attention_backward(r.dq, r.dk, r.dv, dout, r.out, r.lse, qi, ki, vi, B, S, H, scale);
    return r;
  };
  const Run a = run(q, k, v), b = run(q16, k16, v16);
  EXPECT_TRUE(bit_equal(a.out, b.out) && bit_equal(a.lse, b.lse)) << "forward";
  EXPECT_TRUE(bit_equal(a.dq, b.dq) && bit_equal(a.dk, b.dk) && bit_equal(a.dv, b.dv))
      << "backward";
  Tensor out = poisoned({B * S, H, dv}), lse = poisoned({B, H, S});
  EXPECT_THROW(gpu().attention_forward(out, lse, q16, k16, v16, B, S, H, scale), Error);
}

struct GateCase {
  const char* name;
  GateParams p;
  bool bias;
};

TEST_F(CudaBackendTest, MoeGateEveryMethod) {
  auto gp = [](ScoringFunc s, TopkMethod m, int64_t E, int64_t K, int64_t G, int64_t TG, bool norm,
               float scaling) {
    GateParams p;
    p.scoring = s;
    p.method = m;
    p.n_experts = E;
    p.top_k = K;
    p.n_group = G;
    p.topk_group = TG;
    p.norm_topk_prob = norm;
    p.routed_scaling_factor = scaling;
    return p;
  };
  using S = ScoringFunc;
  using M = TopkMethod;
  const GateCase cases[] = {
      {"softmax greedy (V2-Lite)", gp(S::Softmax, M::Greedy, 64, 6, 1, 1, false, 1.0f), false},
      {"softmax greedy normalised", gp(S::Softmax, M::Greedy, 37, 5, 1, 1, true, 1.0f), false},
      {"softmax group_limited (V2)",
       gp(S::Softmax, M::GroupLimitedGreedy, 160, 6, 8, 3, false, 16.0f), false},
      {"sigmoid noaux_tc + bias (V3)", gp(S::Sigmoid, M::NoauxTc, 256, 8, 8, 4, true, 2.5f), true},
      {"sigmoid greedy + bias", gp(S::Sigmoid, M::Greedy, 16, 4, 1, 1, true, 1.0f), true},
      {"sigmoid noaux_tc, top_k 1", gp(S::Sigmoid, M::NoauxTc, 24, 1, 4, 2, true, 1.5f), true},
      // One warp per token (no group selection, E <= 256): the most experts it holds, a method
      // with groups but only one group, and one expert past its reach (the block kernel).
      {"sigmoid greedy + bias, 256", gp(S::Sigmoid, M::Greedy, 256, 8, 1, 1, true, 2.5f), true},
      {"softmax group_limited, one group",
       gp(S::Softmax, M::GroupLimitedGreedy, 100, 6, 1, 1, false, 16.0f), false},
      {"softmax greedy, 257", gp(S::Softmax, M::Greedy, 257, 6, 1, 1, true, 1.0f), false},
  };
  for (const int64_t T : {int64_t(1), int64_t(77)})  // a decode step; several warps and blocks
    for (const GateCase& c : cases) {
      SCOPED_TRACE(testing::Message() << c.name << ", T " << T);
      const int64_t E = c.p.n_experts, K = c.p.top_k;
      Tensor logits = randn({T, E}, 2.0f);
      Tensor bias = c.bias ? randn({E}, 0.1f) : Tensor();
      Tensor idx = Tensor::empty({T, K}, DType::I32), w = Tensor::empty({T, K});
      Tensor scores = Tensor::empty({T, E});
      Tensor gidx = poisoned({T, K}, DType::I32), gw = poisoned({T, K}), gscores = poisoned({T, E});
      cpu().moe_gate_forward(idx, w, scores, logits, bias, c.p);
      gpu().moe_gate_forward(gidx, gw, gscores, dev(logits), c.bias ? dev(bias) : Tensor(), c.p);
      expect_equal_i32(gidx, idx);
      EXPECT_CLOSE(gw, w, kF32Tol);
      EXPECT_CLOSE(gscores, scores, kF32Tol);
      for (bool with_dscores : {false, true}) {
        Tensor dw = randn({T, K});
        Tensor dscores = with_dscores ? randn({T, E}) : Tensor();
        Tensor dlogits = Tensor::empty({T, E}), gdlogits = poisoned({T, E});
        cpu().moe_gate_backward(dlogits, dw, idx, scores, dscores, c.p);
        gpu().moe_gate_backward(gdlogits, dev(dw), gidx, gscores,
                                with_dscores ? dev(dscores) : Tensor(), c.p);
        EXPECT_CLOSE(gdlogits, dlogits, kF32Tol);
      }
    }
}

// The permute plan is integer bookkeeping plus a copy of the weights: bit-equal to the CPU's.
// Cases: every expert used, most experts empty (only every fourth drawn), a single expert, and
// more pairs than the 256-thread blocks.
TEST_F(CudaBackendTest, MoeDispatchPlanEqualsCpu) {
  struct Case {
    int64_t T, K, E, stride;
  };
  for (const Case& c : {Case{77, 6, 37, 1}, Case{301, 8, 64, 4}, Case{33, 1, 1, 1},
                        Case{1, 2, 3, 1}, Case{1500, 6, 1100, 1}})
    for (const int64_t align : {1, 8, 128}) {  // 1100 experts: more than the offsets' block
      SCOPED_TRACE(testing::Message()
                   << "T " << c.T << " K " << c.K << " E " << c.E << " align " << align);
      const int64_t N = c.T * c.K, S = dispatch_slots(N, c.E, align);
      Tensor idx = randint({c.T, c.K}, 0, int32_t((c.E - 1) / c.stride + 1)), w = randn({c.T, c.K});
      for (int64_t i = 0; i < N; ++i) idx.i32()[i] *= int32_t(c.stride);
      Tensor tok = Tensor::empty({S}, DType::I32), pair = Tensor::empty({S}, DType::I32);
      Tensor sw = Tensor::empty({S}), begin = Tensor::empty({c.E + 1}, DType::I32);
      Tensor loads = Tensor::empty({c.E}, DType::I32);
      cpu().moe_dispatch_plan(tok, pair, sw, begin, loads, idx, w, c.E, align);
      Tensor gtok = poisoned({S}, DType::I32), gpair = poisoned({S}, DType::I32);
      Tensor gsw = poisoned({S}), gbegin = poisoned({c.E + 1}, DType::I32);
      Tensor gloads = poisoned({c.E}, DType::I32);
      gpu().moe_dispatch_plan(gtok, gpair, gsw, gbegin, gloads, dev(idx), dev(w), c.E, align);
      expect_equal_i32(gtok, tok);
      expect_equal_i32(gpair, pair);
      expect_equal_i32(gbegin, begin);
      expect_equal_i32(gloads, loads);
      EXPECT_TRUE(bit_equal(gsw, sw));
    }
  Tensor bad = randint({5, 2}, 0, 4), w = randn({5, 2});
  bad.i32()[7] = 4;
  Tensor t = poisoned({10}, DType::I32), p = poisoned({10}, DType::I32), sw = poisoned({10});
  Tensor b = poisoned({5}, DType::I32), loads = poisoned({4}, DType::I32);
  // Index errors surface at the next read-back (the check does not wait for the GPU).
  EXPECT_THROW(
      {
        gpu().moe_dispatch_plan(t, p, sw, b, loads, dev(bad), dev(w), 4, 1);
        (void)b.to_host();
      },
      Error);
}

TEST_F(CudaBackendTest, GroupedMatmulF32AndTf32) {
  const std::vector<int64_t> sizes{0, 13, 1, 40, 0, 7, 22, 0};
  const std::vector<int64_t> begin = group_offsets(sizes);
  const int64_t R = begin.back();
  // (K, N) odd and multiples of 4 (where the FAST_TF32 grouped call needs 16-byte aligned row
  // blocks); `shifted`: a starts one float into its buffer, which sends the TF32 case with
  // K % 4 == 0 to the per-group fallback.
  for (auto [K, N] : {std::pair<int64_t, int64_t>{71, 53}, {72, 52}})
    for (bool trans_b : {false, true})
      for (float beta : {0.0f, 1.0f})
        for (bool shifted : {false, true}) {
          SCOPED_TRACE(testing::Message() << "K " << K << " N " << N << " trans_b " << trans_b
                                          << " beta " << beta << " shifted " << shifted);
          Tensor a = randn({R, K});
          std::vector<Tensor> w, wd;
          std::vector<const Tensor*> wc, wg;
          for (size_t g = 0; g < sizes.size(); ++g) {
            w.push_back(randn(trans_b ? Shape{N, K} : Shape{K, N}));
            wd.push_back(dev(w.back()));
          }
          for (size_t g = 0; g < sizes.size(); ++g) {
            wc.push_back(&w[g]);
            wg.push_back(&wd[g]);
          }
          Tensor c = randn({R, N}), ref = c.clone();
          cpu().grouped_matmul(ref, a, wc, begin, trans_b, beta);
          Tensor ga = dev(a);
          if (shifted) {
            Tensor buf = Tensor::empty({R * K + 1}, DType::F32, Device::CUDA);
            ga = buf.slice(1, R * K + 1).reshape({R, K});
            ga.copy_from(a);
          }
          Tensor gc = beta == 0.0f ? poisoned({R, N}) : dev(c);
          gpu().grouped_matmul(gc, ga, wg, begin, trans_b, beta);
          EXPECT_CLOSE(gc, ref, kF32Tol);
          // TF32 inputs keep 10 mantissa bits (relative rounding <= 2^-10 when truncated, so a
          // product <= 2^-9); over K terms of random sign as for bf16 above: 2^-9 sqrt(K).
          Tensor gt = beta == 0.0f ? poisoned({R, N}) : dev(c);
          gpu().set_precision(Precision::Tf32);
          gpu().grouped_matmul(gt, ga, wg, begin, trans_b, beta);
          gpu().set_precision(Precision::Fp32);
          EXPECT_CLOSE(gt, ref, std::ldexp(1.0, -9) * std::sqrt(double(K)));
        }
  EXPECT_EQ(gpu().precision(), Precision::Fp32);
}

// BF16 weights (frozen experts) mixed with F32 ones, and all-F32 weights under the Bf16
// precision: the whole group runs in bf16 with fp32 accumulation, so the CPU grouped GEMM of the
// same bf16-rounded inputs is the oracle. cuBLAS's grouped GEMM writes bf16 products (then added
// into the fp32 output), so each element also carries one bf16 rounding: <= 2^-8 of itself,
// hence of max |c|; with beta = 1 the fp32 addition adds nothing measurable.
TEST_F(CudaBackendTest, GroupedMatmulBf16WeightsAndBf16Precision) {
  const std::vector<int64_t> sizes{9, 0, 1, 31, 5, 0, 17};
  const std::vector<int64_t> begin = group_offsets(sizes);
  const int64_t R = begin.back(), K = 45, N = 67;
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  for (bool trans_b : {false, true})
    for (bool mixed : {true, false}) {
      SCOPED_TRACE(testing::Message()
                   << "trans_b " << trans_b << (mixed ? " bf16 weights" : " Bf16 precision"));
      Tensor a = randn({R, K});
      std::vector<Tensor> w_ref, w_gpu;
      for (size_t g = 0; g < sizes.size(); ++g) {
        Tensor w = randn(trans_b ? Shape{N, K} : Shape{K, N});
        w_ref.push_back(rounded(w));
        // Mixed: every other group's weight is stored in BF16; otherwise all stay F32.
        w_gpu.push_back(mixed && g % 2 == 0 ? dev(w.to_dtype(DType::BF16)) : dev(w));
      }
      std::vector<const Tensor*> wc, wg;
      for (size_t g = 0; g < sizes.size(); ++g) {
        wc.push_back(&w_ref[g]);
        wg.push_back(&w_gpu[g]);
      }
      for (float beta : {0.0f, 1.0f}) {
        Tensor c = randn({R, N}), ref = c.clone();
        cpu().grouped_matmul(ref, rounded(a), wc, begin, trans_b, beta);
        Tensor gc = beta == 0.0f ? poisoned({R, N}) : dev(c);
        if (!mixed) gpu().set_precision(Precision::Bf16);
        gpu().grouped_matmul(gc, dev(a), wg, begin, trans_b, beta);
        gpu().set_precision(Precision::Fp32);
        EXPECT_CLOSE(gc, ref, kF32Tol + std::ldexp(1.0, -8));
      }
    }
  EXPECT_EQ(gpu().precision(), Precision::Fp32);
}

// The MoE layer's bf16 activations in the grouped GEMM: a BF16 (used as it is) against mixed F32 /
// BF16 weights under the Fp32 precision (a BF16 operand puts the whole call on bf16, the F32
// weights rounded: they hold bf16 values here, so rounding is exact); c BF16 with beta 0 (the
// products written as they are, rounded once) or F32 with beta 0 or 1 (the bf16 products added).
// Oracle: the CPU grouped GEMM of the same values in fp32: exact products, fp32 sums (kF32Tol),
// plus one bf16 rounding per product, <= 2^-8 of the element, so of max |c|. Empty groups, odd K
// and N, both layouts of b; a BF16 c with beta != 0 is refused.
TEST_F(CudaBackendTest, GroupedMatmulBf16ActivationsAndOutput) {
  const std::vector<int64_t> sizes{9, 0, 1, 31, 5, 0, 17};
  const std::vector<int64_t> begin = group_offsets(sizes);
  const int64_t R = begin.back(), K = 45, N = 67;
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  for (bool trans_b : {false, true}) {
    const Tensor a16 = randn({R, K}).to_dtype(DType::BF16);
    std::vector<Tensor> w_ref, w_gpu;
    for (size_t g = 0; g < sizes.size(); ++g) {
      w_ref.push_back(rounded(randn(trans_b ? Shape{N, K} : Shape{K, N})));
      w_gpu.push_back(g % 2 == 0 ? dev(w_ref.back().to_dtype(DType::BF16)) : dev(w_ref.back()));
    }
    std::vector<const Tensor*> wc, wg;
    for (size_t g = 0; g < sizes.size(); ++g) {
      wc.push_back(&w_ref[g]);
      wg.push_back(&w_gpu[g]);
    }
    for (DType out : {DType::BF16, DType::F32})
      for (float beta : {0.0f, 1.0f}) {
        if (out == DType::BF16 && beta != 0.0f) continue;
        SCOPED_TRACE(testing::Message()
                     << "trans_b " << trans_b << " c " << dtype_name(out) << " beta " << beta);
        Tensor c = randn({R, N}), ref = c.clone();
        cpu().grouped_matmul(ref, a16.to_f32(), wc, begin, trans_b, beta);
        Tensor gc = beta == 0.0f ? poisoned({R, N}, out) : dev(c);
        gpu().grouped_matmul(gc, dev(a16), wg, begin, trans_b, beta);
        ASSERT_EQ(gc.dtype(), out);
        EXPECT_CLOSE(gc, ref, kF32Tol + std::ldexp(1.0, -8));
      }
    Tensor gc = poisoned({R, N}, DType::BF16);
    expect_error_containing([&] { gpu().grouped_matmul(gc, dev(a16), wg, begin, trans_b, 1.0f); },
                            "beta");
  }
  EXPECT_EQ(gpu().precision(), Precision::Fp32);
}

// grouped_matmul_sum, the experts' dx = dgate W_gate + dup W_up: two terms over the same groups
// into an F32 c, beta 0 (over NaN) and 1. bf16 (BF16 rows, mixed weights): one grouped GEMM over
// both terms' groups and one pass c = beta c + p1 + p2 with each product rounded to bf16, so an
// element is off by <= 2^-8 (|p1| + |p2|); against max |p1 + p2| (two independent random terms:
// max |p1| + max |p2| is about sqrt(2) times it) that is about 1.4 x 2^-8, hence 2 x 2^-8 +
// kF32Tol. All F32 under the Fp32 precision: term by term in fp32, kF32Tol. The oracle is the CPU
// op (two grouped GEMMs) on the same values.
TEST_F(CudaBackendTest, GroupedMatmulSumOfTwoTerms) {
  const std::vector<int64_t> sizes{12, 0, 3, 27, 1, 0, 19};
  const std::vector<int64_t> begin = group_offsets(sizes);
  const int64_t R = begin.back(), K = 37, N = 53;
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  for (bool bf16 : {true, false}) {
    const Tensor a1 = rounded(randn({R, K})), a2 = rounded(randn({R, K}));
    std::vector<Tensor> w_ref, w_gpu;  // [term 1 groups..., term 2 groups...]
    for (size_t g = 0; g < 2 * sizes.size(); ++g) {
      w_ref.push_back(rounded(randn({K, N})));
      w_gpu.push_back(bf16 && g % 3 == 0 ? dev(w_ref.back().to_dtype(DType::BF16))
                                         : dev(w_ref.back()));
    }
    std::vector<const Tensor*> w1c, w2c, w1g, w2g;
    for (size_t g = 0; g < sizes.size(); ++g) {
      w1c.push_back(&w_ref[g]);
      w2c.push_back(&w_ref[sizes.size() + g]);
      w1g.push_back(&w_gpu[g]);
      w2g.push_back(&w_gpu[sizes.size() + g]);
    }
    const DType act = bf16 ? DType::BF16 : DType::F32;
    const Tensor g1 = dev(bf16 ? a1.to_dtype(DType::BF16) : a1);
    const Tensor g2 = dev(bf16 ? a2.to_dtype(DType::BF16) : a2);
    ASSERT_EQ(g1.dtype(), act);
    const GroupedTerm cpu_terms[] = {{&a1, w1c}, {&a2, w2c}};
    const GroupedTerm gpu_terms[] = {{&g1, w1g}, {&g2, w2g}};
    for (float beta : {0.0f, 1.0f}) {
      SCOPED_TRACE(testing::Message() << (bf16 ? "bf16" : "fp32") << " beta " << beta);
      Tensor c = randn({R, N}), ref = c.clone();
      cpu().grouped_matmul_sum(ref, cpu_terms, begin, false, beta);
      Tensor gc = beta == 0.0f ? poisoned({R, N}) : dev(c);
      gpu().grouped_matmul_sum(gc, gpu_terms, begin, false, beta);
      EXPECT_CLOSE(gc, ref, kF32Tol + (bf16 ? 2.0 * std::ldexp(1.0, -8) : 0.0));
    }
  }
}

// Groups whose rows are multiples of 128 (a padded dispatch plan) take the batched path: one
// batched GEMM per group size. Under the Bf16 precision, against the CPU op on the same
// bf16-rounded values: the products are exact in fp32 and summed in fp32, so an F32 c (one term,
// beta 0 or 1, or the two-term sum) is within kF32Tol: the batched GEMM writes fp32 sums, not
// bf16-rounded products as cuBLAS's grouped GEMM did (with MOEKIT_CUDA_EXPERT_GEMM=grouped the
// padded groups take that path, and the tolerance allows its per-product rounding). A BF16 c adds
// one rounding, <= 2^-8. K and N odd and even; F32 and BF16 weights mixed.
TEST_F(CudaBackendTest, GroupedMatmulBatchedOnPaddedGroups) {
  const std::vector<int64_t> sizes{128, 0, 256, 128, 384, 0, 128};
  const std::vector<int64_t> begin = group_offsets(sizes);
  const int64_t R = begin.back();
  const char* mode = std::getenv("MOEKIT_CUDA_EXPERT_GEMM");
  const double product_rounding =
      mode && std::string(mode) == "grouped" ? 2.0 * std::ldexp(1.0, -8) : 0.0;
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  for (const auto& [K, N] : {std::pair<int64_t, int64_t>{72, 56}, {45, 67}})
    for (bool trans_b : {false, true}) {
      std::vector<Tensor> w_ref, w_gpu;  // [term 1 groups..., term 2 groups...]
      for (size_t g = 0; g < 2 * sizes.size(); ++g) {
        w_ref.push_back(rounded(randn(trans_b ? Shape{N, K} : Shape{K, N})));
        w_gpu.push_back(g % 2 == 0 ? dev(w_ref.back().to_dtype(DType::BF16)) : dev(w_ref.back()));
      }
      std::vector<const Tensor*> w1c, w2c, w1g, w2g;
      for (size_t g = 0; g < sizes.size(); ++g) {
        w1c.push_back(&w_ref[g]);
        w2c.push_back(&w_ref[sizes.size() + g]);
        w1g.push_back(&w_gpu[g]);
        w2g.push_back(&w_gpu[sizes.size() + g]);
      }
      const Tensor a1 = randn({R, K}), a2 = randn({R, K}).to_dtype(DType::BF16);
      const Tensor g1 = dev(a1), g2 = dev(a2), r1 = rounded(a1), r2 = a2.to_f32();
      gpu().set_precision(Precision::Bf16);
      for (DType out : {DType::BF16, DType::F32})
        for (float beta : {0.0f, 1.0f}) {
          if (out == DType::BF16 && beta != 0.0f) continue;
          SCOPED_TRACE(testing::Message() << "K " << K << " N " << N << " trans_b " << trans_b
                                          << " c " << dtype_name(out) << " beta " << beta);
          Tensor c = randn({R, N}), ref = c.clone();
          cpu().grouped_matmul(ref, r1, w1c, begin, trans_b, beta);
          Tensor gc = beta == 0.0f ? poisoned({R, N}, out) : dev(c);
          gpu().grouped_matmul(gc, g1, w1g, begin, trans_b, beta);
          EXPECT_CLOSE(gc, ref,
                       kF32Tol + (out == DType::BF16 ? std::ldexp(1.0, -8) : product_rounding));
          if (out == DType::BF16) continue;
          const GroupedTerm cpu_terms[] = {{&r1, w1c}, {&r2, w2c}};
          const GroupedTerm gpu_terms[] = {{&g1, w1g}, {&g2, w2g}};
          Tensor sum_ref = c.clone(), gsum = beta == 0.0f ? poisoned({R, N}) : dev(c);
          cpu().grouped_matmul_sum(sum_ref, cpu_terms, begin, trans_b, beta);
          gpu().grouped_matmul_sum(gsum, gpu_terms, begin, trans_b, beta);
          EXPECT_CLOSE(gsum, sum_ref, kF32Tol + product_rounding);
        }
      gpu().set_precision(Precision::Fp32);
    }
  EXPECT_EQ(gpu().expert_row_alignment(8192 * 6, 64), 1) << "padding under the Fp32 precision";
  gpu().set_precision(Precision::Bf16);
  const int64_t padded = gpu().expert_row_alignment(8192 * 6, 64);
  const int64_t few = gpu().expert_row_alignment(64, 64);
  gpu().set_precision(Precision::Fp32);
  EXPECT_EQ(few, 1) << "padding at one row per expert";
  if (!mode || std::string(mode) == "batched") {
    EXPECT_EQ(padded, 128);
  }
}

// grouped_weight_grad, the routed experts' dw_g += dy_g^T x_g, against the CPU op (one matmul per
// group) on the same values; dw starts from random values (beta 1). Padded blocks (rows multiples
// of 128) with bf16 in play (the Bf16 precision or a BF16 operand) take one batched GEMM per block
// size: dy and x each F32 (rounded by the op) or BF16, against the CPU op on the bf16-rounded
// values, whose products are exact in fp32 and summed in fp32 on both sides: kF32Tol (as for
// grouped_matmul's batched path; the reductions here run over up to 384 rows). Unpadded blocks
// take the per-group loop, same oracle and tolerance. Padded blocks with F32 operands under the
// Fp32 precision stay in fp32: against the unrounded values at kF32Tol (a bf16 GEMM would be off
// by ~2^-8). A null dw (frozen expert) is skipped, also with rows (and then the other blocks may
// be unpadded: only the selected ones count); an empty group's dw stays bit for bit.
TEST_F(CudaBackendTest, GroupedWeightGradBatchedOnPaddedGroups) {
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  auto check = [&](const std::vector<int64_t>& sizes, const std::set<size_t>& frozen, int64_t N,
                   int64_t K, DType dy_type, DType x_type, Precision precision) {
    SCOPED_TRACE(testing::Message() << "rows " << testing::PrintToString(sizes) << " N " << N
                                    << " K " << K << " dy " << dtype_name(dy_type) << " x "
                                    << dtype_name(x_type) << " precision " << int(precision));
    std::vector<int64_t> begin{0};
    for (int64_t n : sizes) begin.push_back(begin.back() + n);
    const int64_t R = begin.back();
    const bool bf16 =
        precision == Precision::Bf16 || dy_type == DType::BF16 || x_type == DType::BF16;
    const Tensor dy = randn({R, N}), x = randn({R, K});
    const Tensor dy_ref = bf16 ? rounded(dy) : dy, x_ref = bf16 ? rounded(x) : x;
    std::vector<Tensor> dw0, ref, out;
    for (size_t g = 0; g < sizes.size(); ++g) {
      dw0.push_back(randn({N, K}));
      ref.push_back(dw0.back().clone());
      out.push_back(dev(dw0.back()));
    }
    std::vector<Tensor*> pc, pg;
    for (size_t g = 0; g < sizes.size(); ++g) {
      pc.push_back(frozen.count(g) ? nullptr : &ref[g]);
      pg.push_back(frozen.count(g) ? nullptr : &out[g]);
    }
    cpu().grouped_weight_grad(pc, dy_ref, x_ref, begin);
    gpu().set_precision(precision);
    gpu().grouped_weight_grad(pg, dev(dy.to_dtype(dy_type)), dev(x.to_dtype(x_type)), begin);
    gpu().set_precision(Precision::Fp32);
    double worst = 0.0;
    for (size_t g = 0; g < sizes.size(); ++g) {
      if (!pg[g]) continue;
      if (sizes[g] == 0)
        EXPECT_TRUE(bit_equal(out[g], dw0[g])) << "empty group " << g << " changed";
      else
        worst = std::max(worst, rel_error(out[g], ref[g]));
    }
    EXPECT_LE(worst, kF32Tol);
    std::printf("    %-44s rel err %.3g (tol %.3g)\n", "dw (worst group)", worst, kF32Tol);
  };
  const std::vector<int64_t> padded{128, 0, 256, 128, 384, 0, 128, 256};
  const std::set<size_t> frozen{3, 5};  // one with rows, one without
  const std::pair<DType, DType> operands[] = {{DType::F32, DType::F32},
                                              {DType::BF16, DType::F32},
                                              {DType::F32, DType::BF16},
                                              {DType::BF16, DType::BF16}};
  for (const auto& [N, K] : {std::pair<int64_t, int64_t>{56, 72}, {67, 45}}) {
    for (const auto& [dy_type, x_type] : operands)
      check(padded, frozen, N, K, dy_type, x_type, Precision::Bf16);
    // A BF16 operand alone puts the op in bf16; F32 operands under Fp32 stay exact.
    check(padded, frozen, N, K, DType::BF16, DType::BF16, Precision::Fp32);
    check(padded, frozen, N, K, DType::F32, DType::F32, Precision::Fp32);
    // Only the selected blocks must be padded: the frozen block of 100 rows does not count.
    check({128, 0, 256, 100, 384}, {3}, N, K, DType::BF16, DType::BF16, Precision::Bf16);
    // Unpadded blocks (a plan without padding): the per-group loop.
    for (const auto& [dy_type, x_type] : operands)
      check({9, 0, 1, 31, 17, 5}, {2}, N, K, dy_type, x_type, Precision::Bf16);
    check({9, 0, 1, 31, 17, 5}, {2}, N, K, DType::F32, DType::F32, Precision::Fp32);
  }
  EXPECT_EQ(gpu().precision(), Precision::Fp32);
}

// The few-token experts (decode's GEMVs) against the CPU op, on random routing: distinct experts
// within a token (as the gate picks them), shifted per token so that tokens share experts. Weights
// all F32, or all BF16 against the CPU op on the same bf16-rounded weights in fp32: a bf16 weight
// is exact in fp32, so both sides form the same fp32 products and differ only in summation order
// (per-thread partial sums + fixed trees vs a loop, topk_w applied to h before the down dot
// product instead of after): kF32Tol as for any fp32 op. The Bf16 precision must not change the
// op (weights read as stored, x stays fp32): same tolerance under it. Outputs poisoned when
// assigned; two runs bit-identical (no atomics). shifted: every weight a view one element past a
// 16-byte boundary (the kernels' element-by-element paths although I is a multiple of 8).
// shared_inter > 0: shared experts of that width too (gate, up [Is, H], down [H, Is], the routed
// experts' dtype, placed alike), on both sides; the same reasoning and tolerance (their products
// are again exact on both sides, their term one more fp32 sum in another order).
void CudaBackendTest::check_experts_small(const SmallCase& c, DType dtype, bool shifted,
                                          int64_t shared_inter) {
  SCOPED_TRACE(testing::Message() << "T " << c.T << " K " << c.K << " E " << c.E << " H " << c.H
                                  << " I " << c.I << " Is " << shared_inter << " "
                                  << dtype_name(dtype) << (shifted ? " shifted" : ""));
  auto place = [&](const Tensor& w) {  // the device copy in the stored dtype
    const Tensor stored = dtype == DType::BF16 ? w.to_dtype(DType::BF16) : w;
    if (!shifted) return dev(stored);
    Tensor flat = Tensor::zeros({stored.numel() + 1}, dtype, Device::CUDA);
    Tensor v = flat.slice(1, stored.numel() + 1).reshape(stored.shape());
    v.copy_from(dev(stored));
    return v;
  };
  std::vector<Tensor> ref_w, gpu_w;  // per expert: gate, up, down
  for (int64_t e = 0; e < c.E; ++e)
    for (Shape s : {Shape{c.I, c.H}, Shape{c.I, c.H}, Shape{c.H, c.I}}) {
      Tensor w = randn(s, 0.3f);
      ref_w.push_back(dtype == DType::BF16 ? w.to_dtype(DType::BF16).to_f32() : w);
      gpu_w.push_back(place(w));
    }
  std::vector<ExpertWeights> ref_e, gpu_e;
  for (size_t e = 0; e < size_t(c.E); ++e) {
    ref_e.push_back({&ref_w[3 * e], &ref_w[3 * e + 1], &ref_w[3 * e + 2]});
    gpu_e.push_back({&gpu_w[3 * e], &gpu_w[3 * e + 1], &gpu_w[3 * e + 2]});
  }
  std::vector<Tensor> ref_sw, gpu_sw;  // the shared experts' gate, up, down
  if (shared_inter > 0)
    for (Shape s : {Shape{shared_inter, c.H}, Shape{shared_inter, c.H}, Shape{c.H, shared_inter}}) {
      Tensor w = randn(s, 0.3f);
      ref_sw.push_back(dtype == DType::BF16 ? w.to_dtype(DType::BF16).to_f32() : w);
      gpu_sw.push_back(place(w));
    }
  const ExpertWeights ref_s =
      shared_inter > 0 ? ExpertWeights{&ref_sw[0], &ref_sw[1], &ref_sw[2]} : ExpertWeights{};
  const ExpertWeights gpu_s =
      shared_inter > 0 ? ExpertWeights{&gpu_sw[0], &gpu_sw[1], &gpu_sw[2]} : ExpertWeights{};
  const ExpertWeights* ref_shared = shared_inter > 0 ? &ref_s : nullptr;
  const ExpertWeights* gpu_shared = shared_inter > 0 ? &gpu_s : nullptr;
  Tensor idx = Tensor::empty({c.T, c.K}, DType::I32), w = randn({c.T, c.K});
  std::vector<int32_t> perm(static_cast<size_t>(c.E));
  for (size_t e = 0; e < perm.size(); ++e) perm[e] = int32_t(e);
  std::shuffle(perm.begin(), perm.end(), rng_);
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t k = 0; k < c.K; ++k) idx.i32()[t * c.K + k] = perm[size_t((t + k) % c.E)];
  const Tensor x = randn({c.T, c.H}), y0 = randn({c.T, c.H});
  for (bool accumulate : {false, true}) {
    Tensor ref = y0.clone();
    cpu().moe_experts_small(ref, x, idx, w, ref_e, accumulate, ref_shared);
    Tensor gy = accumulate ? dev(y0) : poisoned({c.T, c.H});
    gpu().moe_experts_small(gy, dev(x), dev(idx), dev(w), gpu_e, accumulate, gpu_shared);
    EXPECT_CLOSE(gy, ref, kF32Tol);
    Tensor again = accumulate ? dev(y0) : poisoned({c.T, c.H});
    {
      PrecisionScope bf16(gpu(), Precision::Bf16);
      gpu().moe_experts_small(again, dev(x), dev(idx), dev(w), gpu_e, accumulate, gpu_shared);
    }
    EXPECT_TRUE(bit_equal(again, gy)) << "not deterministic, or changed by the precision";
  }
}

// Shapes: H, I odd (every row misaligned for 16-byte loads: the element-by-element loops; H = 37
// also ends in a partial tile of the down pass's 8 outputs) and multiples of 8 (the vector
// loops), one token (decode), three, and ten (60 pairs: the MoE layer's few-token limit), K = 6,
// and K = 10 (more slots than the down pass stages at once); I = 2056 (bf16: 257 chunks, so two
// rounds of chunks per thread of the down pass; fp32 three).
TEST_F(CudaBackendTest, MoeExpertsSmallF32AndBf16Weights) {
  for (const SmallCase& c :
       {SmallCase{1, 6, 9, 37, 23}, SmallCase{3, 6, 9, 37, 23}, SmallCase{1, 6, 16, 72, 48},
        SmallCase{3, 6, 8, 264, 136}, SmallCase{2, 10, 13, 40, 24}, SmallCase{10, 6, 16, 72, 48},
        SmallCase{2, 6, 7, 40, 2056}})
    for (DType dtype : {DType::F32, DType::BF16}) check_experts_small(c, dtype, false);
  // Mixed dtypes are refused (the MoE layer sends them to the grouped GEMMs).
  Tensor g = dev(randn({4, 3})), g16 = dev(randn({4, 3}).to_dtype(DType::BF16));
  Tensor d = dev(randn({3, 4})), x = dev(randn({1, 3})), y = poisoned({1, 3});
  Tensor idx = dev(Tensor::zeros({1, 1}, DType::I32)), w = dev(randn({1, 1}));
  const std::vector<ExpertWeights> mixed{{&g, &g16, &d}};
  EXPECT_THROW(gpu().moe_experts_small(y, x, idx, w, mixed, false), Error);
  // An out-of-range expert surfaces at the next read-back, naming the op.
  const std::vector<ExpertWeights> one{{&g, &g, &d}};
  Tensor bad = Tensor::zeros({1, 1}, DType::I32);
  bad.i32()[0] = 3;
  expect_index_error([&] { gpu().moe_experts_small(y, x, dev(bad), w, one, false); }, y,
                     "moe_experts_small: expert 3 at position 0 out of range [0, 1)");
}

// Every K of 1..8 at the few-token limit (T*K <= 64 pairs), H = 37 (a partial last tile of
// outputs) with I = 48 (vector loops) and I = 23; weights one element off alignment; and
// DeepSeek-V2-Lite's sizes (H 2048, I 1408, K 6: the decode step the down pass was tuned for) at
// one token and at the few-token limit.
TEST_F(CudaBackendTest, MoeExpertsSmallEveryKMisalignedAndV2LiteSizes) {
  for (int64_t K = 1; K <= 8; ++K)
    for (int64_t I : {48, 23}) {
      const SmallCase c{64 / K, K, K + 3, 37, I};
      check_experts_small(c, K % 2 ? DType::BF16 : DType::F32, false);
    }
  for (const SmallCase& c : {SmallCase{1, 6, 9, 72, 48}, SmallCase{3, 8, 10, 37, 136}})
    for (DType dtype : {DType::F32, DType::BF16}) check_experts_small(c, dtype, true);
  for (int64_t T : {1, 10}) check_experts_small({T, 6, 6, 2048, 1408}, DType::BF16, false);
  check_experts_small({1, 6, 6, 2048, 1408}, DType::F32, false);
}

// The shared experts folded into the two kernels: Is != I everywhere (wider, narrower, odd while I
// is a multiple of 8 and the reverse: the shared pass picks its own vector or element loop, and
// its own rounds of chunks per thread), one token to the few-token limit, K = 1, 6 and 10 (more
// slots than the down pass stages at once, then the shared pass), misaligned weights, and
// DeepSeek-V2-Lite's decode sizes (H 2048, routed I 1408, two shared experts fused: Is 2816, K 6;
// 8 experts rather than 64 to keep the host side small) in bf16 and fp32. Tolerance kF32Tol, as
// check_experts_small explains. Then the refusals: shared weights of another dtype than the routed
// ones, or of mismatched shapes, are a one-line error before anything runs.
TEST_F(CudaBackendTest, MoeExpertsSmallWithSharedExperts) {
  for (const SmallCase& c :
       {SmallCase{1, 6, 9, 37, 23}, SmallCase{3, 6, 9, 72, 48}, SmallCase{2, 10, 13, 40, 24},
        SmallCase{10, 6, 16, 72, 48}, SmallCase{5, 1, 4, 264, 136}})
    for (int64_t Is : {c.I * 2, c.I + 5, int64_t(8)})
      for (DType dtype : {DType::F32, DType::BF16}) check_experts_small(c, dtype, false, Is);
  for (DType dtype : {DType::F32, DType::BF16}) {
    check_experts_small({3, 8, 10, 37, 136}, dtype, true, 96);
    check_experts_small({1, 6, 9, 72, 48}, dtype, true, 2056);  // shared rows 43x the routed
  }
  for (int64_t T : {1, 10}) check_experts_small({T, 6, 8, 2048, 1408}, DType::BF16, false, 2816);
  check_experts_small({1, 6, 8, 2048, 1408}, DType::F32, false, 2816);

  Tensor g = dev(randn({4, 3})), d = dev(randn({3, 4}));
  Tensor x = dev(randn({1, 3})), y = poisoned({1, 3});
  Tensor idx = dev(Tensor::zeros({1, 1}, DType::I32)), w = dev(randn({1, 1}));
  const std::vector<ExpertWeights> one{{&g, &g, &d}};
  Tensor sg = dev(randn({5, 3})), sd = dev(randn({3, 5}));
  Tensor sg16 = dev(randn({5, 3}).to_dtype(DType::BF16)), sd_bad = dev(randn({3, 4}));
  const ExpertWeights ok{&sg, &sg, &sd}, bf16_gate{&sg16, &sg, &sd}, bad_down{&sg, &sg, &sd_bad};
  EXPECT_NO_THROW(gpu().moe_experts_small(y, x, idx, w, one, false, &ok));
  for (const ExpertWeights* bad : {&bf16_gate, &bad_down}) {
    expect_error_containing([&] { gpu().moe_experts_small(y, x, idx, w, one, false, bad); },
                            "shared experts");
  }
}

// Out-of-range experts among several tokens: the first one (lowest position) is reported, and
// the kernels use expert 0 in place of each bad entry (as the CPU op on the corrected routing).
TEST_F(CudaBackendTest, MoeExpertsSmallBadExpertsAreReplacedByZero) {
  const int64_t T = 3, K = 6, E = 9, H = 40, I = 24;
  std::vector<Tensor> ws;
  for (int64_t e = 0; e < E; ++e)
    for (Shape s : {Shape{I, H}, Shape{I, H}, Shape{H, I}}) ws.push_back(randn(s, 0.3f));
  std::vector<Tensor> gws;
  for (const Tensor& w : ws) gws.push_back(dev(w));
  std::vector<ExpertWeights> ref_e, gpu_e;
  for (size_t e = 0; e < size_t(E); ++e) {
    ref_e.push_back({&ws[3 * e], &ws[3 * e + 1], &ws[3 * e + 2]});
    gpu_e.push_back({&gws[3 * e], &gws[3 * e + 1], &gws[3 * e + 2]});
  }
  Tensor idx = Tensor::empty({T, K}, DType::I32), w = randn({T, K}), x = randn({T, H});
  for (int64_t i = 0; i < T * K; ++i) idx.i32()[i] = int32_t((i * 5 + 1) % E);
  Tensor bad = idx.clone(), fixed = idx.clone();
  bad.i32()[13] = -2;
  bad.i32()[7] = int32_t(E);
  fixed.i32()[13] = fixed.i32()[7] = 0;
  Tensor y = poisoned({T, H});
  expect_index_error([&] { gpu().moe_experts_small(y, dev(x), dev(bad), dev(w), gpu_e, false); }, y,
                     "moe_experts_small: expert 9 at position 7 out of range [0, 9)");
  Tensor ref = Tensor::empty({T, H});
  cpu().moe_experts_small(ref, x, fixed, w, ref_e, false);
  EXPECT_CLOSE(y, ref, kF32Tol);
}

TEST_F(CudaBackendTest, MatmulBatchedMlaLayouts) {
  // MLA decode's two per-head products, as mla_decode lays them out: W_kb absorbed into q_nope
  // (head blocks of q and of W_kv_b's rows), and W_vb^T applied to the attention context.
  const int64_t n = 5, H = 3, dn = 24, dr = 8, dv = 20, r = 33;
  Tensor q = randn({n, H * (dn + dr)}), w = randn({H * (dn + dv), r});
  const GemmBatch absorb{.count = H,
                         .m = n,
                         .n = r,
                         .k = dn,
                         .lda = H * (dn + dr),
                         .ldb = r,
                         .ldc = H * r,
                         .stride_a = dn + dr,
                         .stride_b = (dn + dv) * r,
                         .stride_c = r};
  Tensor q_lat = Tensor::empty({n * H, r}), gq_lat = poisoned({n * H, r});
  cpu().matmul_batched(q_lat, q, w, false, false, 1.0f, 0.0f, absorb);
  gpu().matmul_batched(gq_lat, dev(q), dev(w), false, false, 1.0f, 0.0f, absorb);
  EXPECT_CLOSE(gq_lat, q_lat, kF32Tol);
  const GemmBatch value{.count = H,
                        .m = n,
                        .n = dv,
                        .k = r,
                        .lda = H * r,
                        .ldb = r,
                        .ldc = H * dv,
                        .stride_a = r,
                        .stride_b = (dn + dv) * r,
                        .stride_c = dv};
  Tensor ctx = randn({n * H, r}), o = randn({n, H * dv}), go = dev(o);
  const Tensor w_v = w.slice(dn, H * (dn + dv));
  cpu().matmul_batched(o, ctx, w_v, false, true, 0.5f, 1.0f, value);  // beta = 1 accumulates
  gpu().matmul_batched(go, dev(ctx), dev(w).slice(dn, H * (dn + dv)), false, true, 0.5f, 1.0f,
                       value);
  EXPECT_CLOSE(go, o, kF32Tol);
  GemmBatch outside = value;
  outside.stride_b += 1;
  EXPECT_THROW(gpu().matmul_batched(go, dev(ctx), dev(w_v), false, true, 1.0f, 0.0f, outside),
               Error);
}

TEST_F(CudaBackendTest, CausalSoftmaxRowLimits) {
  // Decode rows (token, head) over the context; short and long rows (threads per block vary).
  for (auto [tokens, heads, cached] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 16, 0}, {1, 16, 300}, {7, 3, 12}, {2, 5, 1500}}) {
    const int64_t L = cached + tokens;
    Tensor x = randn({tokens * heads, L}, 3.0f), gx = dev(x);
    cpu().causal_softmax(x, heads, cached + 1);
    gpu().causal_softmax(gx, heads, cached + 1);
    EXPECT_CLOSE(gx, x, kF32Tol);
  }
}

TEST_F(CudaBackendTest, ArgmaxFirstMaximumOfThePrefix) {
  // A vocabulary-sized row (greedy decoding), ties, and a prefix limit (the allowed vocabulary).
  const int64_t R = 3, L = 102400;
  Tensor x = randn({R, L});
  x.f32()[0 * L + 70000] = 50.0f;
  x.f32()[0 * L + 90000] = 50.0f;  // tie: the first wins
  x.f32()[1 * L + 5] = -1e30f;
  x.f32()[2 * L + L - 1] = 60.0f;  // outside the prefix below
  for (int64_t n : {L, L - 1, int64_t(7)}) {
    Tensor idx = Tensor::empty({R}, DType::I32), gidx = poisoned({R}, DType::I32);
    cpu().argmax(idx, x, n);
    gpu().argmax(gidx, dev(x), n);
    expect_equal_i32(gidx, idx);
  }
}

// Backend::sample against the CPU's rule. The GPU sums integer masses (units of 2^-40 of the most
// likely token's) of its own exp, the CPU double sums of glibc's expf: their picks may differ only
// where u01 * kept mass or top_p * z lies within rounding (~1e-7 relative) of a boundary.
// SampleReference (a full sort, in double) lists the ids allowed with a slack of 1e-6 of the mass:
// where that is one id, the GPU and the CPU must both return it; elsewhere the GPU one of them.
// Rows: DeepSeek-V2's vocabulary (all of it and a prefix), one with ties at every cut (logits on
// a grid: the GPU finds the tied token of a rank by a scan), masked (-inf) entries, tiny rows.
TEST_F(CudaBackendTest, SampleMatchesCpu) {
  struct Row {
    std::string name;
    std::vector<float> x;
    int64_t n;
  };
  std::vector<Row> rows;
  auto add = [&](const std::string& name, int64_t V, int64_t n, float stddev, float grid) {
    std::vector<float> x(size_t(V), 0.5f);  // stddev 0: all equal
    if (stddev > 0.0f) {
      const Tensor t = randn({V}, stddev);
      x.assign(t.f32(), t.f32() + V);
    }
    if (grid > 0.0f)
      for (float& v : x) v = std::round(v / grid) * grid;
    rows.push_back({name, std::move(x), n});
  };
  add("vocab 102400", 102400, 102400, 2.5f, 0.0f);
  add("prefix of 102400", 102400, 101000, 2.5f, 0.0f);
  add("102400 on a 0.5 grid (ties)", 102400, 102400, 2.0f, 0.5f);
  add("5000", 5000, 5000, 1.0f, 0.0f);
  add("1000 on a 1.0 grid (ties)", 1000, 1000, 1.5f, 1.0f);
  add("7", 7, 7, 1.0f, 0.0f);
  add("2", 2, 2, 1.0f, 0.0f);
  add("1", 1, 1, 1.0f, 0.0f);
  add("300 equal", 300, 300, 0.0f, 0.0f);
  rows.push_back(rows[3]);
  rows.back().name = "5000 with masked entries";
  for (size_t i = 0; i < rows.back().x.size(); i += 3)
    rows.back().x[i] = -std::numeric_limits<float>::infinity();

  const SampleParams params[] = {{1.0f, 0, 1.0f},    {0.7f, 50, 1.0f},  {1.0f, 0, 0.9f},
                                 {0.8f, 50, 0.95f},  {1.0f, 1, 1.0f},   {1.0f, 0, 1e-6f},
                                 {1.5f, 1000, 0.8f}, {1.0f, 0, 0.5f},   {2.0f, 5, 1.0f},
                                 {0.6f, 0, 0.99f},   {1.0f, 4000, 1.0f}};
  std::vector<double> draws = {0.0, 1e-7, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999999};
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int i = 0; i < 8; ++i) draws.push_back(uniform(rng_));
  int exact = 0, cases = 0;
  for (const Row& row : rows) {
    const int64_t V = int64_t(row.x.size());
    Tensor x = Tensor::empty({1, V});
    std::copy(row.x.begin(), row.x.end(), x.f32());
    const Tensor gx = dev(x);
    const SampleReference ref(row.x.data(), row.n);
    for (const SampleParams& p : params)
      for (double u : draws) {
        SCOPED_TRACE(testing::Message() << row.name << ", T " << p.temperature << " top_k "
                                        << p.top_k << " top_p " << p.top_p << " u01 " << u);
        Tensor id = Tensor::empty({1}, DType::I32), gid = poisoned({1}, DType::I32);
        cpu().sample(id, x, row.n, p, u);
        gpu().sample(gid, gx, row.n, p, u);
        const int32_t c = id.i32()[0], g = gid.to_host().i32()[0];
        gpu().sample(gid, gx, row.n, p, u);  // deterministic: the same id again
        EXPECT_EQ(gid.to_host().i32()[0], g) << "a second call chose differently";
        const std::set<int32_t> ok = ref.allowed(p, u, 1e-6);
        ++cases;
        if (ok.size() == 1) {
          ++exact;
          EXPECT_EQ(c, *ok.begin()) << "the CPU's rule";
          EXPECT_EQ(g, c);
        } else {
          EXPECT_TRUE(ok.count(g)) << "GPU id " << g << " (CPU " << c << ")";
        }
      }
  }
  // Boundaries within 1e-6 are rare: most cases must have been compared exactly.
  EXPECT_GE(exact, cases * 3 / 4) << exact << " of " << cases;
}

// The sampling kernels wait for nothing and read their parameters from launch arguments, so a
// recorded call replays: the same id as the eager call, every time (its scratch is zero again
// after each run).
TEST_F(CudaBackendTest, SampleReplaysFromAGraph) {
  const int64_t V = 102400;
  const Tensor x = randn({1, V}, 2.0f), gx = dev(x);
  const SampleParams p{0.9f, 40, 0.9f};
  Tensor eager = poisoned({1}, DType::I32), replayed = poisoned({1}, DType::I32);
  gpu().sample(eager, gx, V, p, 0.37);
  const std::unique_ptr<CapturedWork> graph =
      gpu().capture([&] { gpu().sample(replayed, gx, V, p, 0.37); });
  ASSERT_NE(graph, nullptr) << "graphs are off (MOEKIT_CUDA_GRAPHS=0)";
  for (int i = 0; i < 3; ++i) {
    gpu().fill(replayed, -1.0f);
    graph->replay();
    EXPECT_EQ(replayed.to_host().i32()[0], eager.to_host().i32()[0]) << "replay " << i;
  }
}

TEST_F(CudaBackendTest, SetRowsEqualsCpu) {
  // A decode step's cache write: a few rows of a V2-Lite-sized latent cache, the first and the
  // last among them; every other row must stay as it was.
  const int64_t R = 1000, D = 512, n = 5;
  Tensor dst = randn({R, D}), src = randn({n, D}), rows = Tensor::empty({n}, DType::I32);
  const int32_t r[] = {999, 0, 517, 3, 64};
  std::copy(r, r + n, rows.i32());
  Tensor gdst = dev(dst);
  cpu().set_rows(dst, src, rows);
  gpu().set_rows(gdst, dev(src), dev(rows));
  EXPECT_CLOSE(gdst, dst, 0.0);  // copies: exact
  // A bad row is reported and written to row 0 in its place (the kernel checks the rows itself);
  // no other entry writes row 0 here.
  Tensor bad = rows.clone();
  bad.i32()[1] = 5;
  bad.i32()[2] = int32_t(R);
  expect_index_error([&] { gpu().set_rows(gdst, dev(src), dev(bad)); }, gdst,
                     "set_rows: row 1000 at position 2 out of range [0, 1000)");
  Tensor fixed = bad.clone();
  fixed.i32()[2] = 0;
  cpu().set_rows(dst, src, fixed);
  EXPECT_CLOSE(gdst, dst, 0.0);
}

// The ops that check their indices inside their own kernel (embedding_forward, set_rows, rope,
// moe_experts_small) mark the checks pending while a graph records them, so a replay on bad
// indices is reported at the next read back, naming the first failing op; a replay on good
// indices afterwards is clean and exact.
TEST_F(CudaBackendTest, FusedIndexChecksReportFromGraphReplays) {
  const int64_t V = 50, C = 40, T = 3, R = 20;
  const Tensor table = randn({V, C}), src = randn({T, C});
  const Tensor ids_ok = randint({T}, 0, int32_t(V));
  Tensor rows_ok = Tensor::empty({T}, DType::I32);
  for (int64_t i = 0; i < T; ++i) rows_ok.i32()[i] = int32_t(2 * i + 1);
  const Tensor gtable = dev(table), gsrc = dev(src);
  Tensor ids = dev(ids_ok), rows = dev(rows_ok), out = poisoned({T, C}), dst = dev(randn({R, C}));
  const std::unique_ptr<CapturedWork> graph = gpu().capture([&] {
    gpu().embedding_forward(out, gtable, ids);
    gpu().set_rows(dst, gsrc, rows);
  });
  ASSERT_NE(graph, nullptr) << "graphs are off (MOEKIT_CUDA_GRAPHS=0)";
  graph->replay();
  Tensor ref = Tensor::empty({T, C});
  cpu().embedding_forward(ref, table, ids_ok);
  EXPECT_CLOSE(out, ref, 0.0);
  Tensor bad_rows = rows_ok.clone(), bad_ids = ids_ok.clone();
  bad_rows.i32()[1] = int32_t(R);
  rows.copy_from(bad_rows);
  expect_index_error([&] { graph->replay(); }, dst,
                     "set_rows: row 20 at position 1 out of range [0, 20)");
  bad_ids.i32()[2] = -1;
  ids.copy_from(bad_ids);  // both fail: the first in stream order is reported
  expect_index_error([&] { graph->replay(); }, out,
                     "embedding_forward: token id -1 at position 2 out of range [0, 50)");
  ids.copy_from(ids_ok);
  rows.copy_from(rows_ok);
  graph->replay();
  EXPECT_NO_THROW((void)out.to_host());
  EXPECT_CLOSE(out, ref, 0.0);
}

struct LatentCase {
  int64_t heads, r, dr, cap;
  std::vector<int32_t> positions;
  float scale;
};

TEST_F(CudaBackendTest, LatentAttentionEqualsCpu) {
  // The split-K kernel against the CPU's GEMMs. V2-Lite sizes (16 heads, r 512, dr 64, scale
  // 1/sqrt(192)) over a cache of 1000 rows (16-row splits, one tile each): the first row only, a
  // length that is no multiple of a split or a tile, the whole cache, and several tokens at
  // different positions in one call; a sharper softmax (the running maximum moves between tiles
  // and splits); V3's 128 heads (32 head groups per token); a long cache (80-row splits); odd
  // small sizes (a partial head group with idle warps, r and dr not multiples of 32, rope rows
  // not 16-byte aligned: the plain staging copy instead of the asynchronous one). Tolerance: the
  // fp32 1e-5 (sums of 576 products and of up to 10000 weighted rows).
  const float v2 = 1.0f / std::sqrt(192.0f);
  const std::vector<LatentCase> cases = {
      {16, 512, 64, 1000, {0}, v2},           {16, 512, 64, 1000, {516}, v2},
      {16, 512, 64, 1000, {999}, v2},         {16, 512, 64, 1000, {100, 999, 0, 516}, v2},
      {16, 512, 64, 1000, {999, 400}, 0.3f},  {128, 512, 64, 700, {699, 333}, v2},
      {16, 512, 64, 10000, {9999, 4321}, v2}, {3, 12, 4, 50, {0, 13, 31, 49}, 0.5f},
      {21, 40, 6, 77, {76, 5}, 0.3f},
  };
  for (const LatentCase& c : cases) {
    const int64_t n = int64_t(c.positions.size()), H = c.heads;
    SCOPED_TRACE(testing::Message() << "H " << H << " r " << c.r << " dr " << c.dr << " cap "
                                    << c.cap << " tokens " << n << " first at " << c.positions[0]);
    Tensor kv = randn({c.cap, c.r}), kr = randn({c.cap, c.dr});
    // Rows past every token's position are NaN: reading one would poison the result.
    const int32_t last = *std::max_element(c.positions.begin(), c.positions.end());
    for (int64_t j = last + 1; j < c.cap; ++j) {
      std::fill(kv.f32() + j * c.r, kv.f32() + (j + 1) * c.r, std::nanf(""));
      std::fill(kr.f32() + j * c.dr, kr.f32() + (j + 1) * c.dr, std::nanf(""));
    }
    Tensor q_lat = randn({n * H, c.r}), q_rope = randn({n * H, c.dr});
    Tensor pos = Tensor::empty({n}, DType::I32);
    std::copy(c.positions.begin(), c.positions.end(), pos.i32());
    Tensor ctx = Tensor::empty({n * H, c.r}), gctx = poisoned({n * H, c.r});
    cpu().latent_attention(ctx, q_lat, q_rope, kv, kr, pos, H, c.scale);
    const Tensor gkv = dev(kv), gkr = dev(kr), gq_lat = dev(q_lat), gq_rope = dev(q_rope);
    const Tensor gpos = dev(pos);
    gpu().latent_attention(gctx, gq_lat, gq_rope, gkv, gkr, gpos, H, c.scale);
    EXPECT_CLOSE(gctx, ctx, kF32Tol);
    Tensor again = poisoned({n * H, c.r});
    gpu().latent_attention(again, gq_lat, gq_rope, gkv, gkr, gpos, H, c.scale);
    EXPECT_TRUE(bit_equal(gctx, again)) << "latent attention is not deterministic";
  }
}

TEST_F(CudaBackendTest, LatentAttentionErrors) {
  const int64_t H = 16, r = 512, dr = 64, cap = 1000, n = 2;
  Tensor kv = dev(randn({cap, r})), kr = dev(randn({cap, dr}));
  Tensor q_lat = dev(randn({n * H, r})), q_rope = dev(randn({n * H, dr}));
  Tensor ctx = poisoned({n * H, r}), pos = Tensor::empty({n}, DType::I32);
  pos.i32()[0] = 3;
  pos.i32()[1] = int32_t(cap);
  const float scale = 0.1f;
  expect_index_error(
      [&] { gpu().latent_attention(ctx, q_lat, q_rope, kv, kr, dev(pos), H, scale); }, ctx,
      "latent_attention: position 1000 at position 1 out of range [0, 1000)");
  pos.i32()[1] = 7;
  // Shapes are checked on the host, before any launch.
  Tensor short_rope = dev(randn({cap - 1, dr})), wide = poisoned({n * H, r + 1});
  EXPECT_THROW(gpu().latent_attention(ctx, q_lat, q_rope, kv, short_rope, dev(pos), H, scale),
               Error);
  EXPECT_THROW(gpu().latent_attention(wide, q_lat, q_rope, kv, kr, dev(pos), H, scale), Error);
  EXPECT_THROW(gpu().latent_attention(ctx, q_lat, q_rope, kv, kr, pos, H, scale), Error);  // host
  // Beyond the kernel's register tiles (r <= 512): a clear error, not a wrong result.
  Tensor kv_big = dev(randn({cap, 640})), q_big = dev(randn({n * H, 640}));
  Tensor ctx_big = poisoned({n * H, 640});
  expect_error_containing(
      [&] { gpu().latent_attention(ctx_big, q_big, q_rope, kv_big, kr, dev(pos), H, scale); },
      "beyond the kernel's limits");
}

// ---------------------------------------------------------------------------------------------
// The fused ops of MLA's decode step (cuda_mla_step.cu) against the CPU's loops. V2-Lite sizes (r
// 512, dr 64, dn 128, dv 128, 16 heads) and odd ones (rows no multiple of a 16-byte chunk: the
// element-wise load paths; ranks past the cache write's registers: its tail loop), one token and
// several at positions out of order (the absorption's groups of 4 tokens and the value side's
// rows of 4, with a partial last group). BF16 weights: the CPU reads the same bf16 values widened
// to fp32, so both sides multiply the same numbers. Tolerance: the fp32 1e-5 (see the top of the
// file): sums of at most 1000 products (squares of the RMSNorm, dn terms of the absorption, r of
// the value side), both in fp32 in different orders, and the rope's two products per element.

// A random rope table [rows, dr/2] (cos, sin of random angles).
std::pair<Tensor, Tensor> random_rope_table(int64_t rows, int64_t dr, std::mt19937_64& rng) {
  Tensor c = Tensor::empty({rows, dr / 2}), s = Tensor::empty({rows, dr / 2});
  std::uniform_real_distribution<float> angle(-3.0f, 3.0f);
  for (int64_t i = 0; i < c.numel(); ++i) {
    const float a = angle(rng);
    c.f32()[i] = std::cos(a);
    s.f32()[i] = std::sin(a);
  }
  return {c, s};
}

Tensor i32_of(const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty({int64_t(v.size())}, DType::I32);
  std::copy(v.begin(), v.end(), t.i32());
  return t;
}

struct MlaStepCase {
  int64_t heads, r, dr, dn, dv;
  std::vector<int32_t> positions;
};

TEST_F(CudaBackendTest, MlaCacheWriteEqualsCpu) {
  struct Case {
    int64_t r, dr, cap;
    std::vector<int32_t> positions;
  };
  // V2-Lite (one step; three tokens out of order, both ends of the cache), odd sizes, ranks past
  // the 512 values the kernel keeps in registers (its tail loop).
  const std::vector<Case> cases = {{512, 64, 1000, {517}},
                                   {512, 64, 1000, {999, 0, 3}},
                                   {37, 6, 50, {49, 12}},
                                   {1000, 64, 20, {5, 19, 0}},
                                   {2000, 2, 7, {6}}};
  for (const Case& c : cases) {
    const int64_t n = int64_t(c.positions.size());
    SCOPED_TRACE(testing::Message()
                 << "r " << c.r << " dr " << c.dr << " cap " << c.cap << " n " << n);
    Tensor cos_t, sin_t;
    std::tie(cos_t, sin_t) = random_rope_table(c.cap + 5, c.dr, rng_);
    Tensor lat = randn({c.cap, c.r}), kr = randn({c.cap, c.dr});
    const Tensor kv_a = randn({n, c.r + c.dr}, 2.0f), w = randn({c.r});
    const Tensor pos = i32_of(c.positions);
    Tensor glat = dev(lat), gkr = dev(kr);  // rows no token names must keep their values
    cpu().mla_cache_write(lat, kr, kv_a, w, 1e-6f, cos_t, sin_t, pos);
    gpu().mla_cache_write(glat, gkr, dev(kv_a), dev(w), 1e-6f, dev(cos_t), dev(sin_t), dev(pos));
    EXPECT_CLOSE(glat, lat, kF32Tol);
    EXPECT_CLOSE(gkr, kr, kF32Tol);
  }
  // A bad position is reported and written to row 0 in its place (as set_rows); the bound is
  // the smaller of the cache (1000 rows) and the rope table (here 1005).
  const int64_t r = 512, dr = 64, cap = 1000;
  Tensor cos_t, sin_t;
  std::tie(cos_t, sin_t) = random_rope_table(cap + 5, dr, rng_);
  Tensor glat = dev(randn({cap, r})), gkr = dev(randn({cap, dr}));
  const Tensor kv_a = dev(randn({2, r + dr})), w = dev(randn({r}));
  expect_index_error(
      [&] {
        gpu().mla_cache_write(glat, gkr, kv_a, w, 1e-6f, dev(cos_t), dev(sin_t),
                              dev(i32_of({3, int32_t(cap)})));
      },
      glat, "mla_cache_write: position 1000 at position 1 out of range [0, 1000)");
  Tensor cos_s, sin_s;
  std::tie(cos_s, sin_s) = random_rope_table(700, dr, rng_);  // a table shorter than the cache
  expect_index_error(
      [&] {
        gpu().mla_cache_write(glat, gkr, kv_a, w, 1e-6f, dev(cos_s), dev(sin_s),
                              dev(i32_of({-2, 700})));
      },
      glat, "mla_cache_write: position -2 at position 0 out of range [0, 700)");
  EXPECT_THROW(
      gpu().mla_cache_write(glat, gkr, kv_a, w, 1e-6f, dev(cos_t), dev(sin_t), i32_of({1, 2})),
      Error);  // host positions
}

TEST_F(CudaBackendTest, MlaAbsorbQueryAndValueHeadsEqualCpu) {
  const std::vector<MlaStepCase> cases = {
      {16, 512, 64, 128, 128, {700}},                 // V2-Lite, one step
      {16, 512, 64, 128, 128, {9, 0, 4, 999, 3}},     // 5 tokens: a group of 4 and one more
      {128, 512, 64, 128, 128, {77}},                 // V3's 128 heads
      {3, 37, 6, 5, 7, {2, 0}},                       // rows of 37: element-wise loads everywhere
      {5, 36, 4, 9, 3, {1, 8, 6, 0, 2, 7, 5, 3, 4}},  // F32 in chunks, BF16 element-wise
      {2, 16, 8, 16, 16, {11, 0, 5}},                 // the tiny test model's sizes
  };
  for (const DType wt : {DType::F32, DType::BF16})
    for (const MlaStepCase& c : cases) {
      const int64_t n = int64_t(c.positions.size()), H = c.heads, dqk = c.dn + c.dr;
      SCOPED_TRACE(testing::Message() << dtype_name(wt) << " H " << H << " r " << c.r << " dr "
                                      << c.dr << " dn " << c.dn << " dv " << c.dv << " n " << n);
      Tensor cos_t, sin_t;
      std::tie(cos_t, sin_t) = random_rope_table(1000, c.dr, rng_);
      // The weight as stored on the GPU, and the same values in F32 for the CPU.
      const Tensor w32 = randn({H * (c.dn + c.dv), c.r}, 0.05f);
      const Tensor w_dev = dev(wt == DType::BF16 ? w32.to_dtype(DType::BF16) : w32);
      const Tensor w_ref = wt == DType::BF16 ? w32.to_dtype(DType::BF16).to_f32() : w32;
      const Tensor q = randn({n, H * dqk}), pos = i32_of(c.positions), gq = dev(q);

      Tensor q_lat = Tensor::empty({n * H, c.r}), q_rope = Tensor::empty({n * H, c.dr});
      cpu().mla_absorb_query(q_lat, q_rope, q, w_ref, cos_t, sin_t, pos, H, c.dn, c.dr, c.dv);
      Tensor gq_lat = poisoned({n * H, c.r}), gq_rope = poisoned({n * H, c.dr});
      gpu().mla_absorb_query(gq_lat, gq_rope, gq, w_dev, dev(cos_t), dev(sin_t), dev(pos), H, c.dn,
                             c.dr, c.dv);
      EXPECT_CLOSE(gq_lat, q_lat, kF32Tol);
      EXPECT_CLOSE(gq_rope, q_rope, kF32Tol);
      EXPECT_CLOSE(gq, q, 0.0);  // q is only read
      Tensor again = poisoned({n * H, c.r});
      gpu().mla_absorb_query(again, gq_rope, gq, w_dev, dev(cos_t), dev(sin_t), dev(pos), H, c.dn,
                             c.dr, c.dv);
      EXPECT_TRUE(bit_equal(gq_lat, again)) << "mla_absorb_query is not deterministic";

      const Tensor ctx = randn({n * H, c.r});
      Tensor o = Tensor::empty({n, H * c.dv}), go = poisoned({n, H * c.dv});
      cpu().mla_value_heads(o, ctx, w_ref, H, c.dn, c.dv);
      gpu().mla_value_heads(go, dev(ctx), w_dev, H, c.dn, c.dv);
      EXPECT_CLOSE(go, o, kF32Tol);
      Tensor go2 = poisoned({n, H * c.dv});
      gpu().mla_value_heads(go2, dev(ctx), w_dev, H, c.dn, c.dv);
      EXPECT_TRUE(bit_equal(go, go2)) << "mla_value_heads is not deterministic";
    }
}

TEST_F(CudaBackendTest, MlaStepOpsMisalignedWeightAndErrors) {
  // A weight whose rows are whole 16-byte chunks but whose start is not 16-byte aligned (a view
  // one float into its buffer): the kernels must take the element-wise loads.
  const int64_t H = 4, r = 64, dr = 8, dn = 12, dv = 10, n = 2;
  const int64_t rows_w = H * (dn + dv);
  const Tensor flat = randn({rows_w * r + 1}, 0.1f);
  const Tensor w = dev(flat).slice(1, rows_w * r + 1).reshape({rows_w, r});
  const Tensor w_ref = flat.slice(1, rows_w * r + 1).reshape({rows_w, r}).clone();
  Tensor cos_t, sin_t;
  std::tie(cos_t, sin_t) = random_rope_table(30, dr, rng_);
  const Tensor q = randn({n, H * (dn + dr)}), pos = i32_of({29, 3});
  Tensor q_lat = Tensor::empty({n * H, r}), q_rope = Tensor::empty({n * H, dr});
  cpu().mla_absorb_query(q_lat, q_rope, q, w_ref, cos_t, sin_t, pos, H, dn, dr, dv);
  Tensor gq_lat = poisoned({n * H, r}), gq_rope = poisoned({n * H, dr});
  gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t), dev(pos), H, dn, dr,
                         dv);
  EXPECT_CLOSE(gq_lat, q_lat, kF32Tol);
  EXPECT_CLOSE(gq_rope, q_rope, kF32Tol);
  const Tensor ctx = randn({n * H, r});
  Tensor o = Tensor::empty({n, H * dv}), go = poisoned({n, H * dv});
  cpu().mla_value_heads(o, ctx, w_ref, H, dn, dv);
  gpu().mla_value_heads(go, dev(ctx), w, H, dn, dv);
  EXPECT_CLOSE(go, o, kF32Tol);

  // A position past the rope table: reported at the next read back, rotated by row 0's angle.
  expect_index_error(
      [&] {
        gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t),
                               dev(i32_of({4, 30})), H, dn, dr, dv);
      },
      gq_rope, "mla_absorb_query: position 30 at position 1 out of range [0, 30)");
  // Shapes and dtypes are checked on the host, before any launch.
  EXPECT_THROW(gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t), dev(pos),
                                      H, dn, dr, dv + 1),
               Error);
  EXPECT_THROW(gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t), pos, H,
                                      dn, dr, dv),
               Error);  // host positions
  EXPECT_THROW(gpu().mla_value_heads(go, dev(ctx), w, H + 1, dn, dv), Error);
  EXPECT_THROW(gpu().mla_value_heads(go, dev(ctx), w.to_host(), H, dn, dv), Error);  // host weight
  EXPECT_TRUE(gpu().supports(Op::MlaAbsorbQuery, DType::BF16));
  EXPECT_TRUE(gpu().supports(Op::MlaValueHeads, DType::BF16));
  EXPECT_FALSE(cpu().supports(Op::MlaAbsorbQuery, DType::BF16));
}

TEST_F(CudaBackendTest, IndexErrorsReportTheFirstBadOpAndReset) {
  const int64_t V = 10, C = 4, T = 6;
  Tensor table = dev(randn({V, C})), out = poisoned({T, C});
  Tensor ok = randint({T}, 0, int32_t(V)), bad1 = ok.clone(), bad2 = ok.clone();
  bad1.i32()[4] = int32_t(V) + 3;
  bad2.i32()[0] = int32_t(V) + 7;
  Tensor gathered = poisoned({T, C});
  // Two failing ops before a read back: the first in stream order is reported, with its op name.
  expect_index_error(
      [&] {
        gpu().embedding_forward(out, table, dev(ok));
        gpu().gather_rows(gathered, table, dev(bad1), nullptr);
        gpu().embedding_forward(out, table, dev(bad2));
      },
      out, "gather_rows: row 13 at position 4 out of range [0, 10)");
  // memory_info and sum_squares wait for the device too, and report as well.
  gpu().embedding_forward(out, table, dev(bad2));
  size_t free_bytes = 0, total_bytes = 0;
  expect_error_containing([&] { gpu().memory_info(free_bytes, total_bytes); },
                          "embedding_forward: token id 17 at position 0");
  // Afterwards good indices give exact results.
  Tensor ref = Tensor::empty({T, C});
  cpu().embedding_forward(ref, table.to_host(), ok);
  gpu().embedding_forward(out, table, dev(ok));
  EXPECT_CLOSE(out, ref, 0.0);
}

// check_indices over many blocks (gather_rows checks its rows with it): ~100,000 rows with bad
// entries in two different blocks of the copy; the lower position is reported, and the safe copy
// replaces both with row 0 (so the gather equals the CPU's on the repaired rows). The scan reads
// the rows 16 bytes at a time when they are aligned: a view at an odd entry takes the one-entry
// scan, and a count that is not a multiple of 4 leaves entries to the scan's tail. Of two failing
// launches of the same check before a read back, the first is reported.
TEST_F(CudaBackendTest, CheckIndicesReportsTheLowestBadPositionOfALargeTensor) {
  const int64_t R = 50, C = 3, N = 100003;
  const Tensor x = randn({R, C}), dx = dev(x);
  struct Case {
    int64_t begin;                                 // the view's first entry of the uploaded tensor
    std::vector<std::pair<int64_t, int32_t>> bad;  // (position in the view, value)
    const char* message;
  };
  const Case cases[] = {
      {0, {{70001, 57}, {30002, 53}}, "gather_rows: row 53 at position 30002 out of range [0, 50)"},
      {1, {{99999, 61}, {45000, 50}}, "gather_rows: row 50 at position 45000 out of range [0, 50)"},
      {0, {{100002, 99}}, "gather_rows: row 99 at position 100002 out of range [0, 50)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message);
    Tensor all = randint({N + 1}, 0, int32_t(R));
    for (int64_t i = 5; i < N + 1; i += 97) all.i32()[i] = -1;  // no row: valid
    Tensor fixed = all.slice(c.begin, c.begin + N).clone();
    for (const auto& [p, value] : c.bad) {
      all.i32()[c.begin + p] = value;
      fixed.i32()[p] = 0;
    }
    const Tensor rows = dev(all).slice(c.begin, c.begin + N);
    Tensor out = poisoned({N, C});
    expect_index_error([&] { gpu().gather_rows(out, dx, rows, nullptr); }, out, c.message);
    Tensor ref = Tensor::empty({N, C});
    cpu().gather_rows(ref, x, fixed, nullptr);
    EXPECT_TRUE(bit_equal(out, ref)) << "bad rows not replaced by row 0";
  }
  Tensor first = randint({N}, 0, int32_t(R)), second = first.clone();
  first.i32()[30002] = 53;
  second.i32()[7] = 60;
  Tensor out = poisoned({N, C});
  expect_index_error(
      [&] {
        gpu().gather_rows(out, dx, dev(first), nullptr);
        gpu().gather_rows(out, dx, dev(second), nullptr);
      },
      out, "gather_rows: row 53 at position 30002 out of range [0, 50)");
}

TEST_F(CudaBackendTest, ErrorsNameTheOp) {
  Tensor host = randn({4, 4});
  Tensor d = Tensor::empty({4, 4}, DType::F32, Device::CUDA);
  expect_error_containing([&] { gpu().swiglu_forward(d, host, d); }, "swiglu_forward");
}

}  // namespace
}  // namespace moekit
