// AdamW and gradient clipping over the parameter table (host loops; the CUDA backend brings its
// own fused update).
#include "train/adamw.h"

#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"
#include "ops/ops.h"

namespace moekit {

void AdamW::step(ParamTable& params, double lr) {
  ++step_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(step_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, double(step_));
  for (auto& p : params.all()) {
    if (!p->trainable || !p->grad.defined()) continue;
    auto& mo = moments_[p->name];
    if (!mo.m.defined()) {
      mo.m = Tensor::zeros(p->value.shape());
      mo.v = Tensor::zeros(p->value.shape());
    }
    const bool decay = p->value.ndim() >= 2;
    const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2);
    const float step_size = float(lr / bc1), wd = decay ? float(lr * cfg_.weight_decay) : 0.0f;
    const float inv_bc2 = float(1.0 / bc2), eps = float(cfg_.eps);
    float *w = p->value.f32(), *g = p->grad.f32(), *m = mo.m.f32(), *v = mo.v.f32();
    cpu_pool().parallel_for(
        p->value.numel(),
        [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            m[i] = b1 * m[i] + (1.0f - b1) * g[i];
            v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
            w[i] -= wd * w[i];  // decoupled decay
            w[i] -= step_size * m[i] / (std::sqrt(v[i] * inv_bc2) + eps);
          }
        },
        1 << 14);
  }
}

size_t AdamW::state_bytes() const {
  size_t n = 0;
  for (const auto& [name, mo] : moments_) n += mo.m.nbytes() + mo.v.nbytes();
  return n;
}

std::map<std::string, Tensor> AdamW::state() const {
  std::map<std::string, Tensor> out;
  for (const auto& [name, mo] : moments_) {
    out["m." + name] = mo.m;
    out["v." + name] = mo.v;
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, Tensor>& state, int64_t step) {
  moments_.clear();
  for (const auto& [key, t] : state) {
    if (key.size() < 3 || (key[0] != 'm' && key[0] != 'v') || key[1] != '.')
      fail("optimizer state: unexpected tensor {}", key);
    auto& mo = moments_[key.substr(2)];
    (key[0] == 'm' ? mo.m : mo.v) = t.clone();
  }
  step_ = step;
}

double clip_grad_norm(ParamTable& params, double max_norm) {
  double sq = 0.0;
  for (auto& p : params.all()) {
    if (!p->grad.defined()) continue;
    const float* g = p->grad.f32();
    for (int64_t i = 0; i < p->grad.numel(); ++i) sq += double(g[i]) * double(g[i]);
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const float s = float(max_norm / (norm + 1e-6));
    for (auto& p : params.all())
      if (p->grad.defined()) backend(p->grad.device()).scale(p->grad, s);
  }
  return norm;
}

}  // namespace moekit
