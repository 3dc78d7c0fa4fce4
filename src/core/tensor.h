// Tensor: the one n-d array type of moekit (up to 4 dims, row-major, contiguous).
// A tensor is a view (byte offset + shape + dtype) into shared Storage, which may be an owned
// host or device buffer or an mmap'ed checkpoint region. Compute is fp32; bf16/f16 exist so
// checkpoints can be read and written without conversion at load time.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>

#include "core/dtype.h"

namespace moekit {

enum class Device : uint8_t { CPU, CUDA };

struct Shape {
  std::array<int64_t, 4> d{};
  int ndim = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  static Shape of(const int64_t* dims, int n);

  int64_t operator[](int i) const { return d[size_t(i < 0 ? i + ndim : i)]; }
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  std::string str() const;  // "[2, 3]"
};

// A block of memory and how to release it. Device buffers come from the backend allocator.
struct Storage {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device = Device::CPU;
  std::function<void(void*)> release;

  Storage(void* p, size_t n, Device d, std::function<void(void*)> r)
      : ptr(p), bytes(n), device(d), release(std::move(r)) {}
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (release) release(ptr);
  }
};

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(Shape shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor zeros(Shape shape, DType dtype = DType::F32, Device device = Device::CPU);
  // Wraps memory owned elsewhere (an mmap); `keep_alive` holds the owner.
  static Tensor view_of(void* ptr, Shape shape, DType dtype, std::shared_ptr<void> keep_alive);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim; }
  int64_t dim(int i) const { return shape_[i]; }
  int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::CPU; }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void* raw() const { return static_cast<char*>(storage_->ptr) + offset_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(raw());
  }
  float* f32() const;  // checks dtype F32
  int32_t* i32() const;

  // Same storage, new shape with the same element count.
  Tensor reshape(Shape shape) const;
  // Rows [begin, end) along dim 0, sharing storage.
  Tensor slice(int64_t begin, int64_t end) const;
  // Element i along dim 0 with that dim dropped (an expert of a fused [E, ...] tensor).
  Tensor select(int64_t i) const;

  // New fp32 CPU tensor with the values converted (bf16/f16 -> f32); a copy even if already f32.
  Tensor to_f32() const;
  // New CPU tensor of `dtype` with the values converted from this f32 tensor.
  Tensor to_dtype(DType dtype) const;
  Tensor clone() const;
  // This tensor if it is in host memory, else a host copy (for small host-side steps).
  Tensor to_host() const;
  // A tensor on `device` with this one's values (this one if already there).
  Tensor to_device(Device device) const;
  // Copies values from `src` (same shape and dtype, any device backed by the same backend).
  void copy_from(const Tensor& src);
  void fill(float value);

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::F32;
};

}  // namespace moekit
