// Multi-head Latent Attention (DeepSeek-V2 §2.1), training/prefill path:
//   q      = W_q h                       or  W_qb rmsnorm(W_qa h)       (q_lora_rank > 0)
//   [c_kv | k_rope] = W_kv_a_with_mqa h;  c_kv = rmsnorm(c_kv)   (kv_latent: what decode caches)
//   [k_nope | v] per head = W_kv_b c_kv;  RoPE on q_rope and the one shared k_rope
//   o = causal_softmax(q k^T * softmax_scale) v;  y = W_o o
#pragma once

#include <optional>

#include "model/config.h"
#include "nn/params.h"
#include "nn/rmsnorm.h"
#include "nn/rope.h"

namespace moekit {

struct MLA {
  int64_t heads = 0, q_lora_rank = 0, kv_lora_rank = 0, dn = 0, dr = 0, dv = 0;
  float softmax_scale = 1.0f;
  Param* q_proj = nullptr;    // [H*(dn+dr), hidden], when no q-LoRA
  Param* q_a_proj = nullptr;  // [q_lora_rank, hidden]
  RMSNorm q_a_layernorm;
  Param* q_b_proj = nullptr;            // [H*(dn+dr), q_lora_rank]
  Param* kv_a_proj_with_mqa = nullptr;  // [kv_lora_rank + dr, hidden]
  // The projections that read the layer input, q_proj (or q_a_proj) then kv_a_proj_with_mqa, as
  // one [rows, hidden] tensor (ParamTable::place_together): a decode step runs one GEMV for both.
  Tensor input_projections;
  RMSNorm kv_a_layernorm;
  Param* kv_b_proj = nullptr;  // [H*(dn+dv), kv_lora_rank]
  Param* o_proj = nullptr;     // [hidden, H*dv]
  // Under Bf16, whether the attention output o is stored rounded to bf16 (what o_proj's GEMMs read
  // anyway; forward's results do not change). The attention backward then takes delta =
  // rowsum(dO * O) from the rounded O, which moves the gradients by bf16 rounding. false keeps o
  // F32 (the gradients bit-identical to rounding in every GEMM: the test of the round-once
  // mechanism, tests/model/test_gpu_bf16_inputs.cpp).
  bool round_output = true;

  // x, q_a_normed and kv_latent are read by backward only as GEMM inputs: BF16 under Bf16 where
  // the layer rounds them once (nn/linear.h, gemm_input), F32 otherwise.
  struct Saved {
    // q, k, v: BF16 under Bf16 (rounded once for both attention passes), else F32. o: BF16 under
    // Bf16 with round_output (above) and more than a GEMV's few rows, else F32.
    // kv_a: F32 [c_kv | k_pe], the norm's input for its backward (mla_kv_a_split).
    Tensor x, q_a, q_a_normed, q, kv_a, kv_latent, k_rope, k, v, o, lse, positions;
    int64_t batch = 0, seq = 0;
  } saved;

  static MLA create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                    Device device);

  // x [B*S, hidden] -> y [B*S, hidden]; positions I32 [B*S]. With a residual stream r (F32
  // [B*S, hidden]): o_proj adds y into *r in its GEMM (beta 1), and *r is returned.
  Tensor forward(Backend& be, const Tensor& x, const Tensor& positions, const RopeTable& rope,
                 int64_t batch, int64_t seq, Tensor* residual = nullptr);
  // dx (= or +=) from dy; an undefined dx: no input gradient (only the weight gradients).
  void backward(Backend& be, Tensor& dx, const Tensor& dy, const RopeTable& rope, bool accumulate);
  // Whether any weight but o_proj's trains (o_proj's gradient needs no attention backward).
  bool trains_below_output() const;
  bool trains() const { return has_grad(o_proj) || trains_below_output(); }
};

}  // namespace moekit
