// SwiGLU MLP: y = down(silu(gate(x)) * up(x)). Serves as the dense FFN and the (fused) shared
// experts; each routed expert is an MLP too, for its three named parameters, but MoE runs the
// routed experts together (grouped GEMMs), not through MLP::forward.
#pragma once

#include "nn/params.h"
#include "ops/ops.h"

namespace moekit {

struct MLP {
  Param* gate_proj = nullptr;  // [I, H]
  Param* up_proj = nullptr;    // [I, H]
  Param* down_proj = nullptr;  // [H, I]
  // x and h are read by backward only as GEMM inputs: BF16 under Bf16 (nn/linear.h), else F32;
  // h only when down_proj trains (its weight gradient is h's one reader). gate and up: BF16 under
  // the Bf16 precision (the GEMMs' rounded products), else F32.
  struct Saved {
    Tensor x, gate, up, h;
  } saved;

  static MLP create(ParamTable& params, const std::string& prefix, int64_t hidden,
                    int64_t intermediate, Device device);
  int64_t intermediate() const { return gate_proj->value.dim(0); }

  // y [T,H] from x [T,H]. With a residual stream r (F32 [T,H]): the down projection adds y into
  // *r in its GEMM (beta 1), and *r is returned.
  Tensor forward(Backend& be, const Tensor& x, Tensor* residual = nullptr);
  // Inference only: y [T,H] += down(silu(gate x) * up x), the down projection accumulating into y
  // itself (beta = 1: no output tensor, no add kernel). Saves nothing for backward.
  void forward_add(Backend& be, const Tensor& x, Tensor& y);
  // dx (= or +=) from dy; parameter grads accumulate for the ones that train. An undefined dx:
  // the caller needs no input gradient (only the weight gradients run).
  void backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate);
  bool trains() const { return has_grad(gate_proj) || has_grad(up_proj) || has_grad(down_proj); }
};

}  // namespace moekit
