// CpuBackend: the reference implementation of the op set (ops/ops.h). Plain loops over the
// thread pool plus OpenBLAS for GEMM. Every other backend is tested against it.
// Methods are spread over files by concept: cpu_backend.cpp (memory, GEMM, elementwise, norms),
// cpu_attention.cpp (and decoding's softmax, argmax), cpu_moe.cpp (gate, dispatch/combine),
// cpu_loss.cpp, cpu_optim.cpp (AdamW, sum of squares), cpu_mla_step.cpp (the fused ops of MLA's
// decode step), cpu_sample.cpp (sampling's rule).
#pragma once

#include "ops/ops.h"

namespace moekit {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::CPU; }
  bool supports(Op op, DType dtype) const override;

  std::shared_ptr<Storage> allocate(size_t bytes) override;
  void copy(Tensor& dst, const Tensor& src) override;
  void fill(Tensor& t, float value) override;
  void memory_info(size_t& free_bytes, size_t& total_bytes) override;

  void matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha,
              float beta) override;
  void grouped_matmul(Tensor& c, const Tensor& a, std::span<const Tensor* const> b,
                      std::span<const int64_t> begin, bool trans_b, float beta) override;
  void matmul_batched(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                      float alpha, float beta, const GemmBatch& batch) override;
  void round_bf16(Tensor& out, const Tensor& x) override;
  void add(Tensor& y, const Tensor& x, float alpha) override;
  void scale(Tensor& y, float alpha) override;
  void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) override;
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override;
  void rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                       float eps) override;
  void rmsnorm_backward(Tensor& dx, Tensor* dx_bf16, Tensor* dw, const Tensor& dout,
                        const Tensor& x, const Tensor& w, const Tensor& rstd,
                        bool accumulate) override;
  void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) override;
  void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                       const Tensor& up) override;
  void swiglu_scaled_backward(Tensor& dgate, Tensor& dup, Tensor& dscale, const Tensor& dout,
                              const Tensor& gate, const Tensor& up, const Tensor& scale) override;
  void rope(Tensor& out, const Tensor& x, int64_t heads, int64_t head_stride, int64_t offset,
            int64_t rope_dim, const Tensor& cos, const Tensor& sin, const Tensor& positions,
            bool inverse) override;
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                         const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                         float scale) override;
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& out,
                          const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                          int64_t batch, int64_t seq, int64_t heads, float scale) override;
  void causal_softmax(Tensor& x, int64_t group, int64_t offset) override;
  void argmax(Tensor& idx, const Tensor& x, int64_t n) override;
  void sample(Tensor& id, const Tensor& logits, int64_t n, const SampleParams& p,
              double u01) override;
  void set_rows(Tensor& dst, const Tensor& src, const Tensor& rows) override;
  void latent_attention(Tensor& ctx, const Tensor& q_lat, const Tensor& q_rope,
                        const Tensor& kv_latent, const Tensor& k_rope, const Tensor& positions,
                        int64_t heads, float scale) override;
  void mla_cache_write(Tensor& kv_latent, Tensor& k_rope, const Tensor& kv_a, const Tensor& norm_w,
                       float eps, const Tensor& cos, const Tensor& sin,
                       const Tensor& positions) override;
  void mla_absorb_query(Tensor& q_lat, Tensor& q_rope, const Tensor& q, const Tensor& kv_b,
                        const Tensor& cos, const Tensor& sin, const Tensor& positions,
                        int64_t heads, int64_t dn, int64_t dr, int64_t dv) override;
  void mla_value_heads(Tensor& o, const Tensor& ctx, const Tensor& kv_b, int64_t heads, int64_t dn,
                       int64_t dv) override;
  void cross_entropy_forward(Tensor& losses, const Tensor& logits, const Tensor& targets) override;
  void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                              float scale) override;
  void gather_rows(Tensor& out, const Tensor& x, const Tensor& rows,
                   const Tensor* weights) override;
  void scatter_add_rows(Tensor& out, const Tensor& x, const Tensor& rows,
                        const Tensor* weights) override;
  void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t n,
                    bool accumulate) override;
  void mla_split_kv(Tensor& k, Tensor& v, const Tensor& kv_b, const Tensor& k_rope, int64_t heads,
                    int64_t dn, int64_t dr, int64_t dv) override;
  void mla_split_kv_backward(Tensor& dkv_b, Tensor& dk_rope, const Tensor& dk, const Tensor& dv,
                             int64_t heads, int64_t dn, int64_t dr, int64_t dvd) override;
  void moe_gate_forward(Tensor& topk_idx, Tensor& topk_w, Tensor& scores, const Tensor& logits,
                        const Tensor& bias, const GateParams& p) override;
  void moe_gate_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& topk_idx,
                         const Tensor& scores, const Tensor& dscores, const GateParams& p) override;
  void moe_dispatch_plan(Tensor& slot_token, Tensor& slot_pair, Tensor& slot_weight,
                         Tensor& token_slots, Tensor& expert_begin, Tensor& expert_rows,
                         const Tensor& topk_idx, const Tensor& topk_w, int64_t n_experts,
                         int64_t align) override;
  void moe_experts_small(Tensor& y, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                         std::span<const ExpertWeights> experts, bool accumulate,
                         const ExpertWeights* shared = nullptr) override;
  void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& g, const AdamWStep& s,
                  Tensor* w_bf16) override;
  double sum_squares(const Tensor& x) override;
};

}  // namespace moekit
