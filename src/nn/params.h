// ParamTable: every parameter of a model as one table of named tensors (checkpoint names).
// Gradients and optimizer state are laid out from this table, so "which tensors train" is data:
// a frozen parameter has no gradient tensor, and every backward skips its weight-gradient GEMM.
// Buffers (e.g. the MoE balance bias) live here too, never trainable, so checkpoints carry them.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"

namespace moekit {

struct Param {
  std::string name;  // checkpoint name, e.g. model.layers.3.mlp.experts.17.up_proj.weight
  Shape shape;       // value's shape; also set in a layout-only table, where value is undefined
  Tensor value;      // fp32 on the model's device
  Tensor grad;       // defined only while trainable (same shape as value)
  bool trainable = true;
  bool buffer = false;  // not a parameter: no gradient ever (balance bias)
};

class ParamTable {
 public:
  // `allocate` false gives a layout-only table: names, shapes and buffer flags, no memory (for
  // writers that stream a checkpoint tensor by tensor, model/init.h).
  explicit ParamTable(bool allocate = true) : allocate_(allocate) {}
  Param* add(const std::string& name, Shape shape, Device device, bool buffer = false);
  Param* find(const std::string& name) const;
  Param& at(const std::string& name) const;  // Error naming the tensor if absent
  const std::vector<std::unique_ptr<Param>>& all() const { return params_; }

  // Marks which parameters train (buffers never do); frees gradients of frozen ones.
  void set_trainable(const std::function<bool(const Param&)>& pred);
  // Allocates (zeroed) gradients for trainable parameters that have none.
  void allocate_grads();
  void zero_grads();

  int64_t numel() const;            // all parameters (not buffers)
  int64_t trainable_numel() const;  // parameters with gradients
  size_t grad_bytes() const;

 private:
  bool allocate_ = true;
  std::vector<std::unique_ptr<Param>> params_;
  std::unordered_map<std::string, Param*> index_;
};

}  // namespace moekit
