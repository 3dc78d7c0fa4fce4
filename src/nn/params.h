// ParamTable: every parameter of a model as one table of named tensors (checkpoint names).
// Gradients and optimizer state are laid out from this table, so "which tensors train" is data:
// a frozen parameter has no gradient tensor, and every backward skips its weight-gradient GEMM.
// Buffers (e.g. the MoE balance bias) live here too, never trainable, so checkpoints carry them.
// Storage dtype: every value is fp32 except frozen "matrices" (the linear layers' weights, the LM
// head and the token embedding table) of a table whose matrix dtype is BF16 — a large model on one
// GPU keeps its frozen weights in bf16 with no fp32 copy, and only what trains gets an fp32 master
// (set_trainable).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "ops/ops.h"

namespace moekit {

struct Param {
  std::string name;  // checkpoint name, e.g. model.layers.3.mlp.experts.17.up_proj.weight
  Shape shape;       // value's shape; also set in a layout-only table, where value is undefined
  Tensor value;      // on the model's device: fp32, or the table's matrix dtype (frozen matrix)
  Tensor grad;       // defined only while trainable (same shape as value)
  bool trainable = true;
  bool buffer = false;  // not a parameter: no gradient ever (balance bias)
  // A GEMM weight or the embedding table (read only by matmul or the embedding lookup, which
  // accept BF16 where the backend supports it): may be stored in bf16 while frozen.
  bool matrix = false;
  // A trainable matrix of a bf16 table: its fp32 master's values rounded to bf16, which the GEMMs
  // that round their operands read instead (nn/linear.h, gemm_weight). Each of them would round
  // the master to these values itself, once per call (a trainable routed expert's weights six
  // times per step); the optimizer writes the copy in its update pass instead (Backend::
  // adamw_step's w_bf16) and set_value refreshes it, so it always equals the rounded master and
  // no result changes. Undefined otherwise.
  Tensor gemm_copy;
};

// Whether p trains now: it has a gradient to accumulate into (ParamTable::allocate_grads). Every
// backward decides from this what to compute, as autograd prunes a graph: a weight gradient only
// for a parameter that has one, an input gradient only where something below trains.
inline bool has_grad(const Param* p) {
  return p != nullptr && p->grad.defined();
}

// Whether `whole` still holds the values of `ps` as consecutive row blocks (place_together).
bool rows_of(const Tensor& whole, const std::vector<const Param*>& ps);

// Copies `src` (any float dtype, any device) into p.value, converting to the value's dtype, and
// refreshes p.gemm_copy; the shapes must agree (checked by the caller, which knows the file to
// name). The one way to overwrite a parameter that may have a GEMM copy.
void set_value(Param& p, const Tensor& src);

class ParamTable {
 public:
  // `allocate` false gives a layout-only table: names, shapes and buffer flags, no memory (for
  // writers that stream a checkpoint tensor by tensor, model/init.h).
  // `matrix_dtype` BF16 stores frozen matrices in bf16 (a device whose backend supports BF16
  // GEMMs only).
  explicit ParamTable(bool allocate = true, DType matrix_dtype = DType::F32)
      : allocate_(allocate), matrix_dtype_(matrix_dtype) {}
  Param* add(const std::string& name, Shape shape, Device device, bool buffer = false);
  // A GEMM weight, or a table read by `consumer` (Op::Embedding for the token embedding): stored
  // in the matrix dtype while frozen (all parameters start trainable, but a bf16 table starts its
  // matrices in bf16, so a large model never holds an fp32 copy of them; set_trainable gives the
  // ones that train fp32 masters, and allocate_grads refuses a trainable matrix still in bf16).
  Param* add_matrix(const std::string& name, Shape shape, Device device, Op consumer = Op::Matmul);
  DType matrix_dtype() const { return matrix_dtype_; }
  // Lays `ps` (one dtype, device and column count) out as consecutive row blocks of one tensor,
  // values kept, and returns that tensor: one GEMM over it computes all of theirs (a decode step
  // reads its input once for MLA's q and kv_a projections). Undefined, with nothing changed, in a
  // layout-only table or when the parameters differ in dtype, device or columns. A set_trainable
  // that changes one's dtype gives it its own tensor again: check with rows_of before use.
  Tensor place_together(const std::vector<Param*>& ps);
  Param* find(const std::string& name) const;
  Param& at(const std::string& name) const;  // Error naming the tensor if absent
  const std::vector<std::unique_ptr<Param>>& all() const { return params_; }

  // Marks which parameters train (buffers never do); frees gradients of frozen ones. In a bf16
  // table a trainable matrix gets an fp32 value (its master copy, from the bf16 values) and a
  // frozen one returns to bf16.
  void set_trainable(const std::function<bool(const Param&)>& pred);
  // Allocates (zeroed) gradients for trainable parameters that have none. Every trainable value
  // must be fp32 (a bf16 table's trainable matrices get their masters from set_trainable).
  void allocate_grads();
  void zero_grads();

  int64_t numel() const;            // all parameters (not buffers)
  int64_t trainable_numel() const;  // parameters with gradients
  size_t grad_bytes() const;
  size_t value_bytes() const;  // parameters and buffers as stored

 private:
  Param* add_as(const std::string& name, Shape shape, Device device, bool buffer, DType dtype);

  bool allocate_ = true;
  DType matrix_dtype_ = DType::F32;
  std::vector<std::unique_ptr<Param>> params_;
  std::unordered_map<std::string, Param*> index_;
};

}  // namespace moekit
