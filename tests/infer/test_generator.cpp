// Cached decoding (absorbed MLA over the latent cache) must reproduce the full forward, the step
// path (device-side positions: mla_decode_step) must reproduce the prompt path (mla_decode), and
// the samplers must follow their definitions.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "infer/generator.h"
#include "infer/mla_decode.h"

namespace moekit {
namespace {

ModelConfig small_config(bool v3) {
  ModelConfig c;
  c.vocab_size = 50;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 3;
  c.num_key_value_heads = 3;
  c.kv_lora_rank = 12;
  c.qk_nope_head_dim = 6;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 5;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 8;
  c.first_k_dense_replace = 1;
  if (v3) {
    c.model_type = "deepseek_v3";
    c.q_lora_rank = 10;
    c.scoring_func = "sigmoid";
    c.topk_method = "noaux_tc";
    c.n_group = 2;
    c.topk_group = 1;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
    c.rope_scaling.type = "yarn";
    c.rope_scaling.factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 4;
    c.rope_scaling.mscale_all_dim = 0.8;
  }
  return c;
}

void check_cache_matches_full_forward(bool v3) {
  DeepSeekModel model(small_config(v3));
  model.init_random(5, 0.3f);
  std::vector<int32_t> ids = {3, 17, 9, 44, 2, 30, 30, 11, 7};
  const int64_t S = int64_t(ids.size()), V = model.config().vocab_size;
  Tensor t = Tensor::empty({S}, DType::I32);
  for (int64_t i = 0; i < S; ++i) t.i32()[i] = ids[size_t(i)];
  Tensor full = model.forward(t, 1, S);

  Generator gen(model, 16);
  Tensor last = gen.feed({ids.begin(), ids.begin() + 5});  // prefill 5
  auto expect_row = [&](const Tensor& got, int64_t pos) {
    double d = 0.0;
    for (int64_t v = 0; v < V; ++v)
      d = std::max(d, double(std::abs(got.f32()[v] - full.f32()[pos * V + v])));
    EXPECT_LT(d, 2e-4) << "position " << pos;
  };
  expect_row(last, 4);
  // Two tokens over a filled cache (each row of the causal softmax sees a different prefix), then
  // one at a time.
  expect_row(gen.feed({ids[5], ids[6]}), 6);
  for (int64_t i = 7; i < S; ++i) expect_row(gen.feed({ids[size_t(i)]}), i);
  EXPECT_EQ(gen.cache().length, S);
}

TEST(Generator, CachedDecodeMatchesFullForwardV2) {
  check_cache_matches_full_forward(false);
}
TEST(Generator, CachedDecodeMatchesFullForwardV3Yarn) {
  check_cache_matches_full_forward(true);
}

TEST(Generator, PrefillInChunksMatchesOneChunk) {
  // A long prompt's scores are formed a few tokens at a time; one token per chunk must give what
  // one chunk gives (same math, smaller GEMMs), over an empty and over a filled cache.
  const ModelConfig c = small_config(false);
  DeepSeekModel model(c);
  model.init_random(8, 0.3f);
  MLA& attn = model.layers()[0].self_attn;
  const RopeTable rope = RopeTable::build(c, 32, Device::CPU);
  std::mt19937_64 rng(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t cached : {0, 4}) {
    const int64_t n = 7;
    Tensor x = Tensor::empty({n, c.hidden_size}), pos = Tensor::empty({n}, DType::I32);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = normal(rng);
    for (int64_t i = 0; i < n; ++i) pos.i32()[i] = int32_t(cached + i);
    KVCache one = KVCache::create(c, 32, Device::CPU), many = KVCache::create(c, 32, Device::CPU);
    for (int64_t i = 0; i < cached * c.kv_lora_rank; ++i)  // the same earlier tokens in both
      one.layers[0].kv_latent.f32()[i] = many.layers[0].kv_latent.f32()[i] = normal(rng);
    for (int64_t i = 0; i < cached * c.qk_rope_head_dim; ++i)
      one.layers[0].k_rope.f32()[i] = many.layers[0].k_rope.f32()[i] = normal(rng);
    Backend& be = backend(Device::CPU);
    const Tensor y1 = mla_decode(be, attn, x, pos, rope, one.layers[0], cached);
    const Tensor yn = mla_decode(be, attn, x, pos, rope, many.layers[0], cached,
                                 /*max_scores=*/c.num_attention_heads * (cached + n));
    for (int64_t i = 0; i < y1.numel(); ++i)
      EXPECT_NEAR(yn.f32()[i], y1.f32()[i], 1e-5) << "cached " << cached << " element " << i;
  }
}

// Largest |a - b| over the first `rows` rows of two tensors of equal shape.
double max_diff(const Tensor& a, const Tensor& b, int64_t rows) {
  EXPECT_EQ(a.shape(), b.shape());
  const int64_t n = rows * (a.numel() / a.dim(0));
  double d = 0.0;
  for (int64_t i = 0; i < n; ++i) d = std::max(d, double(std::abs(a.f32()[i] - b.f32()[i])));
  return d;
}

// Rows [begin, end) of `a` against the rows [0, end - begin) of `b`.
void expect_rows_near(const Tensor& a, int64_t begin, int64_t end, const Tensor& b, double tol,
                      const char* what) {
  EXPECT_LT(max_diff(a.slice(begin, end), b, end - begin), tol)
      << what << " rows [" << begin << ", " << end << ")";
}

// What mla_decode_step adds to the residual stream: its output from a zero residual.
Tensor step_output(Backend& be, MLA& attn, const Tensor& x, const Tensor& pos,
                   const RopeTable& rope, LayerCache& cache) {
  Tensor y = Tensor::zeros({x.dim(0), x.dim(1)}, DType::F32, x.device());
  mla_decode_step(be, attn, x, pos, rope, cache, y);
  return y;
}

void check_steps_match_prompt(bool v3) {
  const ModelConfig c = small_config(v3);
  DeepSeekModel model(c);
  model.init_random(10, 0.3f);
  MLA& attn = model.layers()[0].self_attn;
  const int64_t cap = 12, S = 9;  // rows past S stay unwritten
  const RopeTable rope = RopeTable::build(c, cap, Device::CPU);
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensor x = Tensor::empty({S, c.hidden_size}), pos = Tensor::empty({S}, DType::I32);
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = normal(rng);
  for (int64_t i = 0; i < S; ++i) pos.i32()[i] = int32_t(i);
  Backend& be = backend(Device::CPU);
  auto tokens = [&](int64_t b, int64_t e) { return std::pair{x.slice(b, e), pos.slice(b, e)}; };
  // Both paths run fp32 GEMMs of different shapes: agreement to rounding, far below the O(0.1)
  // change a wrong row or a missing token makes.
  const double tol = 1e-5;

  // The prompt path over all tokens at once.
  KVCache prompt = KVCache::create(c, cap, Device::CPU);
  const Tensor y_prompt = mla_decode(be, attn, x, pos, rope, prompt.layers[0], 0);

  // Every token as its own step, adding into a residual that starts as the token's x (as the
  // generator's residual stream): residual - x is the attention output.
  KVCache steps = KVCache::create(c, cap, Device::CPU);
  for (int64_t i = 0; i < S; ++i) {
    const auto [xi, pi] = tokens(i, i + 1);
    Tensor residual = xi.clone();
    mla_decode_step(be, attn, xi, pi, rope, steps.layers[0], residual);
    be.add(residual, xi, -1.0f);
    expect_rows_near(y_prompt, i, i + 1, residual, tol, "steps y");
  }

  // A prompt of 4 by mla_decode, then steps by mla_decode_step (two tokens at positions 4 and 5
  // in one step, then one at a time), against the same split all by mla_decode.
  KVCache mixed = KVCache::create(c, cap, Device::CPU),
          split = KVCache::create(c, cap, Device::CPU);
  {
    const auto [xp, pp] = tokens(0, 4);
    const Tensor a = mla_decode(be, attn, xp, pp, rope, mixed.layers[0], 0);
    const Tensor b = mla_decode(be, attn, xp, pp, rope, split.layers[0], 0);
    EXPECT_LT(max_diff(a, b, 4), 1e-12);  // the same calls
  }
  for (auto [b, e] : {std::pair<int64_t, int64_t>{4, 6}, {6, 7}, {7, 8}, {8, 9}}) {
    const auto [xs, ps] = tokens(b, e);
    const Tensor ys = step_output(be, attn, xs, ps, rope, mixed.layers[0]);
    const Tensor yd = mla_decode(be, attn, xs, ps, rope, split.layers[0], b);
    expect_rows_near(yd, 0, e - b, ys, tol, "mixed y vs split mla_decode");
    expect_rows_near(y_prompt, b, e, ys, tol, "mixed y vs prompt");
  }

  // The same cache contents; the rows past S untouched (zero) everywhere.
  for (const KVCache* k : {&steps, &mixed, &split}) {
    EXPECT_LT(max_diff(k->layers[0].kv_latent, prompt.layers[0].kv_latent, cap), tol);
    EXPECT_LT(max_diff(k->layers[0].k_rope, prompt.layers[0].k_rope, cap), tol);
  }
  const Tensor zero_lat = Tensor::zeros({cap, c.kv_lora_rank});
  const Tensor zero_rope = Tensor::zeros({cap, c.qk_rope_head_dim});
  EXPECT_EQ(max_diff(steps.layers[0].kv_latent.slice(S, cap), zero_lat.slice(S, cap), cap - S),
            0.0);
  EXPECT_EQ(max_diff(steps.layers[0].k_rope.slice(S, cap), zero_rope.slice(S, cap), cap - S), 0.0);
}

TEST(Generator, DecodeStepMatchesPromptPathV2) {
  check_steps_match_prompt(false);
}
TEST(Generator, DecodeStepMatchesPromptPathV3) {
  check_steps_match_prompt(true);
}

// MLA's q (q_a with q-LoRA) and kv_a weights share one tensor (ParamTable::place_together), so
// a decode step runs one GEMM for both. A parameter that gets its own tensor again (as a dtype
// change in set_trainable does) must be noticed and the two GEMMs run instead, with the same
// logits (the fused GEMM's columns are the same dot products).
void check_input_projections(bool v3) {
  DeepSeekModel model(small_config(v3));
  model.init_random(9, 0.3f);
  const std::vector<int32_t> prompt = {3, 17, 9}, steps = {44, 2, 30};
  auto run = [&] {
    Generator gen(model, 16);
    std::vector<Tensor> out = {gen.feed(prompt)};
    for (int32_t id : steps) out.push_back(gen.feed({id}));
    return out;
  };
  for (DecoderLayer& layer : model.layers()) {
    const MLA& a = layer.self_attn;
    const Param* first = v3 ? a.q_a_proj : a.q_proj;
    ASSERT_TRUE(rows_of(a.input_projections, {first, a.kv_a_proj_with_mqa}));
    EXPECT_EQ(a.input_projections.dim(0), first->shape[0] + a.kv_a_proj_with_mqa->shape[0]);
  }
  const std::vector<Tensor> fused = run();
  for (DecoderLayer& layer : model.layers()) {
    Param& kv_a = *layer.self_attn.kv_a_proj_with_mqa;
    kv_a.value = kv_a.value.clone();  // its own tensor now
    EXPECT_FALSE(rows_of(layer.self_attn.input_projections,
                         {v3 ? layer.self_attn.q_a_proj : layer.self_attn.q_proj, &kv_a}));
  }
  const std::vector<Tensor> separate = run();
  for (size_t i = 0; i < fused.size(); ++i)
    EXPECT_LE(max_diff(fused[i], separate[i], 1), 1e-5) << "call " << i;
}

TEST(Generator, InputProjectionsInOneGemmV2) {
  check_input_projections(false);
}
TEST(Generator, InputProjectionsInOneGemmV3) {
  check_input_projections(true);
}

TEST(Sampling, GreedyTopKAndTopP) {
  std::mt19937_64 rng(1);
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f};
  SamplingParams greedy;
  EXPECT_EQ(sample_token(logits.data(), 4, greedy, rng), 1);
  SamplingParams top1{1.0f, 1, 1.0f};
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(logits.data(), 4, top1, rng), 1);
  SamplingParams nucleus{1.0f, 0, 0.01f};  // the first token alone reaches 1% of the mass
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(logits.data(), 4, nucleus, rng), 1);
}

TEST(Sampling, TemperatureFollowsSoftmax) {
  std::mt19937_64 rng(2);
  std::vector<float> logits = {0.0f, std::log(3.0f)};  // probabilities 1/4, 3/4 at T = 1
  SamplingParams p{1.0f, 0, 1.0f};
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ones += sample_token(logits.data(), 2, p, rng);
  EXPECT_NEAR(double(ones) / n, 0.75, 0.015);
  SamplingParams hot{2.0f, 0, 1.0f};  // T = 2: sqrt(3) : 1 -> 0.634
  ones = 0;
  for (int i = 0; i < n; ++i) ones += sample_token(logits.data(), 2, hot, rng);
  EXPECT_NEAR(double(ones) / n, std::sqrt(3.0) / (1 + std::sqrt(3.0)), 0.015);
}

TEST(Sampling, TopKAndNucleusOverALargeVocabulary) {
  // Three likely tokens among 5000 (probabilities ~0.5, 0.3, 0.2; the rest ~e-30 each), so the
  // candidates are found by selection, not a sort of the vocabulary. top_p 0.7 keeps the first
  // two (0.5 < 0.7 <= 0.8) renormalised to 5/8 and 3/8; top_k 2 keeps the same two.
  std::vector<float> logits(5000, -30.0f);
  logits[4321] = std::log(5.0f);
  logits[17] = std::log(3.0f);
  logits[999] = std::log(2.0f);
  std::mt19937_64 rng(3);
  for (const SamplingParams& p : {SamplingParams{1.0f, 0, 0.7f}, SamplingParams{1.0f, 2, 1.0f},
                                  SamplingParams{1.0f, 2, 0.9f}}) {
    SCOPED_TRACE(testing::Message() << "top_k " << p.top_k << " top_p " << p.top_p);
    int first = 0;
    const int n = 16000;
    for (int i = 0; i < n; ++i) {
      const int32_t id = sample_token(logits.data(), int64_t(logits.size()), p, rng);
      ASSERT_TRUE(id == 4321 || id == 17) << id;
      first += id == 4321;
    }
    EXPECT_NEAR(double(first) / n, 5.0 / 8.0, 0.015);
  }
  // Without a cut every token stays possible: the three carry ~all of the mass.
  SamplingParams all{1.0f, 0, 1.0f};
  int third = 0;
  for (int i = 0; i < 16000; ++i)
    third += sample_token(logits.data(), int64_t(logits.size()), all, rng) == 999;
  EXPECT_NEAR(third / 16000.0, 0.2, 0.015);
}

TEST(Generator, StopsAtEosAndBudget) {
  DeepSeekModel model(small_config(false));
  model.init_random(6, 0.3f);
  Generator gen(model, 32);
  SamplingParams p;
  p.max_tokens = 5;
  auto out = gen.generate({1, 2, 3}, p);
  EXPECT_EQ(out.size(), 5u);
  gen.reset();
  p.stop_ids = {out[2]};  // greedy is deterministic: the third token now stops generation
  auto stopped = gen.generate({1, 2, 3}, p);
  EXPECT_LT(stopped.size(), 3u);
}

TEST(Generator, SamplesOnlyTheAllowedVocabulary) {
  DeepSeekModel model(small_config(false));  // 50 output rows
  model.init_random(7, 0.5f);
  Generator gen(model, 64);
  SamplingParams p;
  p.max_tokens = 40;
  auto all = gen.generate({1, 2, 3}, p);
  ASSERT_TRUE(std::any_of(all.begin(), all.end(), [](int32_t id) { return id >= 20; }))
      << "the restriction below would be untested";
  for (float temperature : {0.0f, 1.0f}) {
    gen.reset();
    p.temperature = temperature;
    p.allowed_vocab = 20;
    for (int32_t id : gen.generate({1, 2, 3}, p))
      EXPECT_LT(id, 20) << "temperature " << temperature;
  }
}

}  // namespace
}  // namespace moekit
