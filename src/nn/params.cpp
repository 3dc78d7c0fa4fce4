// ParamTable bookkeeping.
#include "nn/params.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moekit {

Param* ParamTable::add(const std::string& name, Shape shape, Device device, bool buffer) {
  MOEKIT_CHECK(!index_.count(name), "parameter {} added twice", name);
  auto p = std::make_unique<Param>();
  p->name = name;
  p->shape = shape;
  if (allocate_) p->value = Tensor::zeros(shape, DType::F32, device);
  p->buffer = buffer;
  p->trainable = !buffer;
  Param* raw = p.get();
  index_[name] = raw;
  params_.push_back(std::move(p));
  return raw;
}

Param* ParamTable::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

Param& ParamTable::at(const std::string& name) const {
  Param* p = find(name);
  if (!p) fail("no parameter named {}", name);
  return *p;
}

void ParamTable::set_trainable(const std::function<bool(const Param&)>& pred) {
  for (auto& p : params_) {
    p->trainable = !p->buffer && pred(*p);
    if (!p->trainable) p->grad = Tensor();
  }
}

void ParamTable::allocate_grads() {
  for (auto& p : params_)
    if (p->trainable && !p->grad.defined())
      p->grad = Tensor::zeros(p->value.shape(), DType::F32, p->value.device());
}

void ParamTable::zero_grads() {
  for (auto& p : params_)
    if (p->grad.defined()) backend(p->grad.device()).fill(p->grad, 0.0f);
}

int64_t ParamTable::numel() const {
  int64_t n = 0;
  for (auto& p : params_)
    if (!p->buffer) n += p->shape.numel();
  return n;
}

int64_t ParamTable::trainable_numel() const {
  int64_t n = 0;
  for (auto& p : params_)
    if (p->trainable) n += p->shape.numel();
  return n;
}

size_t ParamTable::grad_bytes() const {
  size_t n = 0;
  for (auto& p : params_)
    if (p->grad.defined()) n += p->grad.nbytes();
  return n;
}

}  // namespace moekit
