// The CUDA backend's memory, GEMMs (dense, GEMV path, bf16 rounding) and elementwise ops
// (axpy/scale, AdamW, embedding, RMSNorm, SwiGLU, RoPE, gathers and scatters, column copies and
// the MLA k/v split), index checks and error messages, each against the CPU backend.
// Tolerances and the fixture: cuda_backend_testing.h.
#include <tuple>

#include "cuda_backend_testing.h"

namespace moekit {
namespace {

using namespace test;

#if defined(MOEKIT_HAVE_CUDA)
// The backend's environment switches (env_choice, host code: no GPU needed, so no fixture): a
// listed value gives its index, an unset variable the caller's default, and anything else
// (another word, an empty value, a different case) an error naming the variable, every choice
// and the value.
TEST(CudaEnvChoice, ListedValuesSelectOthersAreErrors) {
  const char* name = "MOEKIT_TEST_ENV_CHOICE";
  const char* const choices[] = {"own", "batched", "grouped", "streams"};
  {
    EnvScope env(name, nullptr);
    EXPECT_EQ(env_choice(name, choices, 7), 7u);
  }
  for (size_t i = 0; i < 4; ++i) {
    EnvScope env(name, choices[i]);
    EXPECT_EQ(env_choice(name, choices, 7), i);
  }
  for (const char* value : {"", "Own", "stream", "own "}) {
    EnvScope env(name, value);
    expect_error_containing(
        [&] { (void)env_choice(name, choices, 7); },
        fmt::format("{} must be own, batched, grouped or streams, got \"{}\"", name, value));
  }
  const char* const two[] = {"a", "b"};
  EnvScope env(name, "c");
  expect_error_containing([&] { (void)env_choice(name, two, 0); },
                          fmt::format("{} must be a or b, got \"c\"", name));
}
#endif

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

// matmul_pair, SwiGLU's gate and up projections in one call: on the bf16 path (BF16 weights, or
// F32 ones under the Bf16 precision) one batched cuBLAS call whose products are the CPU GEMMs of
// the same rounded inputs at fp32 tolerance (plus the output's rounding when it is BF16), as
// matmul's are. Two matmuls instead: F32 without the Bf16 precision (to the bit), few rows (the
// GEMV), and a width that is no whole number of 16-byte rows (67). Outputs or weights of two
// shapes are refused.
TEST_F(CudaBackendTest, MatmulPairEqualsTwoMatmuls) {
  const int64_t K = 72;
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  for (const int64_t N : {int64_t(64), int64_t(67)})
    for (const int64_t M : {int64_t(300), int64_t(3)})
      for (const DType out : {DType::F32, DType::BF16})
        for (const bool bf16_weights : {true, false}) {
          SCOPED_TRACE(testing::Message() << "N " << N << " M " << M << " out " << dtype_name(out)
                                          << (bf16_weights ? " bf16 weights" : " f32 weights"));
          if (M <= 4 && out == DType::BF16) continue;  // the GEMV writes F32 only
          const Tensor x = randn({M, K}), w0 = randn({N, K}), w1 = randn({N, K});
          auto place = [&](const Tensor& w) {
            return dev(bf16_weights ? w.to_dtype(DType::BF16) : w);
          };
          const Tensor gw0 = place(w0), gw1 = place(w1);
          Tensor y0 = poisoned({M, N}, out), y1 = poisoned({M, N}, out);
          Tensor r0 = poisoned({M, N}, out), r1 = poisoned({M, N}, out);
          {
            PrecisionScope bf16(gpu(), Precision::Bf16);
            gpu().matmul_pair(y0, y1, dev(x), gw0, gw1);
            gpu().matmul(r0, dev(x), gw0, false, true, 1.0f, 0.0f);
            gpu().matmul(r1, dev(x), gw1, false, true, 1.0f, 0.0f);
          }
          const double out_round = out == DType::BF16 ? std::ldexp(1.0, -8) : 0.0;
          for (int i = 0; i < 2; ++i) {
            Tensor ref = Tensor::empty({M, N});
            const bool exact_x = M <= 4;         // the GEMV reads F32 activations unrounded
            const Tensor& w = i == 0 ? w0 : w1;  // the GEMV reads an F32 weight unrounded too
            cpu().matmul(ref, exact_x ? x : rounded(x), exact_x && !bf16_weights ? w : rounded(w),
                         false, true, 1.0f, 0.0f);
            EXPECT_CLOSE(i == 0 ? y0 : y1, ref, kF32Tol + out_round);
            EXPECT_CLOSE(i == 0 ? y0 : y1, (i == 0 ? r0 : r1).to_host().to_f32(),
                         kF32Tol + out_round);
          }
          if (!bf16_weights && out == DType::F32) {  // Fp32: two matmuls
            Tensor p0 = poisoned({M, N}), p1 = poisoned({M, N}), q0 = poisoned({M, N});
            gpu().matmul_pair(p0, p1, dev(x), gw0, gw1);
            gpu().matmul(q0, dev(x), gw0, false, true, 1.0f, 0.0f);
            EXPECT_TRUE(bit_equal(p0, q0));
          }
        }
  Tensor y0 = poisoned({300, 64}), y1 = poisoned({300, 65});
  const Tensor w = dev(randn({64, K})), x = dev(randn({300, K}));
  EXPECT_THROW(gpu().matmul_pair(y0, y1, x, w, w), Error);
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
    // (n % 8 != 0) over copies; both paths compute each element alike, so to the bit. Each also
    // writes the bf16 copy of w (a master weight's GEMM copy).
    Tensor w1 = dev(w).reshape({w.numel()}), m1 = dev(m).reshape({w.numel()});
    Tensor v1 = dev(v).reshape({w.numel()});
    Tensor w16 = Tensor::empty(w.shape(), DType::BF16, Device::CUDA);
    Tensor w16_1 = Tensor::empty({w.numel()}, DType::BF16, Device::CUDA);
    const Tensor g1 = gd.reshape({w.numel()});
    for (auto [b, e] :
         {std::pair<int64_t, int64_t>{0, w.numel() - 1}, {w.numel() - 1, w.numel()}}) {
      Tensor wp = w1.slice(b, e), mp = m1.slice(b, e), vp = v1.slice(b, e);
      Tensor w16p = w16_1.slice(b, e);
      gpu().adamw_step(wp, mp, vp, g1.slice(b, e), s, &w16p);
    }
    gpu().adamw_step(wd, md, vd, gd, s, &w16);
    Tensor w16_cpu = Tensor::empty(w.shape(), DType::BF16);
    cpu().adamw_step(w, m, v, g, s, &w16_cpu);
    EXPECT_CLOSE(wd, w, kF32Tol);
    EXPECT_CLOSE(md, m, kF32Tol);
    EXPECT_CLOSE(vd, v, kF32Tol);
    EXPECT_TRUE(bit_equal(wd.reshape({w.numel()}), w1) && bit_equal(md.reshape({w.numel()}), m1) &&
                bit_equal(vd.reshape({w.numel()}), v1));
    // The copies are the updated weights rounded as round_bf16 (and the host conversion) rounds.
    Tensor rounded = Tensor::empty(w.shape(), DType::BF16, Device::CUDA);
    gpu().round_bf16(rounded, wd);
    EXPECT_TRUE(bit_equal(w16, rounded));
    EXPECT_TRUE(bit_equal(w16_1, rounded.reshape({w.numel()})));
    EXPECT_TRUE(bit_equal(w16_cpu, w.to_dtype(DType::BF16)));
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
      // A BF16 x rotated in place (MLA's q under the bf16 attention) and into a separate BF16
      // out: the CPU's rotation of the same bf16 values (within the rotation's fp32 rounding, and
      // one bf16 step where that decides a rounding), the elements outside the rope dims kept.
      Tensor x16 = poisoned(s, DType::BF16);
      gpu().round_bf16(x16, dx);
      const Tensor host16 = x16.to_host();
      Tensor ref_b16 = Tensor::empty(s, DType::BF16);
      cpu().rope(ref_b16, host16, l.heads, l.stride, l.offset, l.rope_dim, cos, sin, pos, inverse);
      Tensor b16_in_place = x16.clone(), b16_out = poisoned(s, DType::BF16);
      gpu_rope(b16_in_place, b16_in_place);
      gpu_rope(b16_out, x16);
      EXPECT_TRUE(bit_equal(b16_in_place, b16_out)) << "BF16 x: in place vs separate out";
      EXPECT_CLOSE(b16_in_place, ref_b16.to_f32(), kF32Tol + std::ldexp(1.0, -8));
      const Tensor got_b16 = b16_in_place.to_host();
      const auto* gb = static_cast<const uint16_t*>(got_b16.raw());
      const auto* hb = static_cast<const uint16_t*>(host16.raw());
      int64_t kept = 0, moved = 0;
      for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % l.stride;
        if (c < l.offset || c >= l.offset + l.rope_dim)
          kept += gb[i] == hb[i];
        else
          moved += gb[i] != hb[i];
      }
      EXPECT_EQ(kept, x.numel() / l.stride * (l.stride - l.rope_dim)) << "BF16 x: copies";
      EXPECT_GT(moved, 0) << "BF16 x: nothing rotated";
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

// mla_kv_up under Precision::Bf16 with BF16 k and v (MLA's forward under the bf16 attention):
// k's nope columns and v straight from per-head strided GEMMs, k_rope broadcast beside them,
// against the op's default on the same backend (the whole kv_b GEMM in bf16, then the split):
// the same products of the same bf16 operands, rounded once as stored, so equal up to the fp32
// accumulation order of two GEMM shapes (cuBLAS promises no order): within one bf16 step (2^-8
// relative) per element, and most elements identical; the rope columns bit-identical (k_rope
// rounded). Against the CPU's fp32 GEMM and split of the bf16-rounded operands: the output's
// rounding, up to 2^-8 of an element in the lowest part of its binade, plus the accumulation
// order's ~1e-6 (measured on the H200: 2.3e-3 to 3.1e-3 normwise).
// Shapes: small heads, and V2-Lite's (r 512, dn 128, dr 64, dv 128) at 301 tokens. An F32 k
// takes the default path.
TEST_F(CudaBackendTest, MlaKvUpEqualsGemmThenSplit) {
  EXPECT_TRUE(gpu().supports(Op::MlaKvUp, DType::BF16));
  EXPECT_FALSE(cpu().supports(Op::MlaKvUp, DType::BF16));
  struct Case {
    int64_t T, H, r, dn, dr, dv;
  };
  PrecisionScope bf16(gpu(), Precision::Bf16);
  for (const Case& c : {Case{37, 3, 64, 32, 16, 24}, Case{301, 4, 512, 128, 64, 128}}) {
    SCOPED_TRACE(testing::Message() << "T " << c.T << " H " << c.H << " r " << c.r);
    const int64_t T = c.T, H = c.H;
    const Tensor x = randn({T, c.r}), w = randn({H * (c.dn + c.dv), c.r}, 0.1f);
    const Tensor k_rope = randn({T, c.dr});
    const Tensor x16 = x.to_dtype(DType::BF16), w16 = w.to_dtype(DType::BF16);
    const Shape ks{T, H * (c.dn + c.dr)}, vs{T, H * c.dv};
    Tensor k = poisoned(ks, DType::BF16), v = poisoned(vs, DType::BF16);
    gpu().mla_kv_up(k, v, dev(x16), dev(w16), dev(k_rope), H, c.dn, c.dr, c.dv);
    Tensor rk = poisoned(ks, DType::BF16), rv = poisoned(vs, DType::BF16);
    gpu().Backend::mla_kv_up(rk, rv, dev(x16), dev(w16), dev(k_rope), H, c.dn, c.dr, c.dv);
    // CPU reference: fp32 GEMM of the rounded operands, then the split.
    Tensor kv_b = Tensor::empty({T, H * (c.dn + c.dv)});
    cpu().matmul(kv_b, x16.to_f32(), w16.to_f32(), false, true, 1.0f, 0.0f);
    Tensor ck = Tensor::empty(ks), cv = Tensor::empty(vs);
    cpu().mla_split_kv(ck, cv, kv_b, k_rope, H, c.dn, c.dr, c.dv);
    for (const auto& [got, ref, cpu_ref, name] :
         {std::tuple{&k, &rk, &ck, "k"}, std::tuple{&v, &rv, &cv, "v"}}) {
      const Tensor g = got->to_host().to_f32(), r = ref->to_host().to_f32();
      int64_t differ = 0, far = 0;
      for (int64_t i = 0; i < g.numel(); ++i) {
        const float a = g.f32()[i], b = r.f32()[i];
        differ += a != b;
        far += !(std::abs(a - b) <= std::ldexp(1.0f, -8) * std::abs(b) + 1e-6f);
      }
      EXPECT_EQ(far, 0) << name << ": beyond one bf16 step of the GEMM-then-split";
      EXPECT_LE(differ, g.numel() / 20) << name << ": most elements should be identical";
      EXPECT_CLOSE(*got, *cpu_ref, std::ldexp(1.0, -8) + 1e-5);
    }
    const Tensor hk = k.to_host();
    const Tensor rope16 = k_rope.to_dtype(DType::BF16);
    const auto* kb = static_cast<const uint16_t*>(hk.raw());
    const auto* rb = static_cast<const uint16_t*>(rope16.raw());
    int64_t rope_bad = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < c.dr; ++j)
          rope_bad += kb[(t * H + h) * (c.dn + c.dr) + c.dn + j] != rb[t * c.dr + j];
    EXPECT_EQ(rope_bad, 0) << "k's rope columns";
    // F32 k and v: the default (GEMM, then split), the CPU's values within the bf16 GEMM's error.
    Tensor fk = poisoned(ks), fv = poisoned(vs);
    gpu().mla_kv_up(fk, fv, dev(x16), dev(w16), dev(k_rope), H, c.dn, c.dr, c.dv);
    EXPECT_CLOSE(fk, ck, std::ldexp(1.0, -8));
    EXPECT_CLOSE(fv, cv, std::ldexp(1.0, -8));
  }
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

// The range checks over ~100,000 rows with bad entries far apart: gather_rows checks its rows in
// its own kernel (block 0 records, every thread replaces), scatter_add_rows through check_indices
// (a copy over many blocks). The lower position is reported, and both bad entries are replaced by
// row 0 (so the results equal the CPU's on the repaired rows). The scans read the rows 16 bytes at
// a time when they are aligned: a view at an odd entry takes the one-entry scan, and a count that
// is not a multiple of 4 leaves entries to the scan's tail. Of two failing launches of the same
// check before a read back, the first is reported.
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
    // The same rows as scatter_add_rows' destinations.
    const Tensor src = randn({N, C});
    Tensor sums = dev(Tensor::zeros({R, C})), sums_ref = Tensor::zeros({R, C});
    std::string scatter_message = c.message;
    scatter_message.replace(0, std::string("gather_rows").size(), "scatter_add_rows");
    expect_index_error([&] { gpu().scatter_add_rows(sums, dev(src), rows, nullptr); }, sums,
                       scatter_message);
    cpu().scatter_add_rows(sums_ref, src, fixed, nullptr);
    EXPECT_CLOSE(sums, sums_ref, kF32Tol);
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
