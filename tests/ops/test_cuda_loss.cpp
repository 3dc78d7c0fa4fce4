// The CUDA cross-entropy against the CPU backend: ignored targets, the fused loss and gradient
// (fp32 and bf16 logits, in place), and its timing (CrossEntropyThroughput). Tolerances and the
// fixture: cuda_backend_testing.h.
#include "cuda_backend_testing.h"

namespace moekit {
namespace {

using namespace test;

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
  auto time_ms = [&](const std::function<void()>& f) { return mean_ms(f, losses); };
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

}  // namespace
}  // namespace moekit
