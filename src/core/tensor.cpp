// Tensor construction, views and dtype conversion (host side). Device copies go through the
// backend of the tensor's device (ops/ops.h) so this file knows nothing of CUDA.
#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "ops/ops.h"

namespace moekit {

Shape::Shape(std::initializer_list<int64_t> dims) {
  MOEKIT_CHECK(dims.size() <= 4, "at most 4 dims, got {}", dims.size());
  for (int64_t v : dims) d[size_t(ndim++)] = v;
}

Shape Shape::of(const int64_t* dims, int n) {
  MOEKIT_CHECK(n >= 0 && n <= 4, "at most 4 dims, got {}", n);
  Shape s;
  for (int i = 0; i < n; ++i) s.d[size_t(i)] = dims[i];
  s.ndim = n;
  return s;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= d[size_t(i)];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (d[size_t(i)] != o.d[size_t(i)]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(d[size_t(i)]);
  return s + "]";
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  MOEKIT_CHECK(shape.numel() >= 0, "negative shape {}", shape.str());
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  size_t bytes = size_t(shape.numel()) * dtype_size(dtype);
  if (device == Device::CPU) {
    // 64-byte alignment for vector loads; at least one byte so the pointer is unique.
    size_t alloc = (bytes + 63) / 64 * 64 + 64;
    void* p = std::aligned_alloc(64, alloc);
    if (!p) fail("out of host memory allocating {} bytes for a tensor {}", bytes, shape.str());
    t.storage_ = std::make_shared<Storage>(p, bytes, Device::CPU, [](void* q) { std::free(q); });
  } else {
    t.storage_ = backend(device).allocate(bytes);
  }
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  if (device == Device::CPU)
    std::memset(t.raw(), 0, t.nbytes());
  else
    backend(device).fill(t, 0.0f);
  return t;
}

Tensor Tensor::view_of(void* ptr, Shape shape, DType dtype, std::shared_ptr<void> keep_alive) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  size_t bytes = size_t(shape.numel()) * dtype_size(dtype);
  t.storage_ = std::make_shared<Storage>(
      ptr, bytes, Device::CPU, [keep = std::move(keep_alive)](void*) mutable { keep.reset(); });
  return t;
}

float* Tensor::f32() const {
  MOEKIT_CHECK(dtype_ == DType::F32, "expected F32 tensor, got {}", dtype_name(dtype_));
  return data<float>();
}

int32_t* Tensor::i32() const {
  MOEKIT_CHECK(dtype_ == DType::I32, "expected I32 tensor, got {}", dtype_name(dtype_));
  return data<int32_t>();
}

Tensor Tensor::reshape(Shape shape) const {
  MOEKIT_CHECK(shape.numel() == numel(), "reshape {} -> {}", shape_.str(), shape.str());
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::slice(int64_t begin, int64_t end) const {
  MOEKIT_CHECK(ndim() >= 1 && begin >= 0 && begin <= end && end <= dim(0), "slice [{}, {}) of {}",
               begin, end, shape_.str());
  Tensor t = *this;
  int64_t row = numel() / (dim(0) ? dim(0) : 1);
  t.offset_ += size_t(begin * row) * dtype_size(dtype_);
  t.shape_.d[0] = end - begin;
  return t;
}

Tensor Tensor::select(int64_t i) const {
  Tensor t = slice(i, i + 1);
  Shape s;
  for (int k = 1; k < ndim(); ++k) s.d[size_t(s.ndim++)] = dim(k);
  t.shape_ = s;
  return t;
}

Tensor Tensor::to_f32() const {
  MOEKIT_CHECK(device() == Device::CPU, "to_f32 needs a host tensor");
  Tensor out = empty(shape_, DType::F32);
  float* o = out.data<float>();
  int64_t n = numel();
  switch (dtype_) {
    case DType::F32:
      std::memcpy(o, raw(), nbytes());
      break;
    case DType::BF16: {
      auto* s = data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = bf16_to_f32(s[i]);
      break;
    }
    case DType::F16: {
      auto* s = data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = f16_to_f32(s[i]);
      break;
    }
    case DType::I32: {
      auto* s = data<int32_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = float(s[i]);
      break;
    }
  }
  return out;
}

Tensor Tensor::to_dtype(DType dtype) const {
  MOEKIT_CHECK(device() == Device::CPU && dtype_ == DType::F32, "to_dtype needs a host F32 tensor");
  Tensor out = empty(shape_, dtype);
  const float* s = f32();
  int64_t n = numel();
  switch (dtype) {
    case DType::F32:
      std::memcpy(out.raw(), s, nbytes());
      break;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) out.data<uint16_t>()[i] = f32_to_bf16(s[i]);
      break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) out.data<uint16_t>()[i] = f32_to_f16(s[i]);
      break;
    case DType::I32:
      for (int64_t i = 0; i < n; ++i) out.data<int32_t>()[i] = int32_t(s[i]);
      break;
  }
  return out;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to_host() const {
  return to_device(Device::CPU);
}

Tensor Tensor::to_device(Device device) const {
  if (this->device() == device) return *this;
  Tensor t = empty(shape_, dtype_, device);
  t.copy_from(*this);
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  MOEKIT_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, "copy {} {} -> {} {}",
               dtype_name(src.dtype_), src.shape_.str(), dtype_name(dtype_), shape_.str());
  if (device() == Device::CPU && src.device() == Device::CPU)
    std::memcpy(raw(), src.raw(), nbytes());
  else
    backend(device() == Device::CPU ? src.device() : device()).copy(*this, src);
}

void Tensor::fill(float value) {
  if (device() == Device::CPU) {
    MOEKIT_CHECK(dtype_ == DType::F32, "fill needs F32");
    float* p = f32();
    for (int64_t i = 0; i < numel(); ++i) p[i] = value;
  } else {
    backend(device()).fill(*this, value);
  }
}

}  // namespace moekit
