// Rounding GEMM inputs once under Precision::Bf16 (nn/linear.h): a layer rounds an activation to
// bf16 once for every GEMM that reads it and saves the bf16 copy for backward, and SwiGLU, the
// norms (outputs, and the post-attention norm's backward) and MLA's RoPE (q for the bf16 attention,
// dq for q's projection) write bf16 where only bf16 readers read their output.
// The claim is that this changes no bit: each GEMM (and the attention) multiplies exactly the
// values it used to round itself. So these tests run the same forward and backward with the
// mechanism off (round_gemm_inputs_once() = false: every GEMM rounds its own F32 operands, as
// before) and on, and compare outputs and gradients bit for bit; they also check that the
// mechanism was in effect (the saved inputs are BF16) and that few-row inputs, which the GEMV path
// reads in fp32, stay F32. The one exception is MLA's attention output stored in bf16
// (MLA::round_output): the attention backward reads it for delta = rowsum(dO * O), so the
// gradients upstream of it move by bf16 rounding; the bit-for-bit test turns it off, and a test of
// its own bounds what it changes.
// The training step's bf16 LM-head logits and dlogits (DeepSeekModel::loss_and_backward) change
// values too, but they follow the precision, not the switch: both runs of each test have them.
// Every test skips with the reason when no GPU is visible; names start with "Gpu".
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <string>

#include "esft/expert_config.h"
#include "esft/finetune.h"
#include "model/config.h"
#include "model/deepseek.h"
#include "nn/linear.h"

namespace moekit {
namespace {

const std::string kSource = MOEKIT_SOURCE_DIR;

#define SKIP_WITHOUT_GPU()              \
  if (!backend_available(Device::CUDA)) \
  GTEST_SKIP() << "CUDA backend not available (built without CUDA, or no GPU visible)"

// Sets the precision and the switch for a scope (restored on the way out, failures included).
struct Bf16Scope {
  explicit Bf16Scope(bool once) : before(round_gemm_inputs_once().load()) {
    backend(Device::CUDA).set_precision(Precision::Bf16);
    round_gemm_inputs_once() = once;
  }
  ~Bf16Scope() {
    backend(Device::CUDA).set_precision(Precision::Fp32);
    round_gemm_inputs_once() = before;
  }
  bool before;
};

// The number of bytes that differ (0: bit-identical), both tensors read back to the host.
int64_t differing_bytes(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to_host(), y = b.to_host();
  if (x.nbytes() != y.nbytes() || x.dtype() != y.dtype()) return -1;
  const auto *p = static_cast<const unsigned char*>(x.raw()),
             *q = static_cast<const unsigned char*>(y.raw());
  int64_t n = 0;
  for (size_t i = 0; i < x.nbytes(); ++i) n += p[i] != q[i];
  return n;
}

Tensor random_f32(Shape s, std::mt19937_64& rng, float std = 1.0f) {
  Tensor t = Tensor::empty(s);
  std::normal_distribution<float> n(0.0f, std);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t.to_device(Device::CUDA);
}

// One linear layer, as the brief of the mechanism states it: y = x W^T, dx = dy W, dW += dy^T x,
// first with every GEMM rounding its F32 operands (the matmuls as linear.h made them before),
// then with x rounded once by gemm_input and saved rounded, and dy rounded once for both backward
// GEMMs. 37 rows (above the GEMV path's few rows), odd sizes, a trainable fp32 weight.
TEST(GpuBf16Linear, RoundedOnceEqualsPerGemmRounding) {
  SKIP_WITHOUT_GPU();
  Backend& be = backend(Device::CUDA);
  std::mt19937_64 rng(31);
  const int64_t T = 37, K = 45, N = 29;
  const Tensor x = random_f32({T, K}, rng), dy = random_f32({T, N}, rng);
  Param w;
  w.name = "w";
  w.value = random_f32({N, K}, rng, 0.2f);
  auto zeros = [](Shape s) { return Tensor::zeros(s, DType::F32, Device::CUDA); };
  Tensor y0 = zeros({T, N}), dx0 = zeros({T, K}), g0 = zeros({N, K});
  Tensor y1 = zeros({T, N}), dx1 = zeros({T, K}), g1 = zeros({N, K});
  {
    const Bf16Scope old_way(false);
    be.matmul(y0, x, w.value, false, true, 1.0f, 0.0f);
    be.matmul(dx0, dy, w.value, false, false, 1.0f, 0.0f);
    be.matmul(g0, dy, x, true, false, 1.0f, 1.0f);
  }
  {
    const Bf16Scope once(true);
    const Tensor xin = gemm_input(be, x);
    EXPECT_EQ(xin.dtype(), DType::BF16);
    linear_forward(be, y1, xin, w);
    w.grad = g1;
    linear_backward(be, dx1, w, dy, xin, false);
  }
  EXPECT_EQ(differing_bytes(y1, y0), 0) << "y";
  EXPECT_EQ(differing_bytes(dx1, dx0), 0) << "dx";
  EXPECT_EQ(differing_bytes(g1, g0), 0) << "dW";
  // Not a no-op: the bf16 products differ from the exact fp32 ones.
  Tensor y_exact = zeros({T, N});
  be.matmul(y_exact, x, w.value, false, true, 1.0f, 0.0f);
  EXPECT_GT(differing_bytes(y_exact, y0), 0) << "bf16 had no effect";
}

struct Variant {
  const char* name;
  int64_t q_lora_rank;  // 0: q_proj; > 0: q_a_proj -> norm -> q_b_proj
  bool esft;            // bf16 table, only two routed experts train (else every parameter, fp32)
  bool checkpointing;   // backward recomputes each layer's forward
  int64_t batch, seq;   // 48 rows: the bf16 path; 3 rows: the GEMV path keeps inputs F32
};

// gtest prints a parameter by its name (the test list shows it, not the struct's bytes).
void PrintTo(const Variant& v, std::ostream* os) {
  *os << v.name;
}

struct ModelRun {
  Tensor logits;
  float loss = 0.0f;
  std::map<std::string, Tensor> grads;
};

ModelConfig variant_config(const Variant& v) {
  ModelConfig c = load_config(kSource + "/tests/fixtures/train/tiny.json");
  c.vocab_size = 300;
  c.q_lora_rank = v.q_lora_rank;
  return c;
}

std::unique_ptr<DeepSeekModel> variant_model(const Variant& v) {
  auto m = std::make_unique<DeepSeekModel>(variant_config(v), Device::CUDA, true,
                                           v.esft ? DType::BF16 : DType::F32);
  m->init_random(11, 0.2f);
  if (v.esft) {
    ExpertConfig ec;
    ec.experts[1] = {2, 5};
    apply_expert_config(*m, ec, "cfg");
  }
  m->set_activation_checkpointing(v.checkpointing);
  return m;
}

// What the mechanism saved in the last forward: BF16 GEMM inputs when on (and the rows above the
// GEMV path's), else F32; o BF16 only with round_output as well; q BF16 when on.
void expect_saved_dtypes(DeepSeekModel& m, const Variant& v, bool once, bool round_o) {
  const bool bf16 = once && v.batch * v.seq > backend(Device::CUDA).unrounded_gemv_rows();
  const DType want = bf16 ? DType::BF16 : DType::F32;
  const DecoderLayer& dense = m.layers().front();
  EXPECT_EQ(dense.self_attn.saved.x.dtype(), want) << "attention input";
  EXPECT_EQ(dense.self_attn.saved.kv_latent.dtype(), want) << "kv_latent";
  if (v.q_lora_rank > 0) {
    EXPECT_EQ(dense.self_attn.saved.q_a_normed.dtype(), want);
  }
  EXPECT_EQ(dense.self_attn.saved.o.dtype(), bf16 && round_o ? DType::BF16 : DType::F32) << "o";
  // q: rounded for the bf16 attention whatever the rows (by the rotation itself) under the
  // mechanism; past the GEMV path's rows by its GEMM either way (nn/mla.cpp: it follows the
  // precision).
  const bool many_rows = v.batch * v.seq > backend(Device::CUDA).unrounded_gemv_rows();
  EXPECT_EQ(dense.self_attn.saved.q.dtype(), once || many_rows ? DType::BF16 : DType::F32) << "q";
  ASSERT_TRUE(dense.mlp.has_value());
  EXPECT_EQ(dense.mlp->saved.x.dtype(), want) << "dense MLP input";
  // gate and up follow the Bf16 precision (nn/mlp.cpp), not the mechanism: BF16 either way
  // above the GEMV path's rows; h with them (the down GEMMs read it rounded either way).
  const bool rows_bf16 = v.batch * v.seq > backend(Device::CUDA).unrounded_gemv_rows();
  if (dense.mlp->down_proj->trainable) {
    EXPECT_EQ(dense.mlp->saved.h.dtype(), rows_bf16 ? DType::BF16 : want) << "dense MLP h";
  } else {
    EXPECT_FALSE(dense.mlp->saved.h.defined()) << "h kept for a frozen down projection";
  }
  EXPECT_EQ(dense.mlp->saved.gate.dtype(), rows_bf16 ? DType::BF16 : DType::F32);
  EXPECT_EQ(dense.mlp->saved.up.dtype(), rows_bf16 ? DType::BF16 : DType::F32);
  const DecoderLayer& moe = m.layers().back();
  ASSERT_TRUE(moe.moe.has_value());
  EXPECT_EQ(moe.moe->gate.saved.x.dtype(), want) << "router input";
  EXPECT_EQ(moe.moe->shared_experts.saved.x.dtype(), want) << "shared experts' input";
}

// Forward logits, then one chunked loss + backward (16-row chunks, as ESFT's LM head), every
// gradient read back. round_o: every layer's MLA::round_output.
ModelRun run_model(DeepSeekModel& m, const Variant& v, bool once, bool round_o) {
  const Bf16Scope scope(once);
  for (DecoderLayer& l : m.layers()) l.self_attn.round_output = round_o;
  const int64_t n = v.batch * v.seq;
  Tensor ids = Tensor::empty({n}, DType::I32);
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int32_t> u(0, int32_t(m.config().vocab_size - 1));
  for (int64_t i = 0; i < n; ++i) ids.i32()[i] = u(rng);
  const Tensor targets = shifted_targets(ids, v.batch, v.seq);
  ModelRun r;
  r.logits = m.forward(ids, v.batch, v.seq).to_host();
  if (!v.checkpointing) expect_saved_dtypes(m, v, once, round_o);
  m.params().allocate_grads();
  m.params().zero_grads();
  r.loss = m.loss_and_backward(ids, targets, v.batch, v.seq, 1.0f, 16);
  for (const auto& p : m.params().all())
    if (p->grad.defined()) r.grads[p->name] = p->grad.to_host();
  return r;
}

class GpuBf16Inputs : public ::testing::TestWithParam<Variant> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};

// The whole tiny model (MLA, a dense MLP layer, a MoE layer with router and shared expert, the
// chunked LM head and loss): logits, loss and every gradient bit-identical with the mechanism off
// and on (o kept F32: round_output off). Both runs use one model (the same weights); gradients are
// zeroed in between.
TEST_P(GpuBf16Inputs, ModelForwardLossAndGradientsAreBitIdentical) {
  const Variant& v = GetParam();
  auto m = variant_model(v);
  const ModelRun before = run_model(*m, v, false, false);
  const ModelRun after = run_model(*m, v, true, false);
  EXPECT_EQ(differing_bytes(after.logits, before.logits), 0) << "logits";
  EXPECT_EQ(std::memcmp(&after.loss, &before.loss, sizeof(float)), 0)
      << after.loss << " vs " << before.loss;
  ASSERT_EQ(after.grads.size(), before.grads.size());
  int64_t differ = 0;
  for (const auto& [name, g] : before.grads) {
    ASSERT_TRUE(after.grads.count(name)) << name;
    const int64_t d = differing_bytes(after.grads.at(name), g);
    EXPECT_EQ(d, 0) << name;
    differ += d != 0;
  }
  EXPECT_GE(before.grads.size(), v.esft ? size_t(6) : size_t(30));
  std::printf("[ gpu-bf16-inputs ] %s: loss %.7f, %zu gradients, %lld differ\n", v.name,
              double(after.loss), before.grads.size(), static_cast<long long>(differ));
}

// MLA's attention output stored in bf16 (round_output, the default): o_proj's GEMMs read the same
// values as before, so logits and loss stay bit-identical to the mechanism off, and so do the
// gradients computed before the backward reaches the last layer's attention (the LM head, the
// final norm, the last layer's FFN and post-attention norm, and its o_proj, whose weight gradient
// reads o as rounded either way). The attention backward takes delta = rowsum(dO * O) from the
// rounded O: one more bf16 rounding (relative error <= 2^-8) feeding dS, which the remaining
// backward GEMMs carry to every other gradient. The bf16 path already chains about ten such
// roundings, within ~10 * 2^-8 = 4e-2 of the fp32 result (tests/model/test_gpu_model.cpp), so one
// more stays within that of the run without it: normwise tolerance 4e-2 per gradient; a misread O
// is O(1). With few rows (the GEMV path), o stays F32 and every gradient is bit-identical.
TEST_P(GpuBf16Inputs, RoundedAttentionOutputKeepsForwardAndTracksGradients) {
  const Variant& v = GetParam();
  auto m = variant_model(v);
  const ModelRun off = run_model(*m, v, false, false);
  const ModelRun on = run_model(*m, v, true, true);
  EXPECT_EQ(differing_bytes(on.logits, off.logits), 0) << "logits";
  EXPECT_EQ(std::memcmp(&on.loss, &off.loss, sizeof(float)), 0) << on.loss << " vs " << off.loss;
  const bool rounded = v.batch * v.seq > backend(Device::CUDA).unrounded_gemv_rows();
  const std::string last = "model.layers." + std::to_string(m->layers().size() - 1) + ".";
  auto before_attention = [&](const std::string& name) {
    for (const std::string& p : {std::string("lm_head."), std::string("model.norm."), last + "mlp.",
                                 last + "post_attention_layernorm.", last + "self_attn.o_proj."})
      if (name.rfind(p, 0) == 0) return true;
    return false;
  };
  ASSERT_EQ(on.grads.size(), off.grads.size());
  int64_t identical = 0, affected = 0, moved = 0;
  double worst = 0.0;
  for (const auto& [name, g] : off.grads) {
    ASSERT_TRUE(on.grads.count(name)) << name;
    const Tensor& h = on.grads.at(name);
    const int64_t d = differing_bytes(h, g);
    if (!rounded || before_attention(name)) {
      EXPECT_EQ(d, 0) << name;
      ++identical;
      continue;
    }
    double max_ref = 0.0, max_diff = 0.0;
    for (int64_t i = 0; i < g.numel(); ++i) {
      max_ref = std::max(max_ref, double(std::abs(g.f32()[i])));
      max_diff = std::max(max_diff, double(std::abs(h.f32()[i] - g.f32()[i])));
    }
    const double rel = max_diff / std::max(max_ref, 1e-30);
    EXPECT_LE(rel, 4e-2) << name;
    worst = std::max(worst, rel);
    ++affected;
    moved += d != 0;
  }
  EXPECT_GT(identical, 0);
  if (affected > 0) {  // (ESFT here trains only the last layer's experts: none is upstream of o)
    EXPECT_GT(moved, 0) << "o was stored rounded but no gradient moved";
  }
  std::printf(
      "[ gpu-bf16-inputs ] %s, o in bf16: %lld gradients bit-identical, %lld moved, worst "
      "%.2e\n",
      v.name, static_cast<long long>(identical), static_cast<long long>(moved), worst);
}

INSTANTIATE_TEST_SUITE_P(
    GpuVariants, GpuBf16Inputs,
    ::testing::Values(Variant{"full", 0, false, false, 2, 24},
                      Variant{"full_qlora", 24, false, false, 2, 24},
                      Variant{"esft_bf16_table", 0, true, false, 2, 24},
                      Variant{"esft_qlora_checkpointing", 24, true, true, 2, 24},
                      Variant{"full_three_rows", 24, false, false, 1, 3}),
    [](const ::testing::TestParamInfo<Variant>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace moekit
