// The whole model on the GPU against the same model on the CPU (the oracle): forward logits, loss
// and every parameter gradient on the parity fixtures; three training steps (clipping, AdamW,
// Loss-Free Balancing) of full and of ESFT training on the small test config; greedy decoding and
// the graph-capturable decode step (mla_decode_step).
// Every test skips with the reason when no GPU is visible (or the build has no CUDA). Every test's
// full name starts with "Gpu" (tools/cuda_check.sh selects them with the filter Gpu*).
//
// Error measure, as in tests/ops/cuda_backend_testing.h: max |gpu - cpu| / max |cpu| over a tensor
// (normwise relative). Each op agrees to ~1e-6 of its largest value (fp32 sums in another order);
// a model chains a few dozen of them, and backward multiplies small differences by the weights
// again, so the tolerances are: logits 1e-5, loss 1e-5 (relative), gradients 1e-4, weights after
// three AdamW steps 1e-4. Routing is discrete: the test checks first that both sides chose the
// same experts for every token (a near-tie flipping would show as an O(1) difference instead).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>

#include "../tensor_testing.h"
#include "core/error.h"
#include "esft/adapter.h"
#include "esft/finetune.h"
#include "infer/generator.h"
#include "infer/mla_decode.h"
#include "model/checkpoint.h"
#include "model/summary.h"
#include "model/token_batch.h"
#include "nn/moe.h"
#include "train/adamw.h"
#include "train/balance.h"

namespace moekit {
namespace {

const std::string kSource = MOEKIT_SOURCE_DIR;
const std::string kFixtures = kSource + "/tests/fixtures/parity/";

constexpr double kLogitsTol = 1e-5, kLossTol = 1e-5, kGradTol = 1e-4, kStepTol = 1e-4;

bool have_gpu() {
  return backend_available(Device::CUDA);
}

#define SKIP_WITHOUT_GPU() \
  if (!have_gpu())         \
  GTEST_SKIP() << "CUDA backend not available (built without CUDA, or no GPU visible)"

using test::rel_diff;

// Every MoE layer chose the same experts on both sides in the last forward, except, with tie > 0,
// where the CPU's own scores put a token's choice within that relative distance of a tie (its
// K-th chosen expert's score within tie of the best unchosen one's). Under the Bf16 precision the
// GPU's activations are rounded (relative error 2^-8 each, compounding over layers), which can
// flip such a choice; the two experts' gradients then differ by O(1), so the experts of every
// flipped choice are returned ("model.layers.L.mlp.experts.E.") for the caller to leave out of
// its gradient comparison. A flip away from a near-tie fails.
std::set<std::string> expect_same_routing(DeepSeekModel& gpu, DeepSeekModel& cpu,
                                          double tie = 0.0) {
  std::set<std::string> flipped;
  for (size_t l = 0; l < cpu.layers().size(); ++l) {
    if (!cpu.layers()[l].moe) continue;
    const Routing& rc = cpu.layers()[l].moe->gate.saved.routing;
    const Tensor g = gpu.layers()[l].moe->gate.saved.routing.topk_idx.to_host();
    const Tensor& c = rc.topk_idx;
    EXPECT_EQ(g.numel(), c.numel());
    if (g.numel() != c.numel()) return flipped;
    const int64_t T = rc.scores.dim(0), E = rc.scores.dim(1), K = c.numel() / T;
    int64_t differ = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::set<int32_t> gs(g.i32() + t * K, g.i32() + (t + 1) * K);
      std::set<int32_t> cs(c.i32() + t * K, c.i32() + (t + 1) * K);
      if (gs == cs) continue;
      const float* sc = rc.scores.f32() + t * E;
      float kth = INFINITY, best_out = -INFINITY;
      for (int32_t e = 0; e < int32_t(E); ++e) {
        if (cs.count(e))
          kth = std::min(kth, sc[e]);
        else
          best_out = std::max(best_out, sc[e]);
      }
      if (kth - best_out > tie * kth) {
        ++differ;
        continue;
      }
      for (const std::set<int32_t>* side : {&gs, &cs})
        for (int32_t e : *side)
          if (!gs.count(e) || !cs.count(e))
            flipped.insert("model.layers." + std::to_string(l) + ".mlp.experts." +
                           std::to_string(e) + ".");
    }
    EXPECT_EQ(differ, 0) << "layer " << l << ": " << differ << " routing choices differ";
  }
  return flipped;
}

bool in_flipped(const std::set<std::string>& flipped, const std::string& name) {
  for (const std::string& prefix : flipped)
    if (name.rfind(prefix, 0) == 0) return true;
  return false;
}

class GpuParity : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};

TEST_P(GpuParity, LogitsLossAndEveryGradientMatchCpu) {
  const std::string dir = kFixtures + GetParam();
  auto cpu = load_model(dir, Device::CPU);
  auto gpu = load_model(dir, Device::CUDA);
  for (const auto& p : gpu->params().all()) ASSERT_EQ(p->value.device(), Device::CUDA) << p->name;
  TokenBatch b = read_ids_json(dir + "/ids.json", cpu->config().vocab_size);
  const Tensor targets = shifted_targets(b.ids, b.batch, b.seq);

  Tensor lc = cpu->forward(b.ids, b.batch, b.seq);
  Tensor lg = gpu->forward(b.ids, b.batch, b.seq);
  ASSERT_EQ(lg.device(), Device::CUDA);
  expect_same_routing(*gpu, *cpu);
  const double dlogits_rel = rel_diff(lg, lc);
  EXPECT_LE(dlogits_rel, kLogitsTol) << "logits";

  Tensor dc = Tensor::empty(lc.shape());
  Tensor dg = Tensor::empty(lg.shape(), DType::F32, Device::CUDA);
  const float loss_c = cross_entropy(backend(Device::CPU), lc, targets, &dc);
  const float loss_g = cross_entropy(backend(Device::CUDA), lg, targets, &dg);
  const double loss_rel = std::abs(double(loss_g) - double(loss_c)) / std::abs(double(loss_c));
  EXPECT_LE(loss_rel, kLossTol) << loss_g << " vs " << loss_c;
  EXPECT_LE(rel_diff(dg, dc), kLogitsTol) << "dlogits";

  for (auto* m : {cpu.get(), gpu.get()}) {
    m->params().allocate_grads();
    m->params().zero_grads();
  }
  cpu->backward(dc);
  gpu->backward(dg);
  double worst = 0.0;
  std::string worst_name;
  int checked = 0;
  for (const auto& p : cpu->params().all()) {
    if (!p->grad.defined()) continue;
    const Param& q = gpu->params().at(p->name);
    ASSERT_TRUE(q.grad.defined()) << p->name;
    ASSERT_EQ(q.grad.device(), Device::CUDA) << p->name;
    const double d = rel_diff(q.grad, p->grad);
    EXPECT_LE(d, kGradTol) << p->name;
    if (d > worst) worst = d, worst_name = p->name;
    ++checked;
  }
  EXPECT_GT(checked, 20);
  std::printf(
      "[ gpu-parity ] %s: logits %.2e, loss %.2e (%.7f vs %.7f), %d gradients, worst %.2e "
      "(%s)\n",
      GetParam().c_str(), dlogits_rel, loss_rel, double(loss_g), double(loss_c), checked, worst,
      worst_name.c_str());
}

INSTANTIATE_TEST_SUITE_P(GpuFixtures, GpuParity,
                         ::testing::Values("v2_lite", "v2_group", "v3_yarn", "dense2_bf16"));

// --- training steps

ModelConfig tiny_config() {
  ModelConfig c = load_config(kSource + "/tests/fixtures/train/tiny.json");
  c.vocab_size = 300;
  return c;
}

Tensor random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> u(0, int32_t(vocab - 1));
  Tensor t = Tensor::empty({n}, DType::I32);
  for (int64_t i = 0; i < n; ++i) t.i32()[i] = u(rng);
  return t;
}

struct StepLog {
  std::vector<double> loss, norm;
};

// `steps` steps as the trainer takes them: forward, loss, backward, clipping, AdamW, then the
// Loss-Free Balancing bias update from the step's expert load.
StepLog train_steps(DeepSeekModel& m, AdamW& adam, int steps) {
  const int64_t batch = 2, seq = 24;
  StepLog log;
  m.params().allocate_grads();
  for (int s = 0; s < steps; ++s) {
    m.params().zero_grads();
    const Tensor ids = random_ids(batch * seq, m.config().vocab_size, 100 + uint64_t(s));
    const Tensor targets = shifted_targets(ids, batch, seq);
    Tensor logits = m.forward(ids, batch, seq);
    Tensor dlogits = Tensor::empty(logits.shape(), DType::F32, m.device());
    log.loss.push_back(cross_entropy(backend(m.device()), logits, targets, &dlogits));
    m.backward(dlogits);
    ExpertLoad load = zero_load(m);
    accumulate_load(m, load);
    log.norm.push_back(clip_grad_norm(m.params(), 0.5));
    adam.step(m.params(), 1e-3);
    loss_free_update(m, load, 1e-3);
  }
  return log;
}

class GpuTraining : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};

TEST_P(GpuTraining, ThreeAdamWStepsMatchCpu) {
  const bool esft = GetParam() == "esft";
  const ModelConfig c = tiny_config();
  DeepSeekModel cpu(c, Device::CPU), gpu(c, Device::CUDA);
  cpu.init_random(7);
  gpu.init_random(7);
  ExpertConfig ec;
  ec.experts[1] = {2, 5};
  if (esft) {
    apply_expert_config(cpu, ec, "cfg");
    apply_expert_config(gpu, ec, "cfg");
  }
  std::map<std::string, Tensor> initial;
  for (const auto& p : cpu.params().all()) initial[p->name] = p->value.clone();

  AdamW adam_c, adam_g;
  const StepLog lc = train_steps(cpu, adam_c, 3);
  const StepLog lg = train_steps(gpu, adam_g, 3);
  for (size_t s = 0; s < lc.loss.size(); ++s) {
    EXPECT_LE(std::abs(lg.loss[s] - lc.loss[s]) / lc.loss[s], kLossTol) << "step " << s + 1;
    EXPECT_LE(std::abs(lg.norm[s] - lc.norm[s]) / lc.norm[s], kLossTol) << "step " << s + 1;
  }
  expect_same_routing(gpu, cpu);

  const auto state_g = adam_g.state();
  EXPECT_EQ(adam_g.state_bytes(), adam_c.state_bytes());
  double worst = 0.0;
  std::string worst_name;
  int trained = 0, frozen = 0;
  for (const auto& p : cpu.params().all()) {
    const Param& q = gpu.params().at(p->name);
    ASSERT_EQ(q.value.device(), Device::CUDA) << p->name;
    const double d = rel_diff(q.value, p->value);
    EXPECT_LE(d, kStepTol) << p->name;
    if (d > worst) worst = d, worst_name = p->name;
    if (q.trainable) {
      ++trained;
      ASSERT_TRUE(state_g.count("m." + p->name)) << p->name;
      EXPECT_EQ(state_g.at("m." + p->name).device(), Device::CUDA) << p->name;
      EXPECT_EQ(state_g.at("v." + p->name).device(), Device::CUDA) << p->name;
      EXPECT_GT(rel_diff(q.value, initial[p->name]), 0.0) << p->name << " did not move";
    } else if (!q.buffer) {
      // Frozen: untouched to the bit, no gradient, no optimizer state.
      ++frozen;
      EXPECT_FALSE(q.grad.defined()) << p->name;
      EXPECT_FALSE(state_g.count("m." + p->name)) << p->name;
      EXPECT_EQ(rel_diff(q.value, initial[p->name]), 0.0) << p->name;
    }
  }
  if (esft) {
    EXPECT_EQ(trained, 6);  // 2 experts x 3 matrices
    EXPECT_GT(frozen, 20);
  } else {
    EXPECT_EQ(frozen, 0);
  }
  // The balance bias moved the same way on both sides (its update is a sign, so exactly).
  const Tensor bias_c = cpu.layers()[1].moe->gate.balance_bias->value;
  EXPECT_EQ(rel_diff(gpu.layers()[1].moe->gate.balance_bias->value, bias_c), 0.0);
  EXPECT_GT(rel_diff(bias_c, Tensor::zeros(bias_c.shape())), 0.0);
  std::printf(
      "[ gpu-train ] %s: losses %.6f %.6f %.6f (cpu %.6f %.6f %.6f), %d trained / %d "
      "frozen tensors, worst weight difference %.2e (%s)\n",
      GetParam().c_str(), lg.loss[0], lg.loss[1], lg.loss[2], lc.loss[0], lc.loss[1], lc.loss[2],
      trained, frozen, worst, worst_name.c_str());
}

INSTANTIATE_TEST_SUITE_P(GpuMethods, GpuTraining, ::testing::Values("full", "esft"));

// --- bf16 weights (--dtype bf16): frozen matrices in bf16, trainable ones with fp32 masters

// The oracle is the CPU model with the same weights rounded to bf16 (what the GPU model holds), in
// fp32. The GPU rounds every GEMM's F32 operand (activations, fp32 masters) and attention's
// inputs and probabilities to bf16 (relative error <= 2^-8 each) and accumulates in fp32: each
// GEMM's output moves by about 2^-8 of its scale, and the tiny model chains about ten of them
// (two layers of MLA and MoE, the LM head), so logits stay within ~10 * 2^-8 = 4e-2 of their
// largest value and the mean loss within 2e-2 (relative). The test also asserts that bf16 was in
// effect (the difference is not zero) and that routing did not flip on this input.
TEST(GpuBf16, FrozenWeightsStayBf16AndTrackCpu) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = tiny_config();
  DeepSeekModel cpu(c, Device::CPU), gpu(c, Device::CUDA, true, DType::BF16);
  cpu.init_random(7, 0.2f);
  gpu.init_random(7, 0.2f);
  for (const auto& p : cpu.params().all())
    if (p->matrix) p->value = p->value.to_dtype(DType::BF16).to_f32();
  size_t fp32_bytes = 0;
  for (const auto& p : gpu.params().all()) {
    EXPECT_EQ(p->value.dtype(), p->matrix ? DType::BF16 : DType::F32) << p->name;
    fp32_bytes += size_t(p->value.numel()) * 4;
    if (p->matrix) {
      EXPECT_EQ(rel_diff(p->value.to_host().to_f32(), cpu.params().at(p->name).value), 0.0);
    }
  }
  EXPECT_LT(gpu.params().value_bytes(), fp32_bytes * 3 / 4);

  backend(Device::CUDA).set_precision(Precision::Bf16);
  const int64_t batch = 2, seq = 24;
  const Tensor ids = random_ids(batch * seq, c.vocab_size, 5);
  const double d_logits = rel_diff(gpu.forward(ids, batch, seq), cpu.forward(ids, batch, seq));
  expect_same_routing(gpu, cpu);
  // The routed experts kept their activations in bf16 (the training steps below run it backward).
  for (const DecoderLayer& l : gpu.layers())
    if (l.moe) {
      EXPECT_EQ(l.moe->saved.gate.dtype(), DType::BF16);
      EXPECT_EQ(l.moe->saved.up.dtype(), DType::BF16);
    }
  EXPECT_LE(d_logits, 4e-2);
  EXPECT_GT(d_logits, 0.0) << "bf16 had no effect";

  // ESFT: the chosen experts' matrices become fp32 masters and train; the rest stay bf16, untouched
  // to the bit, with no gradient.
  ExpertConfig ec;
  ec.experts[1] = {2, 5};
  apply_expert_config(cpu, ec, "cfg");
  apply_expert_config(gpu, ec, "cfg");
  std::map<std::string, Tensor> before;
  for (const auto& p : gpu.params().all()) before[p->name] = p->value.to_host().clone();
  AdamW adam_c, adam_g;
  const StepLog lc = train_steps(cpu, adam_c, 3), lg = train_steps(gpu, adam_g, 3);
  backend(Device::CUDA).set_precision(Precision::Fp32);
  for (size_t s = 0; s < lc.loss.size(); ++s)
    EXPECT_LE(std::abs(lg.loss[s] - lc.loss[s]) / lc.loss[s], 2e-2) << "step " << s + 1;
  int trained = 0;
  for (const auto& p : gpu.params().all()) {
    const Tensor now = p->value.to_host();
    if (p->trainable) {
      ++trained;
      EXPECT_EQ(p->value.dtype(), DType::F32) << p->name;
      EXPECT_GT(rel_diff(now, before[p->name]), 0.0) << p->name << " did not move";
    } else if (!p->buffer) {
      EXPECT_EQ(p->value.dtype(), p->matrix ? DType::BF16 : DType::F32) << p->name;
      EXPECT_FALSE(p->grad.defined()) << p->name;
      ASSERT_EQ(now.nbytes(), before[p->name].nbytes());
      EXPECT_EQ(std::memcmp(now.raw(), before[p->name].raw(), now.nbytes()), 0) << p->name;
    }
  }
  EXPECT_EQ(trained, 6);
  std::printf(
      "[ gpu-bf16 ] logits within %.2e of the rounded fp32 CPU model; losses %.5f %.5f "
      "%.5f (cpu %.5f %.5f %.5f); weights %.1f KiB (fp32 %.1f KiB)\n",
      d_logits, lg.loss[0], lg.loss[1], lg.loss[2], lc.loss[0], lc.loss[1], lc.loss[2],
      double(gpu.params().value_bytes()) / 1024, double(fp32_bytes) / 1024);
}

// The embedding and the LM head are matrices of a bf16 table like the GEMM weights: bf16 while
// frozen (half the bytes of the model's two largest tensors), fp32 masters while they train, back
// to bf16 (the master rounded) when frozen again. The oracle is again the CPU model holding the
// bf16-rounded weights. Forward, decode and loss: the tolerances of the test above (4e-2 logits,
// 2e-2 loss). Gradients: backward chains about as many bf16 GEMMs again as forward (the LM head's
// dx and dW, each layer's dx), so twice the logits' bound, 1e-1; a wrong row, a missing term or an
// unconverted table is O(1). The chunked LM head + loss (loss_and_backward, 16-row chunks of 48
// tokens) sends dx through the frozen bf16 LM head, as ESFT does; under Bf16 it also writes the
// logits in bf16 and the loss reads them so (relative error <= 2^-8 per logit). That moves the
// loss by at most 2 * 2^-8 * max |logit| (the log-sum-exp and the target logit each by at most
// the largest logit error): with this model's logits under 5 (measured on the CPU by rounding its
// logits: the mean loss moves by 2e-5 to 5e-5 relative, dlogits by 1.6e-3 normwise) it stays far
// inside the loss's 2e-2 and the gradients' 1e-1, so the tolerances are unchanged.
TEST(GpuBf16, EmbeddingAndLmHeadAreBf16WhileFrozen) {
  SKIP_WITHOUT_GPU();
  struct PrecisionGuard {
    PrecisionGuard() { backend(Device::CUDA).set_precision(Precision::Bf16); }
    ~PrecisionGuard() { backend(Device::CUDA).set_precision(Precision::Fp32); }
  };
  const ModelConfig c = tiny_config();
  DeepSeekModel raw(c, Device::CPU), cpu(c, Device::CPU), gpu(c, Device::CUDA, true, DType::BF16);
  raw.init_random(7, 0.2f);
  cpu.init_random(7, 0.2f);
  gpu.init_random(7, 0.2f);
  for (const auto& p : cpu.params().all())
    if (p->matrix) p->value = p->value.to_dtype(DType::BF16).to_f32();
  const std::string kEmbed = "model.embed_tokens.weight", kHead = "lm_head.weight";
  const size_t table_bf16_bytes = size_t(c.vocab_size * c.hidden_size) * 2;
  for (const std::string& name : {kEmbed, kHead}) {
    const Param& p = gpu.params().at(name);
    EXPECT_TRUE(p.matrix) << name;
    ASSERT_EQ(p.value.dtype(), DType::BF16) << name;
    EXPECT_EQ(p.value.device(), Device::CUDA) << name;
    EXPECT_EQ(p.value.nbytes(), table_bf16_bytes) << name;
    EXPECT_EQ(rel_diff(p.value.to_host().to_f32(), cpu.params().at(name).value), 0.0) << name;
  }
  // As constructed every parameter is trainable but the matrices are bf16: no gradient for them
  // until set_trainable has given the trainable ones fp32 masters.
  try {
    gpu.params().allocate_grads();
    ADD_FAILURE() << "gradients allocated for bf16 matrices";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("set_trainable"), std::string::npos) << e.what();
  }
  // The fingerprint reads values as fp32: the bf16 model, the CPU model holding the same values
  // and the unrounded CPU model's bf16-rounded fingerprint agree.
  EXPECT_EQ(base_fingerprint(gpu), base_fingerprint(cpu));
  EXPECT_EQ(base_fingerprint(raw, true), base_fingerprint(gpu));
  EXPECT_NE(base_fingerprint(raw), base_fingerprint(gpu));

  PrecisionGuard bf16_precision;
  const int64_t batch = 2, seq = 24;
  const Tensor ids = random_ids(batch * seq, c.vocab_size, 5);
  const Tensor targets = shifted_targets(ids, batch, seq);
  const double d_logits = rel_diff(gpu.forward(ids, batch, seq), cpu.forward(ids, batch, seq));
  expect_same_routing(gpu, cpu);
  EXPECT_LE(d_logits, 4e-2);
  // Decoding: the bf16 embedding lookup and the LM head's GEMV on bf16 rows.
  double d_decode = 0.0;
  {
    Generator gg(gpu, 32), gc(cpu, 32);
    const std::vector<int32_t> prompt = {3, 250, 17};
    d_decode = rel_diff(gg.feed(prompt), gc.feed(prompt));
    EXPECT_LE(d_decode, 4e-2);
    d_decode = std::max(d_decode, rel_diff(gg.feed({299}), gc.feed({299})));
    EXPECT_LE(d_decode, 4e-2);
  }

  // Both tables train: fp32 masters holding the bf16 values exactly, gradients from the chunked
  // loss, an AdamW step; frozen again they return to bf16, the master rounded.
  const auto tables = [&](const Param& p) { return p.name == kEmbed || p.name == kHead; };
  const size_t frozen_bytes = gpu.params().value_bytes();
  std::map<std::string, Tensor> stored;
  for (const std::string& name : {kEmbed, kHead})
    stored[name] = gpu.params().at(name).value.to_host().to_f32();
  gpu.params().set_trainable(tables);
  cpu.params().set_trainable(tables);
  for (const std::string& name : {kEmbed, kHead}) {
    const Param& p = gpu.params().at(name);
    ASSERT_EQ(p.value.dtype(), DType::F32) << name;
    EXPECT_EQ(p.value.device(), Device::CUDA) << name;
    const Tensor now = p.value.to_host();
    EXPECT_EQ(std::memcmp(now.raw(), stored[name].raw(), now.nbytes()), 0) << name;
  }
  EXPECT_EQ(gpu.params().value_bytes(), frozen_bytes + 2 * table_bf16_bytes);
  for (auto* m : {&cpu, &gpu}) {
    m->params().allocate_grads();
    m->params().zero_grads();
  }
  const float loss_c = cpu.loss_and_backward(ids, targets, batch, seq, 1.0f, 16);
  const float loss_g = gpu.loss_and_backward(ids, targets, batch, seq, 1.0f, 16);
  expect_same_routing(gpu, cpu);
  EXPECT_LE(std::abs(double(loss_g) - double(loss_c)) / double(loss_c), 2e-2);
  double d_grad = 0.0;
  for (const std::string& name : {kEmbed, kHead}) {
    const Param& p = gpu.params().at(name);
    ASSERT_TRUE(p.grad.defined()) << name;
    const double d = rel_diff(p.grad, cpu.params().at(name).grad);
    EXPECT_LE(d, 1e-1) << name;
    EXPECT_GT(rel_diff(p.grad, Tensor::zeros(p.grad.shape())), 0.0) << name << ": zero gradient";
    d_grad = std::max(d_grad, d);
  }
  AdamW adam;
  adam.step(gpu.params(), 1e-2);
  std::map<std::string, Tensor> master;
  for (const std::string& name : {kEmbed, kHead}) {
    master[name] = gpu.params().at(name).value.to_host().clone();
    EXPECT_GT(rel_diff(master[name], stored[name]), 0.0) << name << " did not move";
  }
  gpu.params().set_trainable([](const Param&) { return false; });
  for (const std::string& name : {kEmbed, kHead}) {
    const Param& p = gpu.params().at(name);
    ASSERT_EQ(p.value.dtype(), DType::BF16) << name;
    EXPECT_FALSE(p.grad.defined()) << name;
    const Tensor now = p.value.to_host(), want = master[name].to_dtype(DType::BF16);
    ASSERT_EQ(now.nbytes(), want.nbytes());
    EXPECT_EQ(std::memcmp(now.raw(), want.raw(), now.nbytes()), 0) << name;
  }
  EXPECT_EQ(gpu.params().value_bytes(), frozen_bytes);
  std::printf(
      "[ gpu-bf16 ] bf16 embedding + LM head: logits within %.2e, decode %.2e, loss %.5f (cpu "
      "%.5f), table gradients %.2e; %.1f KiB each\n",
      d_logits, d_decode, double(loss_g), double(loss_c), d_grad, double(table_bf16_bytes) / 1024);
}

// How close to a tie (relative score gap) a routing choice may be and still flip between the CPU
// and the Bf16 GPU model: a few times the compounded bf16 rounding of the activations that reach
// the router (2^-8 per rounding, several per layer).
constexpr double kBf16RoutingTie = 0.03;

// ESFT with the embedding and the LM head frozen in bf16: the chunked loss's dx runs through the
// bf16 LM head (16-row chunks), the chosen experts train, the tables stay bf16 and bit-identical,
// with no gradient. Loss and expert gradients against the rounded CPU model at the tolerances of
// the test above.
TEST(GpuBf16, EsftStepWithFrozenBf16Tables) {
  SKIP_WITHOUT_GPU();
  struct PrecisionGuard {
    PrecisionGuard() { backend(Device::CUDA).set_precision(Precision::Bf16); }
    ~PrecisionGuard() { backend(Device::CUDA).set_precision(Precision::Fp32); }
  };
  const ModelConfig c = tiny_config();
  DeepSeekModel cpu(c, Device::CPU), gpu(c, Device::CUDA, true, DType::BF16);
  cpu.init_random(9, 0.2f);
  gpu.init_random(9, 0.2f);
  for (const auto& p : cpu.params().all())
    if (p->matrix) p->value = p->value.to_dtype(DType::BF16).to_f32();
  ExpertConfig ec;
  ec.experts[1] = {1, 6};
  apply_expert_config(cpu, ec, "cfg");
  apply_expert_config(gpu, ec, "cfg");
  std::map<std::string, Tensor> before;
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight"}) {
    ASSERT_EQ(gpu.params().at(name).value.dtype(), DType::BF16) << name;
    before[name] = gpu.params().at(name).value.to_host().clone();
  }
  PrecisionGuard bf16_precision;
  const int64_t batch = 2, seq = 24;
  const Tensor ids = random_ids(batch * seq, c.vocab_size, 12);
  const Tensor targets = shifted_targets(ids, batch, seq);
  // Two steps as ESFT takes them; gradients compared on the first (after it the two sides' experts
  // differ by their AdamW steps from slightly different gradients), losses on both.
  AdamW adam_c, adam_g;
  for (int step = 0; step < 2; ++step) {
    for (auto* m : {&cpu, &gpu}) {
      m->params().allocate_grads();
      m->params().zero_grads();
    }
    const float loss_c = cpu.loss_and_backward(ids, targets, batch, seq, 1.0f, 16);
    const float loss_g = gpu.loss_and_backward(ids, targets, batch, seq, 1.0f, 16);
    // Near-ties may flip (bf16 activations: expect_same_routing), at most a few of 48 tokens.
    const std::set<std::string> flipped = expect_same_routing(gpu, cpu, kBf16RoutingTie);
    EXPECT_LE(std::abs(double(loss_g) - double(loss_c)) / double(loss_c), 2e-2) << step;
    int trained = 0;
    for (const auto& p : cpu.params().all()) {
      if (!p->grad.defined()) continue;
      ++trained;
      const Param& q = gpu.params().at(p->name);
      ASSERT_TRUE(q.grad.defined()) << p->name;
      EXPECT_EQ(q.value.dtype(), DType::F32) << p->name;
      if (step == 0 && !in_flipped(flipped, p->name)) {
        EXPECT_LE(rel_diff(q.grad, p->grad), 1e-1) << p->name;
      }
    }
    if (step == 0) {
      EXPECT_LE(flipped.size(), size_t(2)) << "more than one routing choice flipped";
    }
    EXPECT_EQ(trained, 6);
    adam_c.step(cpu.params(), 1e-3);
    adam_g.step(gpu.params(), 1e-3);
  }
  for (const auto& [name, t] : before) {
    const Param& p = gpu.params().at(name);
    EXPECT_EQ(p.value.dtype(), DType::BF16) << name;
    EXPECT_FALSE(p.grad.defined()) << name;
    const Tensor now = p.value.to_host();
    ASSERT_EQ(now.nbytes(), t.nbytes());
    EXPECT_EQ(std::memcmp(now.raw(), t.raw(), now.nbytes()), 0) << name;
  }
}

// The CPU backend never holds bf16 weights (--dtype bf16 needs --device cuda), but a BF16 table
// that reaches its embedding lookup is a clear error, not a misread. Runs without a GPU.
TEST(GpuBf16, CpuEmbeddingRefusesBf16Table) {
  Tensor table = Tensor::zeros({4, 3}, DType::BF16), ids = Tensor::zeros({2}, DType::I32);
  Tensor out = Tensor::empty({2, 3});
  try {
    backend(Device::CPU).embedding_forward(out, table, ids);
    FAIL() << "the CPU backend accepted a BF16 table";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("embedding_forward: BF16 table on the CPU"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--device cuda"), std::string::npos) << msg;
  }
}

TEST(GpuBf16, CpuRefusesBf16Weights) {
  try {
    DeepSeekModel m(tiny_config(), Device::CPU, true, DType::BF16);
    FAIL() << "a CPU model accepted bf16 matrices";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--device cuda"), std::string::npos) << e.what();
  }
}

// --- one MoE layer

// The small MoE layer of the GpuMoE tests: 16 routed experts of width 20 at hidden 48, top-4, one
// shared expert.
ModelConfig small_moe_config() {
  ModelConfig c;
  c.hidden_size = 48;
  c.moe_intermediate_size = 20;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 4;
  c.n_shared_experts = 1;
  return c;
}

// Host tensors of N(0, 0.3) values from one seeded stream.
struct NormalTensors {
  explicit NormalTensors(uint64_t seed) : rng(seed) {}
  Tensor operator()(Shape s) {
    Tensor t = Tensor::empty(s);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = normal(rng);
    return t;
  }
  std::mt19937_64 rng;
  std::normal_distribution<float> normal{0.0f, 0.3f};
};

// The MoE layer alone, forward and backward, with every third routed expert frozen (ESFT): the
// device dispatch plan, the grouped expert GEMMs, the dtopk scatter and the skipped weight GEMMs.
// 16 experts, top-4 of 37 tokens (148 pairs: not a multiple of a warp); tolerances as the model's
// (each op ~1e-6 of its largest value, backward chains a few more). Routing is checked first.
TEST(GpuMoE, LayerWithFrozenExpertsMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = small_moe_config();
  const int64_t T = 37;
  ParamTable cp, gp;
  MoE cpu = MoE::create(cp, "mlp", c, Device::CPU), gpu = MoE::create(gp, "mlp", c, Device::CUDA);
  NormalTensors randn(5);
  for (const auto& p : cp.all()) {
    p->value.copy_from(randn(p->value.shape()));
    gp.at(p->name).value.copy_from(p->value);
  }
  auto frozen = [](const Param& p) {
    for (int e = 0; e < 16; e += 3)
      if (p.name.find(".experts." + std::to_string(e) + ".") != std::string::npos) return true;
    return false;
  };
  for (ParamTable* t : {&cp, &gp}) {
    t->set_trainable([&](const Param& p) { return !frozen(p); });
    t->allocate_grads();
  }
  Tensor x = randn({T, c.hidden_size}), dy = randn({T, c.hidden_size});
  Backend &bc = backend(Device::CPU), &bg = backend(Device::CUDA);
  const Tensor y_c = cpu.forward(bc, x), y_g = gpu.forward(bg, x.to_device(Device::CUDA));
  const Tensor idx_c = cpu.gate.saved.routing.topk_idx;
  const Tensor idx_g = gpu.gate.saved.routing.topk_idx.to_host();
  ASSERT_EQ(std::memcmp(idx_c.raw(), idx_g.raw(), idx_c.nbytes()), 0) << "routing differs";
  EXPECT_EQ(gpu.expert_load, cpu.expert_load);
  EXPECT_LE(rel_diff(y_g, y_c), kLogitsTol);
  // The exact path: under the Fp32 precision the routed experts' activations stay F32.
  ASSERT_EQ(bg.precision(), Precision::Fp32);
  for (const Tensor* t : {&gpu.saved.x, &gpu.saved.gate, &gpu.saved.up})
    EXPECT_EQ(t->dtype(), DType::F32);
  Tensor dx_c = Tensor::empty(x.shape()), dx_g = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
  cpu.backward(bc, dx_c, dy, false);
  gpu.backward(bg, dx_g, dy.to_device(Device::CUDA), false);
  EXPECT_LE(rel_diff(dx_g, dx_c), kGradTol);
  int64_t trained = 0;
  for (const auto& p : cp.all()) {
    const Param& g = gp.at(p->name);
    EXPECT_EQ(g.grad.defined(), p->grad.defined()) << p->name;
    if (frozen(*p)) {
      EXPECT_FALSE(g.grad.defined()) << p->name;
    }
    if (!p->grad.defined() || !g.grad.defined()) continue;
    ++trained;
    EXPECT_LE(rel_diff(g.grad, p->grad), kGradTol) << p->name;
  }
  EXPECT_GT(trained, 0);
}

// Sets a backend's precision for a scope (restored on the way out, failed assertions included).
struct PrecisionScope {
  PrecisionScope(Backend& b, Precision p) : be(b), before(b.precision()) { be.set_precision(p); }
  ~PrecisionScope() { be.set_precision(before); }
  Backend& be;
  Precision before;
};

// A bf16 table's trainable matrices keep a bf16 GEMM copy of their fp32 masters (Param::gemm_copy):
// made by set_trainable, written by every AdamW step, refreshed by set_value, absent for frozen
// matrices. The GEMMs that read it would round the master to the same values, so a step with the
// copies dropped (every GEMM rounding the masters itself) must give the same loss and gradients to
// the bit.
TEST(GpuBf16, GemmCopiesTrackTheMastersAndChangeNothing) {
  SKIP_WITHOUT_GPU();
  const PrecisionScope bf16(backend(Device::CUDA), Precision::Bf16);
  const ModelConfig c = tiny_config();
  DeepSeekModel m(c, Device::CUDA, true, DType::BF16);
  m.init_random(9, 0.2f);
  ExpertConfig ec;
  ec.experts[1] = {1, 6};
  apply_expert_config(m, ec, "cfg");
  int copies = 0;
  auto expect_copies_round_masters = [&](const char* when) {
    copies = 0;
    for (const auto& p : m.params().all()) {
      const bool master = p->matrix && p->trainable;
      EXPECT_EQ(p->gemm_copy.defined(), master) << p->name << " " << when;
      if (!master || !p->gemm_copy.defined()) continue;
      ++copies;
      Tensor rounded = Tensor::empty(p->value.shape(), DType::BF16, Device::CUDA);
      backend(Device::CUDA).round_bf16(rounded, p->value);
      EXPECT_TRUE(test::bit_equal(p->gemm_copy, rounded)) << p->name << " " << when;
    }
  };
  expect_copies_round_masters("after set_trainable");
  EXPECT_EQ(copies, 6);  // two experts' three projections
  const int64_t batch = 2, seq = 24;
  const Tensor ids = random_ids(batch * seq, c.vocab_size, 12);
  const Tensor targets = shifted_targets(ids, batch, seq);
  AdamW adam;
  m.params().allocate_grads();
  for (int step = 0; step < 2; ++step) {
    m.params().zero_grads();
    (void)m.loss_and_backward(ids, targets, batch, seq, 1.0f, 16);
    adam.step(m.params(), 1e-2);
  }
  expect_copies_round_masters("after two AdamW steps");
  Param& w = m.params().at("model.layers.1.mlp.experts.6.up_proj.weight");
  set_value(w, w.value.to_host().to_dtype(DType::BF16).to_f32());  // a reload
  expect_copies_round_masters("after set_value");

  auto step_grads = [&](std::map<std::string, Tensor>& grads) {
    m.params().zero_grads();
    const float loss = m.loss_and_backward(ids, targets, batch, seq, 1.0f, 16);
    for (const auto& p : m.params().all())
      if (p->grad.defined()) grads[p->name] = p->grad.to_host();
    return loss;
  };
  std::map<std::string, Tensor> with, without;
  const float loss_with = step_grads(with);
  for (const auto& p : m.params().all()) p->gemm_copy = Tensor();
  const float loss_without = step_grads(without);
  EXPECT_EQ(loss_with, loss_without);
  ASSERT_EQ(with.size(), 6u);
  for (const auto& [name, g] : with) EXPECT_TRUE(test::bit_equal(g, without.at(name))) << name;
}

// The MoE layer under Precision::Bf16 on its bf16 activation path (the input, gate and up saved as
// BF16; xs, h, the expert outputs and backward's dys, dout, dgate, dup in bf16; the combine
// weights' gradient from swiglu_scaled_backward), forward and backward, against the CPU
// layer in exact fp32 on the same values. A bf16 table as with --dtype bf16: every third routed
// expert frozen (BF16 weights, no gradient), the others, the shared expert and the router train
// (fp32 masters). Every weight and x hold bf16 values, so no GEMM operand is changed by rounding
// and the router's logits agree as in fp32 (routing is checked); what remains is the path's own
// rounding: gate/up, h and expert_out (and the shared expert's h) each rounded once, <= 2^-8 of
// the element, and backward's dys, dout, dgate, dup and the dx products likewise. A CPU emulation
// of exactly these roundings (these shapes with seeds 5..17, and H 256 / I 96) put y within 3.3e-3
// of fp32 (normwise) and dx within 3.8e-3 (this seed: 1.2e-3 and 2.1e-3): tolerance 1e-2 (2.5 x
// 2^-8). A weight gradient sums the few rows of one expert (T*K/E ~ 9) of products of two rounded
// factors (2 x 2^-8 = 7.8e-3 per element): measured up to 9.2e-3 (this seed 5.6e-3), tolerance
// 2e-2. y must differ (bf16 in effect). At T = 1100 (4400 pairs, ~275 rows per expert) the
// CUDA backend pads each expert's rows to a multiple of 128 (expert_row_alignment) and runs the
// batched expert GEMMs: the same checks hold, and the saved rows include the padding.
TEST(GpuMoE, Bf16ActivationsForwardBackwardTrackCpu) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = small_moe_config();
  ParamTable cp, gp(true, DType::BF16);
  MoE cpu = MoE::create(cp, "mlp", c, Device::CPU), gpu = MoE::create(gp, "mlp", c, Device::CUDA);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  auto bf16_values = [&](Shape s) {
    Tensor t = Tensor::empty(s);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = normal(rng);
    return t.to_dtype(DType::BF16).to_f32();
  };
  auto frozen = [](const Param& p) {
    for (int e = 0; e < 16; e += 3)
      if (p.name.find(".experts." + std::to_string(e) + ".") != std::string::npos) return true;
    return false;
  };
  for (ParamTable* t : {&cp, &gp}) t->set_trainable([&](const Param& p) { return !frozen(p); });
  for (const auto& p : cp.all()) {
    p->value.copy_from(bf16_values(p->value.shape()));
    set_value(gp.at(p->name), p->value);
  }
  for (ParamTable* t : {&cp, &gp}) t->allocate_grads();
  ASSERT_EQ(gpu.routed_experts[0].gate_proj->value.dtype(), DType::BF16);  // frozen
  ASSERT_EQ(gpu.routed_experts[1].gate_proj->value.dtype(), DType::F32);   // an fp32 master
  for (const int64_t T : {37, 1100}) {
    SCOPED_TRACE(testing::Message() << "T " << T);
    const Tensor x = bf16_values({T, c.hidden_size});
    Tensor dy = Tensor::empty({T, c.hidden_size});
    for (int64_t i = 0; i < dy.numel(); ++i) dy.f32()[i] = normal(rng);
    Backend &bc = backend(Device::CPU), &bg = backend(Device::CUDA);
    const PrecisionScope bf16(bg, Precision::Bf16);

    const Tensor y_c = cpu.forward(bc, x), y_g = gpu.forward(bg, x.to_device(Device::CUDA));
    for (const Tensor* t : {&gpu.saved.x, &gpu.saved.gate, &gpu.saved.up}) {
      EXPECT_EQ(t->dtype(), DType::BF16) << "the bf16 activation path was not taken";
      EXPECT_EQ(t->device(), Device::CUDA);
    }
    EXPECT_EQ(cpu.saved.gate.dtype(), DType::F32);
    const int64_t pairs = T * c.num_experts_per_tok;
    const char* mode = std::getenv("MOEKIT_CUDA_EXPERT_GEMM");
    if (T == 1100 && (!mode || std::string(mode) == "batched")) {
      EXPECT_GT(gpu.saved.gate.dim(0), pairs) << "no padded blocks at ~275 rows per expert";
    } else if (T == 37) {
      EXPECT_EQ(gpu.saved.gate.dim(0), pairs) << "padding at ~9 rows per expert";
    }
    const Tensor idx_c = cpu.gate.saved.routing.topk_idx;
    const Tensor idx_g = gpu.gate.saved.routing.topk_idx.to_host();
    ASSERT_EQ(std::memcmp(idx_c.raw(), idx_g.raw(), idx_c.nbytes()), 0) << "routing differs";
    const double y_rel = rel_diff(y_g, y_c);
    EXPECT_LE(y_rel, 1e-2);
    EXPECT_GT(y_rel, 0.0) << "bf16 had no effect";

    Tensor dx_c = Tensor::empty(x.shape()),
           dx_g = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
    cpu.backward(bc, dx_c, dy, false);
    gpu.backward(bg, dx_g, dy.to_device(Device::CUDA), false);
    const double dx_rel = rel_diff(dx_g, dx_c);
    EXPECT_LE(dx_rel, 1e-2);
    double worst = 0.0;
    std::string worst_name;
    int64_t trained = 0;
    for (const auto& p : cp.all()) {
      const Param& g = gp.at(p->name);
      EXPECT_EQ(g.grad.defined(), p->grad.defined()) << p->name;
      if (!p->grad.defined() || !g.grad.defined()) continue;
      EXPECT_EQ(g.grad.dtype(), DType::F32) << p->name;
      const double d = rel_diff(g.grad, p->grad);
      EXPECT_LE(d, 2e-2) << p->name;
      if (d > worst) worst = d, worst_name = p->name;
      ++trained;
    }
    EXPECT_GT(trained, 30);  // 10 routed experts x 3, the shared expert's 3, the router
    std::printf(
        "[ gpu-moe-bf16 ] T %lld (%lld slots): y %.2e, dx %.2e, %lld gradients, worst %.2e (%s)\n",
        static_cast<long long>(T), static_cast<long long>(gpu.saved.plan.expert_begin.back()),
        y_rel, dx_rel, static_cast<long long>(trained), worst, worst_name.c_str());
    for (ParamTable* t : {&cp, &gp})
      for (const auto& p : t->all())
        if (p->grad.defined()) backend(p->grad.device()).fill(p->grad, 0.0f);
  }
}

// MoE::recompute_experts on the GPU under Bf16, at T = 1100 (padded blocks, batched GEMMs) with
// two experts training: forward keeps no gate/up, and backward's recomputation runs the same
// gather and GEMMs on the same values, so y, dx and every weight gradient are bit-identical to
// keeping them.
TEST(GpuMoE, RecomputeExpertsIsBitIdentical) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = small_moe_config();
  ParamTable gp(true, DType::BF16);
  MoE gpu = MoE::create(gp, "mlp", c, Device::CUDA);
  gp.set_trainable([](const Param& p) {
    return p.name.find(".experts.2.") != std::string::npos ||
           p.name.find(".experts.5.") != std::string::npos;
  });
  NormalTensors randn(7);
  // The balance bias stays zero: a random one outweighs softmax scores of ~1/16 and sends every
  // token to the same few experts (the two trained ones would get no rows).
  for (const auto& p : gp.all())
    set_value(*p, p->buffer ? Tensor::zeros(p->value.shape()) : randn(p->value.shape()));
  gp.allocate_grads();
  Backend& bg = backend(Device::CUDA);
  const PrecisionScope bf16(bg, Precision::Bf16);
  const int64_t T = 1100;
  const Tensor x = randn({T, c.hidden_size}).to_device(Device::CUDA);
  const Tensor dy = randn({T, c.hidden_size}).to_device(Device::CUDA);
  auto run = [&](bool recompute) {
    gpu.recompute_experts = recompute;
    for (const auto& p : gp.all())
      if (p->grad.defined()) bg.fill(p->grad, 0.0f);
    std::vector<Tensor> out{gpu.forward(bg, x).to_host()};
    EXPECT_EQ(gpu.saved.gate.defined(), !recompute);
    EXPECT_GT(gpu.expert_load.at(2), 0);
    EXPECT_GT(gpu.expert_load.at(5), 0);
    Tensor dx = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
    gpu.backward(bg, dx, dy, false);
    out.push_back(dx.to_host());
    for (const auto& p : gp.all())
      if (p->grad.defined()) out.push_back(p->grad.to_host());
    return out;
  };
  const std::vector<Tensor> kept = run(false), recomputed = run(true);
  ASSERT_EQ(kept.size(), recomputed.size());
  EXPECT_EQ(kept.size(), 2u + 6u);  // y, dx, two experts' three matrices
  for (size_t i = 0; i < kept.size(); ++i) {
    double m = 0.0;
    for (int64_t j = 0; j < kept[i].numel(); ++j)
      m = std::max(m, double(std::abs(kept[i].f32()[j])));
    EXPECT_GT(m, 0.0) << "output " << i << " is all zeros";
    EXPECT_EQ(std::memcmp(kept[i].raw(), recomputed[i].raw(), kept[i].nbytes()), 0)
        << "output " << i << " differs";
  }
}

// Random N(0, 0.3) weights into the CPU layer's table and the same values into the GPU one's; a
// CPU weight whose GPU twin is BF16 keeps the bf16-rounded values (in fp32), so both hold the
// same numbers.
void fill_same_weights(ParamTable& cp, ParamTable& gp, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (const auto& p : cp.all()) {
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] = normal(rng);
    Param& g = gp.at(p->name);
    set_value(g, p->value);
    if (g.value.dtype() == DType::BF16) p->value = p->value.to_dtype(DType::BF16).to_f32();
  }
}

// One token and three through the GPU layer's few-token path against the CPU layer: the same
// routing, outputs within kLogitsTol.
void expect_few_token_path_matches(MoE& cpu, MoE& gpu, int64_t hidden, std::mt19937_64& rng) {
  Backend &bc = backend(Device::CPU), &bg = backend(Device::CUDA);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (int64_t T : {1, 3}) {
    SCOPED_TRACE(testing::Message() << "T " << T);
    Tensor x = Tensor::empty({T, hidden});
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = normal(rng);
    const Tensor y_c = cpu.forward(bc, x);
    const Tensor y_g = gpu.forward(bg, x.to_device(Device::CUDA), /*backward_follows=*/false);
    EXPECT_TRUE(gpu.expert_load.empty()) << "the grouped path ran";
    const Tensor idx_c = cpu.gate.saved.routing.topk_idx;
    const Tensor idx_g = gpu.gate.saved.routing.topk_idx.to_host();
    ASSERT_EQ(std::memcmp(idx_c.raw(), idx_g.raw(), idx_c.nbytes()), 0) << "routing differs";
    EXPECT_LE(rel_diff(y_g, y_c), kLogitsTol);
  }
}

// The few-token path (inference forward, T*K <= MoE::kSmallMaxPairs): the GPU layer's GEMVs
// against the CPU layer's grouped path (plan, GEMMs, combine) on the same weights, one token
// (decode) and three, K = 6 of 16 experts. F32 weights: the same fp32 math in another summation
// order, kLogitsTol as above. BF16 weights (a frozen bf16 table): against the CPU layer holding the
// bf16-rounded weights in fp32; the GEMVs widen each bf16 weight exactly and keep x in fp32, so it
// is again only summation order: the same tolerance (the shared expert is kept trainable, so in
// fp32: a bf16 shared expert would round x for its GEMMs, which is not this path's concern). Then
// one routed expert trains too (an fp32 master among bf16 experts): mixed dtypes must fall back to
// the grouped path (expert_load filled), whose GEMMs then run in bf16 (x rounded, GpuBf16 above):
// checked at the 4e-2 of that test.
TEST(GpuMoE, FewTokenPathMatchesCpuGroupedPath) {
  SKIP_WITHOUT_GPU();
  ModelConfig c;
  c.hidden_size = 72;
  c.moe_intermediate_size = 40;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 6;
  c.n_shared_experts = 1;
  Backend &bc = backend(Device::CPU), &bg = backend(Device::CUDA);
  for (DType dtype : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    ParamTable cp, gp(true, dtype);
    MoE cpu = MoE::create(cp, "mlp", c, Device::CPU);
    MoE gpu = MoE::create(gp, "mlp", c, Device::CUDA);
    auto shared_or = [](const std::string& prefix) {
      return [prefix](const Param& p) {
        return p.name.rfind("mlp.shared_experts.", 0) == 0 ||
               (!prefix.empty() && p.name.rfind(prefix, 0) == 0);
      };
    };
    gp.set_trainable(shared_or(""));
    std::mt19937_64 rng(17);
    fill_same_weights(cp, gp, rng);
    EXPECT_EQ(gpu.routed_experts[0].gate_proj->value.dtype(), dtype);
    expect_few_token_path_matches(cpu, gpu, c.hidden_size, rng);
    if (dtype == DType::BF16) {
      std::normal_distribution<float> normal(0.0f, 0.3f);
      gp.set_trainable(shared_or("mlp.experts.3."));
      ASSERT_EQ(gpu.routed_experts[3].gate_proj->value.dtype(), DType::F32);
      Tensor x = Tensor::empty({1, c.hidden_size});
      for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = normal(rng);
      const Tensor y_c = cpu.forward(bc, x);
      const Tensor y_g = gpu.forward(bg, x.to_device(Device::CUDA), /*backward_follows=*/false);
      EXPECT_EQ(int64_t(gpu.expert_load.size()), c.n_routed_experts) << "mixed dtypes went small";
      EXPECT_LE(rel_diff(y_g, y_c), 4e-2);
    }
  }
}

// The shared experts folded into the few-token path's kernels (moe_experts_small's `shared`): every
// weight bf16 (frozen), the shared experts too, two of them (Is = 2 I, as V2-Lite), against the CPU
// layer's grouped path on the bf16-rounded weights in fp32. The GEMVs widen each bf16 weight
// exactly and keep x in fp32, for the shared experts as for the routed ones (a separate bf16
// shared MLP would run bf16 GEMMs on a rounded x), so it is again only summation order:
// kLogitsTol.
TEST(GpuMoE, FewTokenPathFoldsBf16SharedExperts) {
  SKIP_WITHOUT_GPU();
  ModelConfig c;
  c.hidden_size = 72;
  c.moe_intermediate_size = 40;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 6;
  c.n_shared_experts = 2;
  ParamTable cp, gp(true, DType::BF16);
  MoE cpu = MoE::create(cp, "mlp", c, Device::CPU);
  MoE gpu = MoE::create(gp, "mlp", c, Device::CUDA);
  std::mt19937_64 rng(23);
  fill_same_weights(cp, gp, rng);
  ASSERT_EQ(gpu.shared_experts.down_proj->value.dtype(), DType::BF16);
  ASSERT_EQ(gpu.shared_experts.intermediate(), 2 * c.moe_intermediate_size);
  expect_few_token_path_matches(cpu, gpu, c.hidden_size, rng);
}

// MoE::forward_add and MLP::forward_add (inference, y += layer(x)) against forward then add, on
// the GPU. MoE: F32 weights, BF16 weights (the shared experts folded into the few-token kernels),
// and BF16 routed experts next to an fp32 (trainable) shared expert (not folded: it runs first,
// then the routed experts accumulate); T = 1 and 3 (few-token path: the experts add into y) and
// T = 11 (66 pairs: the grouped path, then an add). Both sides run the same deterministic kernels
// and differ at most in where y enters a sum (the down GEMV's beta = 1 against an add kernel):
// fp32 rounding, far below kLogitsTol. MLP: F32 and BF16 weights, T = 1 (the few-row GEMV with
// beta = 1) and T = 6 (cuBLAS with beta = 1); same tolerance.
TEST(GpuMoE, ForwardAddEqualsForwardPlusAdd) {
  SKIP_WITHOUT_GPU();
  ModelConfig c;
  c.hidden_size = 72;
  c.moe_intermediate_size = 40;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 6;
  c.n_shared_experts = 2;
  Backend& bg = backend(Device::CUDA);
  std::mt19937_64 rng(31);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  auto randn = [&](Shape s) {
    Tensor t = Tensor::empty(s);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = normal(rng);
    return t.to_device(Device::CUDA);
  };
  for (int variant = 0; variant < 3; ++variant) {
    const DType dtype = variant == 0 ? DType::F32 : DType::BF16;
    SCOPED_TRACE(testing::Message() << "variant " << variant);
    ParamTable gp(true, dtype);
    MoE moe = MoE::create(gp, "mlp", c, Device::CUDA);
    if (variant == 2)
      gp.set_trainable([](const Param& p) { return p.name.rfind("mlp.shared_experts.", 0) == 0; });
    for (const auto& p : gp.all()) set_value(*p, randn(p->value.shape()).to_host());
    ASSERT_EQ(moe.shared_experts.gate_proj->value.dtype(), variant == 1 ? DType::BF16 : DType::F32);
    for (int64_t T : {1, 3, 11}) {
      SCOPED_TRACE(testing::Message() << "T " << T);
      const Tensor x = randn({T, c.hidden_size}), y0 = randn({T, c.hidden_size});
      Tensor ref = Tensor::empty(y0.shape(), DType::F32, Device::CUDA);
      ref.copy_from(y0);
      bg.add(ref, moe.forward(bg, x, /*backward_follows=*/false), 1.0f);
      Tensor y = Tensor::empty(y0.shape(), DType::F32, Device::CUDA);
      y.copy_from(y0);
      moe.forward_add(bg, x, y);
      EXPECT_EQ(moe.expert_load.empty(), T < 11) << "took the wrong route";
      EXPECT_LE(rel_diff(y, ref.to_host()), kLogitsTol);
    }
  }
  for (DType dtype : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    ParamTable gp(true, dtype);
    MLP mlp = MLP::create(gp, "mlp", c.hidden_size, 56, Device::CUDA);
    for (const auto& p : gp.all()) set_value(*p, randn(p->value.shape()).to_host());
    ASSERT_EQ(mlp.down_proj->value.dtype(), dtype);
    for (int64_t T : {1, 6}) {
      SCOPED_TRACE(testing::Message() << "T " << T);
      const Tensor x = randn({T, c.hidden_size}), y0 = randn({T, c.hidden_size});
      Tensor ref = Tensor::empty(y0.shape(), DType::F32, Device::CUDA);
      ref.copy_from(y0);
      bg.add(ref, mlp.forward(bg, x), 1.0f);
      Tensor y = Tensor::empty(y0.shape(), DType::F32, Device::CUDA);
      y.copy_from(y0);
      mlp.forward_add(bg, x, y);
      EXPECT_LE(rel_diff(y, ref.to_host()), kLogitsTol);
    }
  }
}

// --- decoding and memory checks

TEST(GpuModel, GreedyGenerationMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = tiny_config();
  DeepSeekModel cpu(c, Device::CPU), gpu(c, Device::CUDA);
  cpu.init_random(11, 0.2f);
  gpu.init_random(11, 0.2f);
  Generator gc(cpu, 64), gg(gpu, 64);
  SamplingParams p;
  p.max_tokens = 20;
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 5};
  const Tensor first_c = gc.feed(prompt), first_g = gg.feed(prompt);
  EXPECT_LE(rel_diff(first_g, first_c), kLogitsTol);
  // Generation feeds no more than MoE::kSmallMaxPairs (token, expert) pairs per step here, so
  // every MoE layer took the few-token path (moe_experts_small) on both sides.
  ASSERT_LE(int64_t(prompt.size()) * c.num_experts_per_tok, MoE::kSmallMaxPairs);
  for (const DecoderLayer& l : gpu.layers())
    if (l.moe) {
      EXPECT_TRUE(l.moe->expert_load.empty()) << "the grouped path ran";
    }
  gc.reset();
  gg.reset();
  EXPECT_EQ(gg.generate(prompt, p), gc.generate(prompt, p));
  EXPECT_TRUE(gg.replays_steps()) << "the decode step was not recorded as a CUDA graph";
  EXPECT_FALSE(gc.replays_steps());
  EXPECT_EQ(gg.unrecorded_reason(), "");
  EXPECT_EQ(gc.unrecorded_reason(), "");  // the CPU records nothing, and that is no failure
  // The same after a prompt too long for the few-token path: the prefill takes the grouped path
  // (expert_load filled), the decode steps the GEMVs; the GPU must still choose the CPU's tokens.
  // (GpuMoE.FewTokenPathMatchesCpuGroupedPath compares the two paths directly.)
  std::vector<int32_t> long_prompt;
  for (int32_t i = 0; i < 40; ++i) long_prompt.push_back((7 * i + 3) % int32_t(c.vocab_size));
  ASSERT_GT(int64_t(long_prompt.size()) * c.num_experts_per_tok, MoE::kSmallMaxPairs);
  gc.reset();
  gg.reset();
  const Tensor long_c = gc.feed(long_prompt), long_g = gg.feed(long_prompt);
  EXPECT_LE(rel_diff(long_g, long_c), kLogitsTol);
  for (const DecoderLayer& l : gpu.layers())
    if (l.moe) {
      EXPECT_FALSE(l.moe->expert_load.empty()) << "the few-token path ran";
    }
  gc.reset();
  gg.reset();
  EXPECT_EQ(gg.generate(long_prompt, p), gc.generate(long_prompt, p));
}

// A decode step that cannot be recorded runs op by op and says why: with one routed expert
// training (an fp32 master beside the frozen bf16 ones) the experts take the host-planned grouped
// path, whose host copy a recording cannot hold. It still generates every token.
TEST(GpuModel, UnrecordedDecodeSaysWhy) {
  SKIP_WITHOUT_GPU();
  const PrecisionScope bf16(backend(Device::CUDA), Precision::Bf16);
  const ModelConfig c = tiny_config();
  DeepSeekModel mixed(c, Device::CUDA, true, DType::BF16),
      frozen(c, Device::CUDA, true, DType::BF16);
  mixed.init_random(11, 0.2f);
  frozen.init_random(11, 0.2f);
  mixed.params().set_trainable(
      [](const Param& p) { return p.name.find("mlp.experts.3.") != std::string::npos; });
  frozen.params().set_trainable([](const Param&) { return false; });
  Generator gm(mixed, 64), gf(frozen, 64);
  SamplingParams p;
  p.max_tokens = 8;
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 5};
  const std::vector<int32_t> tm = gm.generate(prompt, p), tf = gf.generate(prompt, p);
  EXPECT_FALSE(gm.replays_steps());
  EXPECT_NE(gm.unrecorded_reason(), "") << "the step fell back without a reason";
  EXPECT_TRUE(gf.replays_steps());
  EXPECT_EQ(gf.unrecorded_reason(), "");
  EXPECT_EQ(tm.size(), size_t(8));
  EXPECT_EQ(tf.size(), size_t(8));
}

TEST(GpuModel, DecodeStepMatchesCpu) {
  // One attention layer: a prompt by mla_decode, then steps by mla_decode_step (device-side
  // positions: the fused cache write, query absorption, latent attention over the whole cache and
  // value heads), one token at a time and two in one step, on both sides; outputs and caches as
  // the CPU's. Sizes of the tiny config (r 16,
  // dr 8, 2 heads): the kernel's predicated partial tiles.
  SKIP_WITHOUT_GPU();
  const ModelConfig c = tiny_config();
  DeepSeekModel cpu(c, Device::CPU), gpu(c, Device::CUDA);
  cpu.init_random(12, 0.2f);
  gpu.init_random(12, 0.2f);
  const int64_t cap = 40, S = 12;
  std::mt19937_64 rng(13);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensor x = Tensor::empty({S, c.hidden_size}), pos = Tensor::empty({S}, DType::I32);
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = normal(rng);
  for (int64_t i = 0; i < S; ++i) pos.i32()[i] = int32_t(i);
  struct Run {
    Tensor y;  // [S, hidden] on the host
    KVCache cache;
  };
  auto run = [&](DeepSeekModel& m) {
    const Device d = m.device();
    Backend& be = backend(d);
    MLA& attn = m.layers()[0].self_attn;
    const RopeTable rope = RopeTable::build(c, cap, d);
    Run r{Tensor::empty({S, c.hidden_size}), KVCache::create(c, cap, d)};
    const Tensor xd = x.to_device(d), pd = pos.to_device(d);
    auto keep = [&](const Tensor& y, int64_t b) {
      const Tensor h = y.to_host();
      std::copy(h.f32(), h.f32() + h.numel(), r.y.f32() + b * c.hidden_size);
    };
    keep(mla_decode(be, attn, xd.slice(0, 5), pd.slice(0, 5), rope, r.cache.layers[0], 0), 0);
    for (auto [b, e] : {std::pair<int64_t, int64_t>{5, 7}, {7, 8}, {8, 9}, {9, 10}, {10, 12}}) {
      // From a zero residual: what the step adds is its attention output.
      Tensor y = Tensor::zeros({e - b, c.hidden_size}, DType::F32, d);
      mla_decode_step(be, attn, xd.slice(b, e), pd.slice(b, e), rope, r.cache.layers[0], y);
      keep(y, b);
    }
    return r;
  };
  const Run rc = run(cpu), rg = run(gpu);
  EXPECT_LE(rel_diff(rg.y, rc.y), kLogitsTol);
  EXPECT_LE(rel_diff(rg.cache.layers[0].kv_latent, rc.cache.layers[0].kv_latent), kLogitsTol);
  EXPECT_LE(rel_diff(rg.cache.layers[0].k_rope, rc.cache.layers[0].k_rope), kLogitsTol);
}

// A recorded decode step replays exactly what the op-by-op step computes (same kernels, same
// memory), bit for bit, across steps, a reset and a second prompt, in fp32 and with bf16 weights.
TEST(GpuModel, DecodeGraphReplayMatchesEagerSteps) {
  SKIP_WITHOUT_GPU();
  for (DType dtype : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const ModelConfig c = tiny_config();
    DeepSeekModel gpu(c, Device::CUDA, true, dtype);
    gpu.init_random(5, 0.2f);
    setenv("MOEKIT_CUDA_GRAPHS", "0", 1);
    Generator eager(gpu, 48);
    const Tensor warm = eager.feed({3, 4});
    const Tensor first = eager.feed({9});  // records nothing: graphs are off
    unsetenv("MOEKIT_CUDA_GRAPHS");
    Generator graph(gpu, 48);
    ASSERT_EQ(std::memcmp(graph.feed({3, 4}).to_host().raw(), warm.to_host().raw(), warm.nbytes()),
              0);
    const Tensor first_graph = graph.feed({9});
    EXPECT_FALSE(eager.replays_steps());
    ASSERT_TRUE(graph.replays_steps());
    EXPECT_EQ(std::memcmp(first_graph.to_host().raw(), first.to_host().raw(), first.nbytes()), 0);
    for (int round = 0; round < 2; ++round) {
      for (int32_t id : {11, 0, int32_t(c.vocab_size - 1), 7, 7}) {
        const Tensor a = eager.feed({id}), b = graph.feed({id});
        EXPECT_EQ(std::memcmp(a.to_host().raw(), b.to_host().raw(), a.nbytes()), 0) << "id " << id;
      }
      EXPECT_EQ(eager.cache().length, graph.cache().length);
      eager.reset();
      graph.reset();
      const Tensor a = eager.feed({8, 1, 2}), b = graph.feed({8, 1, 2});
      EXPECT_EQ(std::memcmp(a.to_host().raw(), b.to_host().raw(), a.nbytes()), 0);
    }
  }
}

TEST(GpuModel, MemoryCheckSaysNeededAndFree) {
  SKIP_WITHOUT_GPU();
  ModelConfig c = tiny_config();
  c.hidden_size = 16384;
  c.num_hidden_layers = 200;
  c.intermediate_size = 65536;
  const MemoryEstimate need = estimate_memory(c, 8 * 4096, summarize(c).total);
  try {
    check_device_memory(need, Device::CUDA, "huge");
    FAIL() << "a model of " << need.total() << " bytes fit";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("huge: needs about"), std::string::npos) << msg;
    EXPECT_NE(msg.find("GPU has"), std::string::npos) << msg;
    EXPECT_NE(msg.find("free of"), std::string::npos) << msg;
  }
  EXPECT_NO_THROW(check_device_memory(estimate_memory(tiny_config(), 64, 0), Device::CUDA, "tiny"));
}

}  // namespace
}  // namespace moekit
