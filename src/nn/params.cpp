// ParamTable bookkeeping.
#include "nn/params.h"

#include "core/error.h"
#include "ops/ops.h"

namespace moekit {

Param* ParamTable::add(const std::string& name, Shape shape, Device device, bool buffer) {
  return add_as(name, shape, device, buffer, DType::F32);
}

Param* ParamTable::add_as(const std::string& name, Shape shape, Device device, bool buffer,
                          DType dtype) {
  MOEKIT_CHECK(!index_.count(name), "parameter {} added twice", name);
  auto p = std::make_unique<Param>();
  p->name = name;
  p->shape = shape;
  if (allocate_) p->value = Tensor::zeros(shape, dtype, device);
  p->buffer = buffer;
  p->trainable = !buffer;
  Param* raw = p.get();
  index_[name] = raw;
  params_.push_back(std::move(p));
  return raw;
}

Param* ParamTable::add_matrix(const std::string& name, Shape shape, Device device, Op consumer) {
  if (allocate_ && matrix_dtype_ != DType::F32 &&
      !backend(device).supports(consumer, matrix_dtype_))
    fail("{} weights need a device with {} {} (use --device cuda)", dtype_name(matrix_dtype_),
         dtype_name(matrix_dtype_), consumer == Op::Embedding ? "embedding lookups" : "GEMMs");
  Param* p = add_as(name, shape, device, false, matrix_dtype_);
  p->matrix = true;
  return p;
}

void set_value(Param& p, const Tensor& src) {
  if (src.dtype() == p.value.dtype()) {
    p.value.copy_from(src);  // either side may be device memory
  } else {
    const Tensor f = src.to_host().to_f32();
    p.value.copy_from(p.value.dtype() == DType::F32 ? f : f.to_dtype(p.value.dtype()));
  }
  if (p.gemm_copy.defined()) backend(p.value.device()).round_bf16(p.gemm_copy, p.value);
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

Tensor ParamTable::place_together(const std::vector<Param*>& ps) {
  if (!allocate_ || ps.empty()) return Tensor();
  const Tensor& first = ps[0]->value;
  int64_t rows = 0;
  for (const Param* p : ps) {
    const Tensor& v = p->value;
    if (v.ndim() != 2 || v.dtype() != first.dtype() || v.device() != first.device() ||
        v.dim(1) != first.dim(1))
      return Tensor();
    rows += v.dim(0);
  }
  Tensor whole = Tensor::empty({rows, first.dim(1)}, first.dtype(), first.device());
  int64_t r = 0;
  for (Param* p : ps) {
    Tensor block = whole.slice(r, r + p->value.dim(0));
    backend(block.device()).copy(block, p->value);
    p->value = block;
    r += block.dim(0);
  }
  return whole;
}

bool rows_of(const Tensor& whole, const std::vector<const Param*>& ps) {
  if (!whole.defined()) return false;
  const char* at = static_cast<const char*>(whole.raw());
  for (const Param* p : ps) {
    const Tensor& v = p->value;
    if (v.dtype() != whole.dtype() || v.raw() != at) return false;
    at += v.nbytes();
  }
  return at == static_cast<const char*>(whole.raw()) + whole.nbytes();
}

void ParamTable::set_trainable(const std::function<bool(const Param&)>& pred) {
  for (auto& p : params_) {
    p->trainable = !p->buffer && pred(*p);
    if (!p->trainable) p->grad = Tensor();
    if (!p->matrix || !p->value.defined() || matrix_dtype_ == DType::F32) continue;
    const DType want = p->trainable ? DType::F32 : matrix_dtype_;
    if (p->value.dtype() == want) continue;
    Tensor converted = Tensor::empty(p->value.shape(), want, p->value.device());
    std::swap(converted, p->value);  // `converted` now holds the old values
    p->gemm_copy = Tensor();
    set_value(*p, converted);
    // A new master keeps its bf16 values as its GEMM copy (the exact rounding of the master made
    // from them); a frozen matrix, back in bf16, needs none.
    if (p->trainable && matrix_dtype_ == DType::BF16) p->gemm_copy = converted;
  }
}

void ParamTable::allocate_grads() {
  for (auto& p : params_) {
    if (!p->trainable || p->grad.defined()) continue;
    if (p->value.dtype() != DType::F32)
      fail(
          "parameter {} trains but is stored in {} (set_trainable gives trainable matrices fp32 "
          "masters)",
          p->name, dtype_name(p->value.dtype()));
    p->grad = Tensor::zeros(p->value.shape(), DType::F32, p->value.device());
  }
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

size_t ParamTable::value_bytes() const {
  size_t n = 0;
  for (auto& p : params_)
    if (p->value.defined()) n += p->value.nbytes();
  return n;
}

}  // namespace moekit
