// The CUDA MoE ops against the CPU backend: the gate (every scoring and routing method), the
// dispatch plan, the grouped expert GEMMs (grouped, batched on padded blocks, sums of terms,
// weight gradients) and the few-token experts of decoding. Tolerances and the fixture:
// cuda_backend_testing.h.
#include "cuda_backend_testing.h"

namespace moekit::test {

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

}  // namespace moekit::test

namespace moekit {
namespace {

using namespace test;

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
      // with groups but only one group, and one expert past its reach (the block kernel). With
      // the cases above, every count of experts per lane: 1 (E 16), 2 (37, 64), 4 (100), 8 (256).
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
// Cases: every expert used, most experts empty (only every fourth drawn), a single expert, one
// token, more pairs than one block's 512 (several blocks; the last one partial), more experts
// than a block's 256 threads (1100: several rounds of the per-expert loops), and a large plan
// (V2-Lite's 8192 x 6 pairs over 64 experts: 96 blocks) whose chunks are bigger than 512 when
// there would be more than 256 blocks (70,000 x 6 pairs).
TEST_F(CudaBackendTest, MoeDispatchPlanEqualsCpu) {
  struct Case {
    int64_t T, K, E, stride;
  };
  for (const Case& c :
       {Case{77, 6, 37, 1}, Case{301, 8, 64, 4}, Case{33, 1, 1, 1}, Case{1, 2, 3, 1},
        Case{1500, 6, 1100, 1}, Case{8192, 6, 64, 1}, Case{70000, 6, 160, 1}})
    for (const int64_t align : {1, 8, 128}) {
      SCOPED_TRACE(testing::Message()
                   << "T " << c.T << " K " << c.K << " E " << c.E << " align " << align);
      const int64_t N = c.T * c.K, S = dispatch_slots(N, c.E, align);
      // Distinct experts within a token where K allows (as the gate picks them), else random.
      Tensor idx = randint({c.T, c.K}, 0, int32_t((c.E - 1) / c.stride + 1)), w = randn({c.T, c.K});
      for (int64_t i = 0; i < N; ++i) idx.i32()[i] *= int32_t(c.stride);
      Tensor tok = Tensor::empty({S}, DType::I32), pair = Tensor::empty({S}, DType::I32);
      Tensor sw = Tensor::empty({S}), begin = Tensor::empty({c.E + 1}, DType::I32);
      Tensor loads = Tensor::empty({c.E}, DType::I32),
             slots = Tensor::empty({c.T, c.K}, DType::I32);
      cpu().moe_dispatch_plan(tok, pair, sw, slots, begin, loads, idx, w, c.E, align);
      Tensor gtok = poisoned({S}, DType::I32), gpair = poisoned({S}, DType::I32);
      Tensor gsw = poisoned({S}), gbegin = poisoned({c.E + 1}, DType::I32);
      Tensor gloads = poisoned({c.E}, DType::I32), gslots = poisoned({c.T, c.K}, DType::I32);
      gpu().moe_dispatch_plan(gtok, gpair, gsw, gslots, gbegin, gloads, dev(idx), dev(w), c.E,
                              align);
      expect_equal_i32(gtok, tok);
      expect_equal_i32(gpair, pair);
      expect_equal_i32(gslots, slots);
      expect_equal_i32(gbegin, begin);
      expect_equal_i32(gloads, loads);
      EXPECT_TRUE(bit_equal(gsw, sw));
    }
  Tensor bad = randint({5, 2}, 0, 4), w = randn({5, 2});
  bad.i32()[7] = 4;
  Tensor t = poisoned({10}, DType::I32), p = poisoned({10}, DType::I32), sw = poisoned({10});
  Tensor b = poisoned({5}, DType::I32), loads = poisoned({4}, DType::I32);
  Tensor slots = poisoned({5, 2}, DType::I32);
  // Index errors surface at the next read-back (the check does not wait for the GPU).
  EXPECT_THROW(
      {
        gpu().moe_dispatch_plan(t, p, sw, slots, b, loads, dev(bad), dev(w), 4, 1);
        (void)b.to_host();
      },
      Error);
  Tensor many = poisoned({cuda::kPlanMaxExperts + 2}, DType::I32);
  EXPECT_THROW(gpu().moe_dispatch_plan(t, p, sw, slots, many, loads, dev(bad), dev(w),
                                       cuda::kPlanMaxExperts + 1, 1),
               Error);
}

// The combine through the plan's token_slots against scatter_add_rows over its slot tokens: on
// the GPU the same fp32 FMAs in the same order (increasing slot per token), so bit-equal; against
// the CPU (whose products may round before the add) within kF32Tol. For an F32 and a BF16 x
// (widened exactly), with and without weights, an odd width (the one-column path), K = 6
// (V2-Lite), 11 (loads in batches of four with a rest) and 40 (past kCombineMaxK: the default,
// scatter_add_rows). A token_slots entry out of range is reported and replaced by slot 0.
TEST_F(CudaBackendTest, CombineSlotsEqualsCpuScatterAdd) {
  struct Case {
    int64_t T, K, E, H, align;
  };
  for (const Case& c : {Case{300, 6, 64, 256, 128}, Case{57, 11, 23, 64, 8}, Case{9, 40, 45, 24, 1},
                        Case{40, 6, 16, 13, 1}})
    for (const DType xd : {DType::F32, DType::BF16})
      for (const bool weighted : {true, false}) {
        SCOPED_TRACE(testing::Message() << "T " << c.T << " K " << c.K << " H " << c.H << " "
                                        << dtype_name(xd) << (weighted ? " weighted" : ""));
        // Distinct experts per token, shifted per token (tokens share experts).
        Tensor idx = Tensor::empty({c.T, c.K}, DType::I32), w = randn({c.T, c.K});
        for (int64_t t = 0; t < c.T; ++t)
          for (int64_t k = 0; k < c.K; ++k) idx.i32()[t * c.K + k] = int32_t((3 * t + k) % c.E);
        const int64_t S = dispatch_slots(c.T * c.K, c.E, c.align);
        Tensor tok = Tensor::empty({S}, DType::I32), pair = Tensor::empty({S}, DType::I32);
        Tensor sw = Tensor::empty({S}), begin = Tensor::empty({c.E + 1}, DType::I32);
        Tensor loads = Tensor::empty({c.E}, DType::I32),
               slots = Tensor::empty({c.T, c.K}, DType::I32);
        cpu().moe_dispatch_plan(tok, pair, sw, slots, begin, loads, idx, w, c.E, c.align);
        const Tensor x = randn({S, c.H}).to_dtype(xd), y0 = randn({c.T, c.H});
        Tensor ref = y0.clone();
        cpu().scatter_add_rows(ref, x.to_f32(), tok, weighted ? &sw : nullptr);
        Tensor gy = dev(y0), gref = dev(y0);
        const Tensor gsw = dev(sw), gx = dev(x), gtok = dev(tok);
        gpu().combine_slots(gy, gx, gtok, dev(slots), weighted ? &gsw : nullptr);
        gpu().scatter_add_rows(gref, gx, gtok, weighted ? &gsw : nullptr);
        EXPECT_TRUE(bit_equal(gy, gref));
        EXPECT_CLOSE(gy, ref, kF32Tol);
      }
  const int64_t T = 20, K = 2, H = 8, S = 40;
  Tensor slots = Tensor::empty({T, K}, DType::I32), tok = Tensor::empty({S}, DType::I32);
  for (int64_t i = 0; i < T * K; ++i) {
    slots.i32()[i] = int32_t(i);
    tok.i32()[i] = int32_t(i / K);
  }
  slots.i32()[13] = 40;
  const Tensor x = randn({S, H}), y0 = randn({T, H});
  Tensor gy = dev(y0);
  expect_index_error([&] { gpu().combine_slots(gy, dev(x), dev(tok), dev(slots), nullptr); }, gy,
                     "combine_slots: slot 40 at position 13 out of range [0, 40)");
  slots.i32()[13] = 0;
  Tensor ref = y0.clone();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t h = 0; h < H; ++h)
        ref.f32()[t * H + h] += x.f32()[slots.i32()[t * K + j] * H + h];
  EXPECT_CLOSE(gy, ref, 0.0);
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
          for (size_t g = 0; g < sizes.size(); ++g) {
            w.push_back(randn(trans_b ? Shape{N, K} : Shape{K, N}));
            wd.push_back(dev(w.back()));
          }
          const std::vector<const Tensor*> wc = pointers(w), wg = pointers(wd);
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
      const std::vector<const Tensor*> wc = pointers(w_ref), wg = pointers(w_gpu);
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
    const std::vector<const Tensor*> wc = pointers(w_ref), wg = pointers(w_gpu);
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
    const size_t G = sizes.size();
    const std::vector<const Tensor*> w1c = pointers(w_ref, 0, G), w2c = pointers(w_ref, G, G),
                                     w1g = pointers(w_gpu, 0, G), w2g = pointers(w_gpu, G, G);
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
      const size_t G = sizes.size();
      const std::vector<const Tensor*> w1c = pointers(w_ref, 0, G), w2c = pointers(w_ref, G, G),
                                       w1g = pointers(w_gpu, 0, G), w2g = pointers(w_gpu, G, G);
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

// The expert GEMM of our own (cuda_expert_gemm.cu: TMA, wgmma, one persistent launch), which
// the CUDA backend runs on Hopper under MOEKIT_CUDA_EXPERT_GEMM=own (tools/device_run.sh
// `tests` runs this test under it too) for padded blocks into a BF16 output: grouped_matmul
// (trans_b) and grouped_swiglu, the gate and up products with SwiGLU in the epilogue. Under the
// default mode the same checks hold for the cuBLAS path and the unfused op. Sizes that exercise
// its edges: more tiles than an H200 has SMs (each block walks several, and the ring of stages
// wraps across tiles), K = 200 (the last 64-column k-block reaches past the end: TMA's zero fill),
// N not a multiple of the tile (columns past N are not stored: the output is poisoned), empty
// experts between full ones, F32 weights next to BF16 ones (rounded by the op) and F32
// activations (rounded once). Oracle: the CPU op on the bf16-rounded values, exact products and
// fp32 sums (kF32Tol), plus the bf16 rounding of each stored product (2^-8 of the element).
// SwiGLU: h must equal swiglu_forward on the stored gate and up to the bit (the epilogue rounds
// each product first and computes silu_mul, the SwiGLU kernel's expression), with or without
// the products kept, and the kept products meet the GEMM oracle.
TEST_F(CudaBackendTest, ExpertGemmOfOurOwnOnPaddedBlocks) {
#if defined(MOEKIT_HAVE_CUDA)
  int dev_id = 0, major = 0, minor = 0;
  ASSERT_EQ(cudaGetDevice(&dev_id), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev_id), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev_id), cudaSuccess);
  const char* mode = std::getenv("MOEKIT_CUDA_EXPERT_GEMM");
  if (major == 9 && minor == 0 && (!mode || std::string(mode) == "own")) {
    EXPECT_TRUE(cuda::expert_gemm_available()) << "a Hopper GPU runs the kernel (sm_90a build)";
  }
#endif
  const std::vector<int64_t> sizes{256, 0, 384, 128, 0, 512, 128, 256};  // 1664 rows, 13 blocks
  const std::vector<int64_t> begin = group_offsets(sizes);
  const int64_t R = begin.back(), K = 200;
  auto rounded = [](const Tensor& t) { return t.to_dtype(DType::BF16).to_f32(); };
  // Weights: even groups stored BF16, odd ones F32 holding bf16 values (rounding them is exact).
  auto weights = [&](int64_t n, std::vector<Tensor>& ref, std::vector<Tensor>& gpu_w) {
    for (size_t g = 0; g < sizes.size(); ++g) {
      ref.push_back(rounded(randn({n, K})));
      gpu_w.push_back(g % 2 == 0 ? dev(ref.back().to_dtype(DType::BF16)) : dev(ref.back()));
    }
  };
  const Tensor x = randn({R, K}), xr = rounded(x);
  gpu().set_precision(Precision::Bf16);
  {  // one projection: 2 column tiles of 256, the second holding 8 columns
    const int64_t N = 264;
    std::vector<Tensor> w_ref, w_gpu;
    weights(N, w_ref, w_gpu);
    Tensor ref = Tensor::zeros({R, N});
    cpu().grouped_matmul(ref, xr, pointers(w_ref), begin, true, 0.0f);
    Tensor c = poisoned({R, N}, DType::BF16);
    gpu().grouped_matmul(c, dev(x.to_dtype(DType::BF16)), pointers(w_gpu), begin, true, 0.0f);
    EXPECT_CLOSE(c, ref, kF32Tol + std::ldexp(1.0, -8));
  }
  // SwiGLU: I = 1416, 12 column tiles of 128 (the last holding 8): 13 x 12 = 156 tiles.
  const int64_t I = 1416;
  std::vector<Tensor> g_ref, g_gpu, u_ref, u_gpu;
  weights(I, g_ref, g_gpu);
  weights(I, u_ref, u_gpu);
  Tensor gate_ref = Tensor::zeros({R, I}), up_ref = Tensor::zeros({R, I});
  cpu().grouped_matmul(gate_ref, xr, pointers(g_ref), begin, true, 0.0f);
  cpu().grouped_matmul(up_ref, xr, pointers(u_ref), begin, true, 0.0f);
  Tensor h = poisoned({R, I}, DType::BF16), gate = poisoned({R, I}, DType::BF16),
         up = poisoned({R, I}, DType::BF16);
  gpu().grouped_swiglu(h, &gate, &up, dev(x), pointers(g_gpu), pointers(u_gpu), begin);
  EXPECT_CLOSE(gate, gate_ref, kF32Tol + std::ldexp(1.0, -8));
  EXPECT_CLOSE(up, up_ref, kF32Tol + std::ldexp(1.0, -8));
  Tensor h_unfused = poisoned({R, I}, DType::BF16);
  gpu().swiglu_forward(h_unfused, gate, up);
  EXPECT_TRUE(bit_equal(h.to_host(), h_unfused.to_host())) << "h differs from SwiGLU's";
  Tensor h_alone = poisoned({R, I}, DType::BF16);
  gpu().grouped_swiglu(h_alone, nullptr, nullptr, dev(x), pointers(g_gpu), pointers(u_gpu), begin);
  EXPECT_TRUE(bit_equal(h.to_host(), h_alone.to_host())) << "h changes when gate, up are not kept";
  // And the same op on unpadded blocks (the base class's unfused path): same products.
  const std::vector<int64_t> odd = group_offsets({200, 0, 384, 100, 0, 600, 120, 260});
  Tensor h_odd = poisoned({R, I}, DType::BF16), gate_odd = poisoned({R, I}, DType::BF16);
  Tensor gate_odd_ref = Tensor::zeros({R, I});
  cpu().grouped_matmul(gate_odd_ref, xr, pointers(g_ref), odd, true, 0.0f);
  gpu().grouped_swiglu(h_odd, &gate_odd, nullptr, dev(x), pointers(g_gpu), pointers(u_gpu), odd);
  EXPECT_CLOSE(gate_odd, gate_odd_ref, kF32Tol + std::ldexp(1.0, -8));
  gpu().set_precision(Precision::Fp32);
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

}  // namespace
}  // namespace moekit
