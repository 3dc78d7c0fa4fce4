// AdamW and gradient clipping over the parameter table; the per-tensor work is a backend op
// (adamw_step, sum_squares) of the parameter's device, so training on the GPU never copies
// weights, gradients or moments to the host.
#include "train/adamw.h"

#include <cmath>
#include <optional>

#include "core/error.h"
#include "core/profile.h"
#include "ops/ops.h"

namespace moekit {

void AdamW::step(ParamTable& params, double lr) {
  std::optional<ProfileScope> prof;
  for (const auto& p : params.all())
    if (p->grad.defined()) {
      prof.emplace(backend(p->grad.device()), "optimizer");
      break;
    }
  ++step_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(step_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, double(step_));
  for (auto& p : params.all()) {
    if (!p->trainable || !p->grad.defined()) continue;
    const Device dev = p->value.device();
    auto& mo = moments_[p->name];
    if (!mo.m.defined()) {
      mo.m = Tensor::zeros(p->value.shape(), DType::F32, dev);
      mo.v = Tensor::zeros(p->value.shape(), DType::F32, dev);
    } else if (mo.m.device() != dev) {  // loaded from a checkpoint into host memory
      mo.m = mo.m.to_device(dev);
      mo.v = mo.v.to_device(dev);
    }
    const bool decay = p->value.ndim() >= 2;
    AdamWStep s;
    s.beta1 = float(cfg_.beta1);
    s.beta2 = float(cfg_.beta2);
    s.step_size = float(lr / bc1);
    s.decay = decay ? float(lr * cfg_.weight_decay) : 0.0f;
    s.inv_bc2 = float(1.0 / bc2);
    s.eps = float(cfg_.eps);
    backend(dev).adamw_step(p->value, mo.m, mo.v, p->grad, s,
                            p->gemm_copy.defined() ? &p->gemm_copy : nullptr);
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
  for (auto& p : params.all())
    if (p->grad.defined()) sq += backend(p->grad.device()).sum_squares(p->grad);
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const float s = float(max_norm / (norm + 1e-6));
    for (auto& p : params.all())
      if (p->grad.defined()) backend(p->grad.device()).scale(p->grad, s);
  }
  return norm;
}

}  // namespace moekit
