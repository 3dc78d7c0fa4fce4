// Cached forward over new tokens, sampling and the generate loop.
#include "infer/generator.h"

#include <algorithm>

#include "core/error.h"
#include "core/profile.h"
#include "infer/mla_decode.h"
#include "nn/linear.h"

namespace moekit {

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p,
                     std::mt19937_64& rng) {
  if (p.temperature <= 0.0f) return int32_t(std::max_element(logits, logits + vocab) - logits);
  const double u01 = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  return sample_row(logits, vocab, {p.temperature, p.top_k, p.top_p}, u01);
}

Generator::Generator(DeepSeekModel& model, int64_t max_context)
    : model_(model),
      cache_(KVCache::create(model.config(), max_context, model.device())),
      rope_(RopeTable::build(model.config(), max_context, model.device())),
      step_input_(Tensor::empty({2}, DType::I32, model.device())),
      step_logits_(Tensor::empty({1, model.config().vocab_size}, DType::F32, model.device())) {}

void Generator::decode(Tensor x, const std::function<void(size_t, const Tensor&, Tensor&)>& attend,
                       Tensor& logits) {
  Backend& be = backend(model_.device());
  for (size_t l = 0; l < model_.layers().size(); ++l) {
    DecoderLayer& layer = model_.layers()[l];
    // x += attention(input_layernorm(x)), in place: x is this call's own residual stream (the
    // embedding, or the previous layer's output), which nothing else holds.
    attend(l, layer.input_layernorm.forward(be, x), x);
    // x += ffn(post_attention_layernorm(x)), also in place: the dense MLP's down projection and
    // the few-token experts (shared experts folded in) add into x, so no add kernel runs.
    const Tensor nrm = layer.post_attention_layernorm.forward(be, x);
    if (layer.mlp)
      layer.mlp->forward_add(be, nrm, x);
    else
      layer.moe->forward_add(be, nrm, x);
  }
  const ModelConfig& c = model_.config();
  RMSNorm final_norm{&model_.params().at("model.norm.weight"), float(c.rms_norm_eps), {}};
  const int64_t n = x.dim(0);
  Tensor last = final_norm.forward(be, x.slice(n - 1, n));
  linear_forward(be, logits, last, model_.params().at("lm_head.weight"));
}

Tensor Generator::feed(const std::vector<int32_t>& ids) {
  if (ids.size() != 1) return feed_batch(ids);
  Tensor out = Tensor::empty({1, model_.config().vocab_size}, DType::F32, model_.device());
  backend(model_.device()).copy(out, step(ids[0]));  // the step's tensor is reused by the next
  return out;
}

Tensor Generator::feed_batch(const std::vector<int32_t>& ids) {
  const ModelConfig& c = model_.config();
  const int64_t n = int64_t(ids.size()), start = cache_.length;
  if (n == 0) fail("generate: empty prompt");
  if (start + n > cache_.capacity)
    fail("generate: context of {} tokens exceeds the cache of {} (raise --max-context)", start + n,
         cache_.capacity);
  Backend& be = backend(model_.device());
  // Token ids and their positions in one host tensor, so a step makes one upload, not two.
  Tensor host = Tensor::empty({2 * n}, DType::I32);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[size_t(i)] < 0 || ids[size_t(i)] >= c.vocab_size)
      fail("generate: token id {} outside the vocabulary ({})", ids[size_t(i)], c.vocab_size);
    host.i32()[i] = ids[size_t(i)];
    host.i32()[n + i] = int32_t(start + i);
  }
  const Tensor both = host.to_device(model_.device());
  const Tensor tok = both.slice(0, n), pos = both.slice(n, 2 * n);
  Tensor x = Tensor::empty({n, c.hidden_size}, DType::F32, model_.device());
  be.embedding_forward(x, model_.params().at("model.embed_tokens.weight").value, tok);
  Tensor logits = Tensor::empty({1, c.vocab_size}, DType::F32, model_.device());
  decode(
      x,
      [&](size_t l, const Tensor& nx, Tensor& residual) {
        const Tensor y =
            mla_decode(be, model_.layers()[l].self_attn, nx, pos, rope_, cache_.layers[l], start);
        be.add(residual, y, 1.0f);
      },
      logits);
  cache_.length = start + n;
  return logits;
}

void Generator::step_body() {
  Backend& be = backend(model_.device());
  const Tensor tok = step_input_.slice(0, 1), pos = step_input_.slice(1, 2);
  Tensor x = Tensor::empty({1, model_.config().hidden_size}, DType::F32, model_.device());
  be.embedding_forward(x, model_.params().at("model.embed_tokens.weight").value, tok);
  decode(
      x,
      [&](size_t l, const Tensor& nx, Tensor& residual) {
        mla_decode_step(be, model_.layers()[l].self_attn, nx, pos, rope_, cache_.layers[l],
                        residual);
      },
      step_logits_);
}

const Tensor& Generator::step(int32_t id) {
  const ModelConfig& c = model_.config();
  if (cache_.length + 1 > cache_.capacity)
    fail("generate: context of {} tokens exceeds the cache of {} (raise --max-context)",
         cache_.length + 1, cache_.capacity);
  if (id < 0 || id >= c.vocab_size)
    fail("generate: token id {} outside the vocabulary ({})", id, c.vocab_size);
  Backend& be = backend(model_.device());
  // The step's only inputs that change: its token and position, read from device memory.
  Tensor host = Tensor::empty({2}, DType::I32);
  host.i32()[0] = id;
  host.i32()[1] = int32_t(cache_.length);
  be.copy(step_input_, host);
  if (!step_recorded_) {
    step_recorded_ = true;
    // Profiling waits for the device inside the step: nothing to record then. A step that cannot
    // be recorded (a layer whose experts take the host-planned path, e.g. mixed weight dtypes)
    // runs op by op: slower, same result.
    if (!profiling()) {
      try {
        step_graph_ = be.capture([this] { step_body(); });
      } catch (const Error& e) {
        step_graph_ = nullptr;
        unrecorded_reason_ = e.what();
      }
    }
  }
  if (step_graph_)
    step_graph_->replay();
  else
    step_body();
  cache_.length += 1;
  return step_logits_;
}

std::vector<int32_t> Generator::generate(const std::vector<int32_t>& prompt,
                                         const SamplingParams& p,
                                         const std::function<bool(int32_t)>& on_token) {
  std::mt19937_64 rng(p.seed);
  std::vector<int32_t> out;
  Tensor logits = feed_batch(prompt);
  for (int64_t i = 0; i < p.max_tokens; ++i) {
    const int64_t vocab =
        p.allowed_vocab > 0 ? std::min(p.allowed_vocab, logits.dim(1)) : logits.dim(1);
    // On the logits' device, greedy or sampled: read back one id, not the logits. The draw is
    // made here, one per sampled token, as sample_token makes it (same seed, same choices).
    Tensor id = Tensor::empty({1}, DType::I32, logits.device());
    if (p.temperature <= 0.0f) {
      backend(logits.device()).argmax(id, logits, vocab);
    } else {
      const double u01 = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
      backend(logits.device()).sample(id, logits, vocab, {p.temperature, p.top_k, p.top_p}, u01);
    }
    const int32_t next = id.to_host().i32()[0];
    if (std::find(p.stop_ids.begin(), p.stop_ids.end(), next) != p.stop_ids.end()) break;
    out.push_back(next);
    if (on_token && !on_token(next)) break;
    if (i + 1 == p.max_tokens || cache_.length >= cache_.capacity) break;
    logits = step(next);  // the step's own tensor: read above before the next step writes it
  }
  return out;
}

}  // namespace moekit
