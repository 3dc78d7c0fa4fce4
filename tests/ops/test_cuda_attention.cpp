// The CUDA attention against the CPU backend: the causal forward and backward (fp32, the Bf16
// precision's cuBLAS path, every flash-attention kernel variant, mma.sync and Hopper wgmma), bf16
// outputs and inputs, the MLA decode's per-head products and the cached softmax, and the kernels'
// timings (AttentionThroughput). Tolerances and the fixture: cuda_backend_testing.h.
#include "cuda_backend_testing.h"

namespace moekit::test {

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

}  // namespace moekit::test

namespace moekit {
namespace {

using namespace test;

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

// The flash kernels' tiling variants (MOEKIT_FLASH_FWD_VARIANT / MOEKIT_FLASH_BWD_VARIANT, see
// the headers of ops/cuda/cuda_flash_attention.cu and _bwd.cu; an id out of range runs the
// default). Forward variants 5-10 are the Hopper (wgmma) kernels in their six tilings (see
// cuda_flash_attention_hopper.cu: 8-10 the warp-specialised kernel with TMA copies), backward
// variants 5-7 the Hopper kernels in their three (see cuda_flash_attention_hopper_bwd.cu), where
// the build and the device have them (else variant 1).
constexpr int kFlashFwdVariants = 11, kFlashBwdVariants = 8;

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
    Tensor variant1_out, variant5_out;  // to tell the Hopper kernels' results apart
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
      // Variant 9 (warp-specialised, 128-key tiles at dqk <= 192) rescales its running sums at
      // other keys than variant 5's 64-key tiles: over a long sequence some bits differ, unless
      // it fell back to the pipelined kernel.
      if (variant == 5) variant5_out = fout;
      if (variant == 9 && c.seq >= 256 && c.dqk > 64 && c.dqk <= 192) {
        EXPECT_FALSE(bit_equal(fout, variant5_out)) << "the warp-specialised kernel did not run?";
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
  auto time_ms = [&](const std::function<void()>& f) { return mean_ms(f, lse); };
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

}  // namespace
}  // namespace moekit
