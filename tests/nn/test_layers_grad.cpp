// Every layer's backward against central finite differences (see gradcheck.h), plus a check
// that the checker rejects a deliberately broken backward.
#include <gtest/gtest.h>

#include "gradcheck.h"
#include "model/deepseek.h"
#include "nn/mla.h"
#include "nn/mlp.h"
#include "nn/moe.h"
#include "nn/rmsnorm.h"

namespace moekit {
namespace {

using test::Checked;
using test::grad_check;
using test::randn;

constexpr double kTol = 5e-3;

void randomize(ParamTable& params, std::mt19937_64& rng, float std) {
  for (auto& p : params.all()) {
    if (p->buffer) continue;
    bool norm = p->name.find("norm") != std::string::npos;
    Tensor v = randn(p->value.shape(), rng, norm ? 0.2f : std);
    if (norm)
      for (int64_t i = 0; i < v.numel(); ++i) v.f32()[i] += 1.0f;
    p->value.copy_from(v);
  }
  params.allocate_grads();
}

std::vector<Checked> checked_params(ParamTable& params) {
  std::vector<Checked> out;
  for (auto& p : params.all())
    if (p->trainable) out.push_back({p->name, p->value, p->grad});
  return out;
}

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 37;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 8;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 6;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 6;
  c.first_k_dense_replace = 1;
  return c;
}

TEST(GradCheck, RMSNorm) {
  std::mt19937_64 rng(1);
  ParamTable params;
  RMSNorm norm;
  norm.weight = params.add("w", {12}, Device::CPU);
  randomize(params, rng, 1.0f);
  Tensor x = randn({5, 12}, rng), dx = Tensor::zeros({5, 12});
  Backend& be = backend(Device::CPU);
  std::vector<Checked> checked = checked_params(params);
  checked.push_back({"x", x, dx});
  auto res = grad_check([&] { return norm.forward(be, x); },
                        [&](const Tensor& dy) {
                          params.zero_grads();
                          norm.backward(be, dx, dy, false);
                        },
                        checked);
  EXPECT_LT(res.worst_rel, kTol) << res.worst;
}

void check_mlp(bool down_trains) {
  std::mt19937_64 rng(2);
  ParamTable params;
  MLP mlp = MLP::create(params, "mlp", 10, 14, Device::CPU);
  params.set_trainable(
      [&](const Param& p) { return down_trains || p.name != "mlp.down_proj.weight"; });
  randomize(params, rng, 0.4f);
  Tensor x = randn({6, 10}, rng), dx = Tensor::zeros({6, 10});
  Backend& be = backend(Device::CPU);
  std::vector<Checked> checked = checked_params(params);
  checked.push_back({"x", x, dx});
  auto res = grad_check([&] { return mlp.forward(be, x); },
                        [&](const Tensor& dy) {
                          params.zero_grads();
                          mlp.backward(be, dx, dy, false);
                        },
                        checked);
  EXPECT_LT(res.worst_rel, kTol) << res.worst;
  // h is kept for down_proj's weight gradient only.
  EXPECT_EQ(mlp.saved.h.defined(), down_trains);
}

TEST(GradCheck, SwiGLUMLP) {
  check_mlp(true);
}

// A frozen down projection (ESFT's shared experts): h is not kept, the rest still trains.
TEST(GradCheck, SwiGLUMLPFrozenDownProjection) {
  check_mlp(false);
}

// The checker itself must fail on a wrong backward: drop up_proj's contribution to dx (a
// missing term) and, separately, flip the sign of a weight gradient.
TEST(GradCheck, RejectsBrokenBackward) {
  std::mt19937_64 rng(3);
  ParamTable params;
  MLP mlp = MLP::create(params, "mlp", 10, 14, Device::CPU);
  randomize(params, rng, 0.4f);
  Tensor x = randn({6, 10}, rng), dx = Tensor::zeros({6, 10});
  Backend& be = backend(Device::CPU);
  std::vector<Checked> checked = checked_params(params);
  checked.push_back({"x", x, dx});
  auto missing_term = grad_check([&] { return mlp.forward(be, x); },
                                 [&](const Tensor& dy) {
                                   params.zero_grads();
                                   Param* up = mlp.up_proj;
                                   Tensor keep = up->value.clone();
                                   up->value.fill(0.0f);  // dx loses the up_proj term
                                   mlp.backward(be, dx, dy, false);
                                   up->value.copy_from(keep);
                                 },
                                 checked);
  EXPECT_GT(missing_term.worst_rel, 0.1) << "a missing term passed the check";
  auto wrong_sign = grad_check([&] { return mlp.forward(be, x); },
                               [&](const Tensor& dy) {
                                 params.zero_grads();
                                 mlp.backward(be, dx, dy, false);
                                 be.scale(mlp.down_proj->grad, -1.0f);
                               },
                               checked);
  EXPECT_GT(wrong_sign.worst_rel, 0.1) << "a wrong sign passed the check";
}

void check_mla(ModelConfig c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  ParamTable params;
  MLA mla = MLA::create(params, "attn", c, Device::CPU);
  randomize(params, rng, 0.3f);
  const int64_t B = 2, S = 5, T = B * S;
  RopeTable rope = RopeTable::build(c, S, Device::CPU);
  Tensor pos = Tensor::empty({T}, DType::I32);
  for (int64_t i = 0; i < T; ++i) pos.i32()[i] = int32_t(i % S);
  Tensor x = randn({T, c.hidden_size}, rng), dx = Tensor::zeros(x.shape());
  Backend& be = backend(Device::CPU);
  std::vector<Checked> checked = checked_params(params);
  checked.push_back({"x", x, dx});
  auto res = grad_check([&] { return mla.forward(be, x, pos, rope, B, S); },
                        [&](const Tensor& dy) {
                          params.zero_grads();
                          mla.backward(be, dx, dy, rope, false);
                        },
                        checked);
  EXPECT_LT(res.worst_rel, kTol) << res.worst;
}

TEST(GradCheck, MLANoQLora) {
  check_mla(tiny_config(), 4);
}

TEST(GradCheck, MLAWithQLoraAndYarn) {
  ModelConfig c = tiny_config();
  c.q_lora_rank = 6;
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 4;
  c.rope_scaling.mscale = 1.0;
  c.rope_scaling.mscale_all_dim = 0.7;
  check_mla(c, 5);
}

// trains: which parameters train (all when empty): the layer rebuilds the inputs of the trainable
// experts' weight gradients for their slots only, so a subset checks that bookkeeping.
// recompute: the experts' gate and up projections recomputed in backward (MoE::recompute_experts).
void check_moe(ModelConfig c, uint64_t seed, float aux_alpha = 0.0f,
               const std::function<bool(const Param&)>& trains = {}, bool recompute = false) {
  std::mt19937_64 rng(seed);
  ParamTable params;
  MoE moe = MoE::create(params, "mlp", c, Device::CPU);
  moe.recompute_experts = recompute;
  if (trains) params.set_trainable(trains);
  randomize(params, rng, 0.4f);
  Tensor bias = randn({c.n_routed_experts}, rng, 0.05f);
  moe.gate.balance_bias->value.copy_from(bias);
  moe.gate.aux_alpha = aux_alpha;
  Tensor x = randn({7, c.hidden_size}, rng), dx = Tensor::zeros(x.shape());
  Backend& be = backend(Device::CPU);
  std::vector<Checked> checked = checked_params(params);
  checked.push_back({"x", x, dx});
  auto res = grad_check([&] { return moe.forward(be, x); },
                        [&](const Tensor& dy) {
                          params.zero_grads();
                          moe.backward(be, dx, dy, false);
                        },
                        checked, seed, 1e-3f, 3, 3,
                        [&] { return aux_alpha > 0 ? moe.gate.aux_loss : 0.0; });
  EXPECT_LT(res.worst_rel, kTol) << res.worst;
  (void)moe.forward(be, x);
  EXPECT_EQ(moe.saved.gate.defined(), !recompute) << "gate/up kept under recompute_experts";
  if (aux_alpha > 0) {
    EXPECT_GT(moe.gate.aux_loss, 0.0);
  }
}

TEST(GradCheck, MoESoftmaxGreedy) {
  check_moe(tiny_config(), 11);
}

// The auxiliary balance loss (large alpha so its gradient is not lost in the main term).
TEST(GradCheck, MoEAuxLoss) {
  check_moe(tiny_config(), 15, 2.0f);
}

// With sigmoid scores the aux loss uses scores normalised over experts (DeepSeek-V3).
TEST(GradCheck, MoEAuxLossSigmoidNormalised) {
  ModelConfig c = tiny_config();
  c.scoring_func = "sigmoid";
  c.topk_method = "noaux_tc";
  c.norm_topk_prob = true;
  check_moe(c, 16, 2.0f);
}

// ESFT's case: a few routed experts train (one only its down projection, one only gate and up),
// the rest of the layer is frozen; x's gradient and the trained weights' are checked.
TEST(GradCheck, MoESomeExpertsTrain) {
  check_moe(tiny_config(), 17, 0.0f, [](const Param& p) {
    const std::string& n = p.name;
    return n.find("experts.1.") != std::string::npos ||
           n.find("experts.4.down_proj") != std::string::npos ||
           (n.find("experts.6.") != std::string::npos && n.find("down_proj") == std::string::npos);
  });
}

// Recomputing the experts' gate/up in backward: forward keeps neither, backward rebuilds them.
TEST(GradCheck, MoERecomputeExperts) {
  check_moe(tiny_config(), 18, 0.0f, {}, true);
  check_moe(
      tiny_config(), 19, 0.0f,
      [](const Param& p) { return p.name.find("experts.3.") != std::string::npos; }, true);
}

TEST(GradCheck, MoESoftmaxNormTopk) {
  ModelConfig c = tiny_config();
  c.norm_topk_prob = true;
  c.num_experts_per_tok = 3;
  check_moe(c, 12);
}

TEST(GradCheck, MoEGroupLimitedGreedyScaled) {
  ModelConfig c = tiny_config();
  c.topk_method = "group_limited_greedy";
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 1.5;
  c.n_shared_experts = 2;
  check_moe(c, 13);
}

TEST(GradCheck, MoESigmoidNoauxTc) {
  ModelConfig c = tiny_config();
  c.scoring_func = "sigmoid";
  c.topk_method = "noaux_tc";
  c.n_group = 2;
  c.topk_group = 1;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  c.n_shared_experts = 0;
  check_moe(c, 14);
}

TEST(GradCheck, CrossEntropy) {
  std::mt19937_64 rng(31);
  Tensor logits = randn({6, 11}, rng, 2.0f), dlogits = Tensor::zeros({6, 11});
  Tensor targets = Tensor::empty({6}, DType::I32);
  for (int i = 0; i < 6; ++i) targets.i32()[i] = i == 2 ? -100 : (i * 5) % 11;
  Backend& be = backend(Device::CPU);
  std::vector<Checked> checked{{"logits", logits, dlogits}};
  auto res = grad_check(
      [&] {
        Tensor y = Tensor::empty({1});
        y.f32()[0] = cross_entropy(be, logits, targets);
        return y;
      },
      [&](const Tensor& dy) {
        cross_entropy(be, logits, targets, &dlogits);
        be.scale(dlogits, dy.f32()[0]);
      },
      checked, 32, 1e-2f);
  EXPECT_LT(res.worst_rel, kTol) << res.worst;
  // The ignored row (-100) gets no gradient.
  for (int v = 0; v < 11; ++v) EXPECT_EQ(dlogits.f32()[2 * 11 + v], 0.0f);
}

// Whole model: embedding, dense and MoE layers, final norm and LM head (L = sum(logits * R);
// the cross-entropy on top has its own check above).
TEST(GradCheck, WholeModel) {
  ModelConfig c = tiny_config();
  DeepSeekModel model(c);
  std::mt19937_64 rng(21);
  randomize(model.params(), rng, 0.3f);
  const int64_t B = 2, S = 4;
  Tensor ids = Tensor::empty({B * S}, DType::I32);
  for (int64_t i = 0; i < B * S; ++i) ids.i32()[i] = int32_t((i * 7 + 3) % c.vocab_size);
  std::vector<Checked> checked = checked_params(model.params());
  auto res = grad_check([&] { return model.forward(ids, B, S); },
                        [&](const Tensor& dy) {
                          model.params().zero_grads();
                          model.forward(ids, B, S);
                          model.backward(dy);
                        },
                        checked, 22, 1e-3f, 2, 1);
  EXPECT_LT(res.worst_rel, kTol) << res.worst;
}

}  // namespace
}  // namespace moekit
