// DeepSeekModel assembly, forward/backward, loss and random initialisation.
#include "model/deepseek.h"

#include <fmt/format.h>

#include <algorithm>
#include <random>

#include "core/error.h"
#include "core/profile.h"
#include "nn/linear.h"

namespace moekit {

Tensor DecoderLayer::forward(Backend& be, const Tensor& x, const Tensor& positions,
                             const RopeTable& rope, int64_t batch, int64_t seq,
                             bool backward_follows) {
  ProfileSteps prof(be);
  prof.next("norms+residuals");
  // Both norms' outputs are read only by GEMMs (MLA's input projections; the FFN's router, shared
  // and routed experts or dense MLP): under Bf16 they are written rounded, as those GEMMs would
  // read them (nn/linear.h), with no conversion pass after.
  const DType n_dtype = RMSNorm::gemm_output_dtype(be, x.dim(0));
  // The residual stream: each half adds its output to it in its own last GEMM (beta 1; the MoE's
  // combine after it), not in an add pass. Where a backward follows, each norm's input stays as
  // it was (its backward reads it): the stream continues in a copy. Else the input is dead once
  // its norm has read it, and the stream is written over it (x is consumed).
  auto stream = [&](const Tensor& t) { return backward_follows ? t.clone() : t; };
  Tensor n0 = input_layernorm.forward(be, x, n_dtype);
  prof.next("attn.fwd");
  Tensor h = stream(x);
  self_attn.forward(be, n0, positions, rope, batch, seq, &h);
  prof.next("norms+residuals");
  Tensor n = post_attention_layernorm.forward(be, h, n_dtype);
  prof.next(mlp ? "mlp.fwd" : "moe.fwd");
  Tensor y = stream(h);
  if (mlp)
    mlp->forward(be, n, &y);
  else
    moe->forward(be, n, backward_follows, &y);
  return y;
}

Tensor DecoderLayer::backward(Backend& be, const Tensor& dy, const RopeTable& rope, bool need_dx) {
  const Device dev = dy.device();
  ProfileSteps prof(be);
  // Each half runs its input gradient only for a gradient below it, as autograd prunes a graph
  // (the lowest layer that trains in ESFT runs its trainable experts' backward and nothing else).
  const bool attn_dx = need_dx || input_layernorm.trains();
  const bool attn_half = attn_dx || self_attn.trains();
  const bool ffn_dx = attn_half || post_attention_layernorm.trains();
  prof.next(mlp ? "mlp.bwd" : "moe.bwd");
  Tensor dn = ffn_dx ? Tensor::empty(dy.shape(), DType::F32, dev) : Tensor();
  if (mlp)
    mlp->backward(be, dn, dy, false);
  else
    moe->backward(be, dn, dy, false);
  if (!ffn_dx) return {};
  prof.next("norms+residuals");
  Tensor dh = dy.clone();  // residual path
  // dh feeds the attention backward, which reads it only through o_proj's GEMMs, and the input
  // norm's accumulation below, which needs it in fp32: under Bf16 the norm's backward also writes
  // the bf16 copy those GEMMs would round it to (no conversion pass inside o_proj's backward).
  const bool bf16_dh = bf16_gemm_inputs(be) && be.supports(Op::RmsNorm, DType::BF16);
  Tensor dh16 = bf16_dh ? Tensor::empty(dy.shape(), DType::BF16, dev) : Tensor();
  post_attention_layernorm.backward(be, dh, dn, true, bf16_dh ? &dh16 : nullptr);
  if (!attn_half) return {};
  prof.next("attn.bwd");
  Tensor da = attn_dx ? Tensor::empty(dy.shape(), DType::F32, dev) : Tensor();
  self_attn.backward(be, da, bf16_dh ? dh16 : dh, rope, false);
  if (!attn_dx) return {};
  prof.next("norms+residuals");
  input_layernorm.backward(be, dh, da, true);  // dx = dh + norm'(da)
  return dh;
}

bool DecoderLayer::trains() const {
  return input_layernorm.trains() || self_attn.trains() || post_attention_layernorm.trains() ||
         (mlp && mlp->trains()) || (moe && moe->trains());
}

void DecoderLayer::release_saved() {
  input_layernorm.saved = {};
  self_attn.saved = {};
  self_attn.q_a_layernorm.saved = {};
  self_attn.kv_a_layernorm.saved = {};
  post_attention_layernorm.saved = {};
  if (mlp) mlp->saved = {};
  if (moe) {
    moe->saved = {};
    moe->gate.saved = {};
    moe->shared_experts.saved = {};
  }
}

DeepSeekModel::DeepSeekModel(const ModelConfig& config, Device device, bool allocate,
                             DType matrix_dtype)
    : config_(config), device_(device), params_(allocate, matrix_dtype) {
  validate(config_, "model config");
  const auto& c = config_;
  // The embedding and the LM head are matrices too: bf16 while frozen in a bf16 table (the
  // lookup widens the bf16 rows; the LM head is a GEMM), fp32 masters while they train.
  embed_tokens = params_.add_matrix("model.embed_tokens.weight", {c.vocab_size, c.hidden_size},
                                    device, Op::Embedding);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}", l);
    DecoderLayer layer;
    layer.input_layernorm.weight =
        params_.add(p + ".input_layernorm.weight", {c.hidden_size}, device);
    layer.input_layernorm.eps = float(c.rms_norm_eps);
    layer.self_attn = MLA::create(params_, p + ".self_attn", c, device);
    layer.post_attention_layernorm.weight =
        params_.add(p + ".post_attention_layernorm.weight", {c.hidden_size}, device);
    layer.post_attention_layernorm.eps = float(c.rms_norm_eps);
    if (c.is_moe_layer(l))
      layer.moe = MoE::create(params_, p + ".mlp", c, device);
    else
      layer.mlp = MLP::create(params_, p + ".mlp", c.hidden_size, c.intermediate_size, device);
    layers_.push_back(std::move(layer));
  }
  norm_.weight = params_.add("model.norm.weight", {c.hidden_size}, device);
  norm_.eps = float(c.rms_norm_eps);
  lm_head = params_.add_matrix("lm_head.weight", {c.vocab_size, c.hidden_size}, device);
}

Tensor DeepSeekModel::forward(const Tensor& ids, int64_t batch, int64_t seq, bool backward_follows,
                              DType logits_dtype) {
  Backend& be = backend(device_);
  MOEKIT_CHECK(logits_dtype == DType::F32 ||
                   (logits_dtype == DType::BF16 && be.supports(Op::Matmul, DType::BF16)),
               "model forward: logits in {} (this backend writes F32{})", dtype_name(logits_dtype),
               be.supports(Op::Matmul, DType::BF16) ? " or BF16" : "");
  // The LM head's GEMM reads all rows at once: the final norm writes them as it would read them.
  const Tensor h =
      hidden(ids, batch, seq, RMSNorm::gemm_output_dtype(be, batch * seq), backward_follows);
  ProfileScope prof(be, "lm_head.fwd");
  Tensor logits = Tensor::empty({h.dim(0), config_.vocab_size}, logits_dtype, device_);
  linear_forward(be, logits, h, *lm_head);
  return logits;
}

Tensor DeepSeekModel::hidden(const Tensor& ids, int64_t batch, int64_t seq, DType out_dtype,
                             bool backward_follows) {
  Backend& be = backend(device_);
  MOEKIT_CHECK(ids.numel() == batch * seq, "ids {} vs batch {} x seq {}", ids.numel(), batch, seq);
  if (!rope_.cos.defined() || rope_.cos.dim(0) < seq)
    rope_ = RopeTable::build(config_, seq, device_);
  Tensor positions = Tensor::empty({batch * seq}, DType::I32);
  for (int64_t i = 0; i < batch * seq; ++i) positions.i32()[i] = int32_t(i % seq);
  positions = positions.to_device(device_);
  const int64_t T = batch * seq;
  Tensor x = Tensor::empty({T, config_.hidden_size}, DType::F32, device_);
  saved_.ids = ids.to_device(device_);  // host ids are copied once; backward needs them too
  be.embedding_forward(x, embed_tokens->value, saved_.ids);
  saved_.positions = positions;
  saved_.batch = batch;
  saved_.seq = seq;
  saved_.layer_inputs.clear();
  saved_.backward_ok = backward_follows;
  for (size_t l = 0; l < layers_.size(); ++l) {
    // The last layer backs up at once; an inference forward keeps nothing.
    const bool drop = backward_follows && checkpointing_ && l + 1 < layers_.size();
    if (drop) saved_.layer_inputs.push_back(x);
    x = layers_[l].forward(be, x, positions, rope_, batch, seq, backward_follows);
    if (drop) layers_[l].release_saved();
  }
  saved_.final_hidden = norm_.forward(be, x, out_dtype);
  return saved_.final_hidden;
}

void DeepSeekModel::backward(const Tensor& dlogits) {
  Backend& be = backend(device_);
  Tensor dh = Tensor::empty({dlogits.dim(0), config_.hidden_size}, DType::F32, device_);
  {
    ProfileScope prof(be, "lm_head.bwd");
    linear_backward(be, dh, *lm_head, dlogits, saved_.final_hidden, false);
  }
  backward_from_hidden(dh);
}

float DeepSeekModel::loss_and_backward(const Tensor& ids, const Tensor& targets, int64_t batch,
                                       int64_t seq, float grad_scale, int64_t chunk_rows) {
  Backend& be = backend(device_);
  // The LM head reads the final hidden rows chunk by chunk, each chunk as gemm_input gives it: the
  // final norm writes bf16 only when every chunk would be rounded (the smallest, the last, has
  // more rows than the GEMV path's few); else F32, and the chunks are rounded one by one.
  const int64_t step = std::max<int64_t>(1, chunk_rows), n = batch * seq;
  const int64_t smallest_chunk = n % step != 0 ? n % step : step;
  const Tensor h = hidden(ids, batch, seq, RMSNorm::gemm_output_dtype(be, smallest_chunk));
  const int64_t T = h.dim(0), V = config_.vocab_size;
  MOEKIT_CHECK(targets.numel() == T, "targets {} vs {} tokens", targets.numel(), T);
  const Tensor th = targets.to_host(), td = targets.to_device(device_);
  int64_t valid = 0;
  for (int64_t t = 0; t < T; ++t) valid += th.i32()[t] >= 0;
  if (valid == 0) return 0.0f;
  const bool decoder = decoder_trains();  // else the LM head's input gradient is not needed
  Tensor dh = decoder ? Tensor::empty({T, config_.hidden_size}, DType::F32, device_) : Tensor();
  // Under Bf16 (where the backend's loss takes BF16 logits) the LM head writes the chunk's logits
  // in bf16, as a bf16 model's training computes them (transformers: bf16 logits, upcast in the
  // loss); the loss reads each row once and writes the bf16 dlogits, which only the LM head's bf16
  // GEMMs read, over it. Half the bytes of fp32 logits, moved once, and one bf16 [rows, vocab]
  // tensor per chunk instead of an fp32 and a bf16 one. Unlike rounding GEMM inputs once, this
  // changes values (the loss sees rounded logits), so it follows the precision, not
  // round_gemm_inputs_once(). Else (the CPU, Fp32, Tf32): fp32 logits, the gradient in place.
  const bool bf16_logits = be.precision() == Precision::Bf16 &&
                           be.supports(Op::Matmul, DType::BF16) &&
                           be.supports(Op::CrossEntropy, DType::BF16);
  // The per-token losses stay on the device until the backward is queued: one copy (one wait
  // for the GPU) per step instead of one per chunk, each of which drained the queue and left the
  // GPU idle while the next chunk's launches caught up.
  Tensor losses = Tensor::empty({T}, DType::F32, device_);
  for (int64_t r0 = 0; r0 < T; r0 += step) {
    ProfileScope prof(be, "lm_head+loss (chunked)");
    const int64_t r1 = std::min(T, r0 + step);
    // The chunk's hidden rows feed the LM head GEMM and its weight gradient: rounded once under
    // Bf16 (nn/linear.h), by the final norm or here.
    const Tensor hc = gemm_input(be, h.slice(r0, r1)), tc = td.slice(r0, r1);
    Tensor logits = Tensor::empty({r1 - r0, V}, bf16_logits ? DType::BF16 : DType::F32, device_);
    linear_forward(be, logits, hc, *lm_head);
    Tensor lc = losses.slice(r0, r1);
    // Losses and dlogits in one op, the gradient in place: a backend may read each row once.
    Tensor& dlogits = logits;
    be.cross_entropy_fused(lc, dlogits, logits, tc, grad_scale / float(valid));
    Tensor dhc = decoder ? dh.slice(r0, r1) : Tensor();
    linear_backward(be, dhc, *lm_head, dlogits, hc, false);
  }
  backward_from_hidden(dh);
  const Tensor lh = losses.to_host();  // ignored targets have loss 0
  double sum = 0.0;
  for (int64_t i = 0; i < T; ++i) sum += lh.f32()[i];
  return float(sum / double(valid));
}

size_t DeepSeekModel::lowest_trained_layer() const {
  size_t l = 0;
  while (l < layers_.size() && !layers_[l].trains()) ++l;
  return l;
}

bool DeepSeekModel::decoder_trains() const {
  return norm_.trains() || has_grad(embed_tokens) || lowest_trained_layer() < layers_.size();
}

void DeepSeekModel::backward_from_hidden(const Tensor& dh) {
  Backend& be = backend(device_);
  // An inference forward wrote each layer's output over its input, which the norms' backward reads.
  MOEKIT_CHECK(saved_.backward_ok,
               "model backward: the forward before it was told no backward follows (it kept "
               "nothing for one)");
  // The backward stops at the lowest layer that trains, which computes no input gradient, unless
  // the embedding trains: the layers below it would change no gradient (autograd's pruning; for
  // ESFT, where the layers' first trainable expert sits in layer 1 or higher, the whole dense
  // layer and the attention half below it).
  const bool embed = has_grad(embed_tokens);
  const size_t lowest = lowest_trained_layer();
  const size_t stop = embed ? 0 : lowest;  // layers [stop, size) run their backward
  for (size_t l = 0; l < stop; ++l) {      // what they saved for it goes now
    layers_[l].release_saved();
    if (l < saved_.layer_inputs.size()) saved_.layer_inputs[l] = Tensor();
  }
  if (stop == layers_.size() && !norm_.trains()) return;
  Tensor dx = Tensor::empty(dh.shape(), DType::F32, device_);
  norm_.backward(be, dx, dh, false);
  for (size_t l = layers_.size(); l-- > stop;) {
    DecoderLayer& layer = layers_[l];
    if (l < saved_.layer_inputs.size()) {  // checkpointed: recompute what forward dropped
      ProfileScope prof(be, "recompute (checkpointing)");
      (void)layer.forward(be, saved_.layer_inputs[l], saved_.positions, rope_, saved_.batch,
                          saved_.seq);
    }
    dx = layer.backward(be, dx, rope_, /*need_dx=*/embed || l > lowest);
    if (l < saved_.layer_inputs.size()) {
      layer.release_saved();
      saved_.layer_inputs[l] = Tensor();
    }
  }
  if (embed) be.embedding_backward(embed_tokens->grad, dx, saved_.ids);
}

void DeepSeekModel::init_random(uint64_t seed, float std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, std);
  for (auto& p : params_.all()) {
    Tensor host = Tensor::empty(p->value.shape());
    bool is_norm = p->name.find("norm") != std::string::npos;
    for (int64_t i = 0; i < host.numel(); ++i)
      host.f32()[i] = p->buffer ? 0.0f : is_norm ? 1.0f : normal(rng);
    set_value(*p, host);
  }
}

Tensor shifted_targets(const Tensor& ids, int64_t batch, int64_t seq) {
  Tensor t = Tensor::empty({batch * seq}, DType::I32);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s)
      t.i32()[b * seq + s] = s + 1 < seq ? ids.i32()[b * seq + s + 1] : -100;
  return t;
}

float cross_entropy(Backend& be, const Tensor& logits, const Tensor& targets, Tensor* dlogits) {
  ProfileScope prof(be, "loss");
  const int64_t T = logits.dim(0);
  Tensor losses = Tensor::empty({T}, DType::F32, logits.device());
  const Tensor td = targets.to_device(logits.device());
  be.cross_entropy_forward(losses, logits, td);
  const Tensor lh = losses.to_host(), th = targets.to_host();
  double sum = 0.0;
  int64_t valid = 0;
  for (int64_t t = 0; t < T; ++t)
    if (th.i32()[t] >= 0) {
      sum += lh.f32()[t];
      ++valid;
    }
  if (valid == 0) return 0.0f;
  if (dlogits) be.cross_entropy_backward(*dlogits, logits, td, 1.0f / float(valid));
  return float(sum / double(valid));
}

}  // namespace moekit
