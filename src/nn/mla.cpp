// MLA forward/backward (the naive, un-absorbed form; decode's absorbed path lives in infer/).
#include "nn/mla.h"

#include "core/profile.h"
#include "nn/linear.h"

namespace moekit {

namespace {

// q (forward) or dq (backward: inverse) [T, heads * (dn + dr)] with RoPE on each head's last dr
// dims. rounded: every reader rounds it to bf16 (the bf16 attention reads q, the bf16 GEMMs of
// q's projection read dq), so where the backend can, the rotation writes a BF16 tensor in the same
// pass, holding the values those readers would round to (Backend::rope); else x is rotated in
// place and returned.
Tensor apply_rope(Backend& be, Tensor& x, bool rounded, int64_t heads, int64_t dn, int64_t dr,
                  const RopeTable& rope, const Tensor& positions, bool inverse) {
  if (rounded && be.supports(Op::Rope, DType::BF16)) {
    Tensor out = Tensor::empty(x.shape(), DType::BF16, x.device());
    be.rope(out, x, heads, dn + dr, dn, dr, rope.cos, rope.sin, positions, inverse);
    return out;
  }
  be.rope(x, x, heads, dn + dr, dn, dr, rope.cos, rope.sin, positions, inverse);
  return x;
}

}  // namespace

MLA MLA::create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                Device device) {
  MLA a;
  a.heads = c.num_attention_heads;
  a.q_lora_rank = c.q_lora_rank;
  a.kv_lora_rank = c.kv_lora_rank;
  a.dn = c.qk_nope_head_dim;
  a.dr = c.qk_rope_head_dim;
  a.dv = c.v_head_dim;
  a.softmax_scale = float(c.softmax_scale());
  const int64_t H = c.hidden_size, qdim = a.heads * (a.dn + a.dr);
  if (a.q_lora_rank > 0) {
    a.q_a_proj = params.add_matrix(prefix + ".q_a_proj.weight", {a.q_lora_rank, H}, device);
    a.q_a_layernorm.weight = params.add(prefix + ".q_a_layernorm.weight", {a.q_lora_rank}, device);
    a.q_a_layernorm.eps = float(c.rms_norm_eps);
    a.q_b_proj = params.add_matrix(prefix + ".q_b_proj.weight", {qdim, a.q_lora_rank}, device);
  } else {
    a.q_proj = params.add_matrix(prefix + ".q_proj.weight", {qdim, H}, device);
  }
  a.kv_a_proj_with_mqa =
      params.add_matrix(prefix + ".kv_a_proj_with_mqa.weight", {a.kv_lora_rank + a.dr, H}, device);
  a.kv_a_layernorm.weight = params.add(prefix + ".kv_a_layernorm.weight", {a.kv_lora_rank}, device);
  a.kv_a_layernorm.eps = float(c.rms_norm_eps);
  a.kv_b_proj = params.add_matrix(prefix + ".kv_b_proj.weight",
                                  {a.heads * (a.dn + a.dv), a.kv_lora_rank}, device);
  a.o_proj = params.add_matrix(prefix + ".o_proj.weight", {H, a.heads * a.dv}, device);
  a.input_projections =
      params.place_together({a.q_lora_rank > 0 ? a.q_a_proj : a.q_proj, a.kv_a_proj_with_mqa});
  return a;
}

Tensor MLA::forward(Backend& be, const Tensor& x, const Tensor& positions, const RopeTable& rope,
                    int64_t batch, int64_t seq, Tensor* residual) {
  const int64_t T = x.dim(0), dqk = dn + dr;
  const Device dev = x.device();
  auto empty = [&](Shape s) { return Tensor::empty(s, DType::F32, dev); };
  // The GEMM inputs x, q_a_normed and kv_latent, each read by a forward projection and by its
  // weight gradient (x by two of each), are rounded once under Bf16 (nn/linear.h) and saved
  // rounded: backward reads them only there. x may come rounded already (the input norm writes
  // bf16 where only GEMMs read it); q_a_normed and kv_latent are written so by their norms.
  saved.x = gemm_input(be, x);
  const DType norm_dtype = RMSNorm::gemm_output_dtype(be, T);
  saved.positions = positions;
  saved.batch = batch;
  saved.seq = seq;

  ProfileSteps prof(be);
  prof.next("attn.fwd.projections");
  // Under Bf16 the attention reads q, k and v rounded to bf16 in both passes: round them once
  // here (q as its GEMM or the rotation writes it, k and v as the split writes them) and save the
  // BF16 copies (half the bytes).
  const bool bf16_attention = bf16_gemm_inputs(be) && be.supports(Op::Attention, DType::BF16) &&
                              be.supports(Op::MlaSplitKv, DType::BF16);
  // Whether this forward's GEMMs write bf16 outputs: the Bf16 precision, past the GEMV path's few
  // rows (which write F32 only, nn/linear.h). q and kv_b below follow it.
  const bool bf16_outputs = be.precision() == Precision::Bf16 &&
                            be.supports(Op::Matmul, DType::BF16) && T > be.unrounded_gemv_rows();
  // Under the Bf16 precision, where the GEMM writes bf16 (not the few rows of the GEMV path), q's
  // GEMM writes it rounded and the rotation runs in place on the rope dims only, in fp32 from the
  // bf16 values (transformers' bf16 model rotates its bf16 q_proj output too). Before, the GEMM
  // wrote fp32 and the rotation wrote the whole bf16 copy: 150 MB per V2-Lite layer of 8192
  // tokens, 65 us on the H200, where the in-place pass moves 17 MB. Like kv_b's bf16 output below
  // it follows the precision, not round_gemm_inputs_once, which must not choose between the two
  // roundings (its tests compare both settings bit for bit); the attention reads a BF16 q either
  // way. Else the rotation writes the rounded copy (apply_rope), and bf16_operand rounds q only
  // where it could not.
  const bool bf16_q =
      bf16_outputs && be.supports(Op::Attention, DType::BF16) && be.supports(Op::Rope, DType::BF16);
  saved.q = Tensor::empty({T, heads * dqk}, bf16_q ? DType::BF16 : DType::F32, dev);
  if (q_lora_rank > 0) {
    saved.q_a = empty({T, q_lora_rank});
    linear_forward(be, saved.q_a, saved.x, *q_a_proj);
    saved.q_a_normed = gemm_input(be, q_a_layernorm.forward(be, saved.q_a, norm_dtype));
    linear_forward(be, saved.q, saved.q_a_normed, *q_b_proj);
  } else {
    linear_forward(be, saved.q, saved.x, *q_proj);
  }
  if (bf16_q) {
    be.rope(saved.q, saved.q, heads, dqk, dn, dr, rope.cos, rope.sin, positions, false);
  } else {
    saved.q = apply_rope(be, saved.q, bf16_attention, heads, dn, dr, rope, positions, false);
    if (bf16_attention) saved.q = bf16_operand(be, saved.q);
  }

  // kv_a = [c_kv | k_pe]: the latent's norm and the shared key's rotation in one op. kv_a stays
  // saved in place of the norm's input: backward takes c_kv from it.
  saved.kv_a = empty({T, kv_lora_rank + dr});
  linear_forward(be, saved.kv_a, saved.x, *kv_a_proj_with_mqa);
  saved.k_rope = empty({T, dr});
  Tensor kv_latent = Tensor::empty({T, kv_lora_rank}, norm_dtype, dev);
  kv_a_layernorm.saved.x = Tensor();
  kv_a_layernorm.saved.rstd = empty({T});
  be.mla_kv_a_split(kv_latent, kv_a_layernorm.saved.rstd, saved.k_rope, saved.kv_a,
                    kv_a_layernorm.weight->value, kv_a_layernorm.eps, rope.cos, rope.sin,
                    positions);
  saved.kv_latent = gemm_input(be, kv_latent);

  // Under the Bf16 precision the kv_b GEMM writes its output in bf16 (fp32 accumulation, rounded
  // to nearest even as stored, as the split or the attention would round an F32 kv_b): the GEMM
  // writes and the split reads half the bytes, and the split only copies. It follows the
  // precision, not round_gemm_inputs_once (nn/linear.h): whether cuBLAS's accumulation for a bf16
  // output is the one for an fp32 output is not promised, so the switch must not choose between
  // them (its tests compare the two settings bit for bit). Few rows stay F32: the GEMV path
  // (nn/linear.h) writes F32 only.
  const bool bf16_kv_b = bf16_outputs && be.supports(Op::MlaSplitKv, DType::BF16);
  // Where the backend writes bf16 k and v straight from the up-projection's GEMMs (mla_kv_up:
  // no kv_b tensor, no split pass), k and v are BF16 whenever kv_b would be, so that the switch
  // above still does not choose the rounding: the attention reads them as bf16 either way.
  if (bf16_kv_b && be.supports(Op::MlaKvUp, DType::BF16)) {
    saved.k = Tensor::empty({T, heads * dqk}, DType::BF16, dev);
    saved.v = Tensor::empty({T, heads * dv}, DType::BF16, dev);
    be.mla_kv_up(saved.k, saved.v, saved.kv_latent, gemm_weight(be, *kv_b_proj, T), saved.k_rope,
                 heads, dn, dr, dv);
  } else {
    const DType kv_b_dtype = bf16_kv_b ? DType::BF16 : DType::F32;
    Tensor kv_b = Tensor::empty({T, heads * (dn + dv)}, kv_b_dtype, dev);
    linear_forward(be, kv_b, saved.kv_latent, *kv_b_proj);
    const DType kv_dtype = bf16_attention ? DType::BF16 : DType::F32;
    saved.k = Tensor::empty({T, heads * dqk}, kv_dtype, dev);
    saved.v = Tensor::empty({T, heads * dv}, kv_dtype, dev);
    be.mla_split_kv(saved.k, saved.v, kv_b, saved.k_rope, heads, dn, dr, dv);
  }

  prof.next("attn.fwd.attention");
  // Under bf16 attention o feeds o_proj's GEMMs, which round it, and the attention backward, which
  // reads it only for delta = rowsum(dO * O): the attention writes it rounded at once (no
  // conversion pass, half the bytes saved), and delta comes from the rounded O (round_output).
  // Few rows stay F32: o_proj's GEMV reads them unrounded (nn/linear.h).
  const DType o_dtype = bf16_attention && round_output ? gemm_input_dtype(be, T) : DType::F32;
  saved.o = Tensor::empty({T, heads * dv}, o_dtype, dev);
  saved.lse = empty({batch, heads, seq});
  be.attention_forward(saved.o, saved.lse, saved.q, saved.k, saved.v, batch, seq, heads,
                       softmax_scale);
  prof.next("attn.fwd.projections");
  if (residual) {
    linear_forward_add(be, *residual, saved.o, *o_proj);
    return *residual;
  }
  Tensor y = empty({T, x.dim(1)});
  linear_forward(be, y, saved.o, *o_proj);
  return y;
}

bool MLA::trains_below_output() const {
  return has_grad(q_proj) || has_grad(q_a_proj) || q_a_layernorm.trains() || has_grad(q_b_proj) ||
         has_grad(kv_a_proj_with_mqa) || kv_a_layernorm.trains() || has_grad(kv_b_proj);
}

void MLA::backward(Backend& be, Tensor& dx, const Tensor& dy, const RopeTable& rope,
                   bool accumulate) {
  const int64_t T = dy.dim(0), dqk = dn + dr;
  const Device dev = dy.device();
  auto empty = [&](Shape s) { return Tensor::empty(s, DType::F32, dev); };

  ProfileSteps prof(be);
  prof.next("attn.bwd.projections");
  // The attention's own backward runs only for a gradient below o_proj: dx, or a weight there.
  const bool inner = dx.defined() || trains_below_output();
  Tensor d_o = inner ? empty({T, heads * dv}) : Tensor();
  linear_backward(be, d_o, *o_proj, dy, saved.o, false);
  if (!inner) return;
  prof.next("attn.bwd.attention");
  Tensor dq = empty({T, heads * dqk}), dk = empty({T, heads * dqk}), dvv = empty({T, heads * dv});
  be.attention_backward(dq, dk, dvv, d_o, saved.o, saved.lse, saved.q, saved.k, saved.v,
                        saved.batch, saved.seq, heads, softmax_scale);

  prof.next("attn.bwd.projections");
  // dkv_b feeds only kv_b's GEMMs: under Bf16 the split writes it rounded (what they would read).
  const bool bf16_dkv_b = bf16_gemm_inputs(be) && be.supports(Op::MlaSplitKv, DType::BF16);
  Tensor dkv_b = Tensor::empty({T, heads * (dn + dv)}, bf16_dkv_b ? DType::BF16 : DType::F32, dev);
  Tensor dk_rope = empty({T, dr});
  be.mla_split_kv_backward(dkv_b, dk_rope, dk, dvv, heads, dn, dr, dv);
  Tensor dkv_latent = empty({T, kv_lora_rank});
  linear_backward(be, dkv_latent, *kv_b_proj, dkv_b, saved.kv_latent, false);
  Tensor dkv_a = empty({T, kv_lora_rank + dr});
  Tensor dc_kv = empty({T, kv_lora_rank});
  kv_a_layernorm.saved.x = empty({T, kv_lora_rank});  // the norm's input, c_kv
  be.copy_columns(kv_a_layernorm.saved.x, 0, saved.kv_a, 0, kv_lora_rank, false);
  kv_a_layernorm.backward(be, dc_kv, dkv_latent, false);
  kv_a_layernorm.saved.x = Tensor();
  be.copy_columns(dkv_a, 0, dc_kv, 0, kv_lora_rank, false);
  // RoPE is a rotation: its backward rotates the gradient back.
  be.rope(dk_rope, dk_rope, 1, dr, 0, dr, rope.cos, rope.sin, saved.positions, true);
  be.copy_columns(dkv_a, kv_lora_rank, dk_rope, 0, dr, false);
  linear_backward(be, dx, *kv_a_proj_with_mqa, dkv_a, saved.x, accumulate);

  // dq feeds only the backward GEMMs of q's projection, which round it under Bf16 (a gradient:
  // bf16_operand's rule): the inverse rotation writes it rounded, as the split writes dkv_b.
  const Tensor dq_in =
      apply_rope(be, dq, bf16_gemm_inputs(be), heads, dn, dr, rope, saved.positions, true);
  if (q_lora_rank > 0) {
    Tensor dq_a_normed = empty({T, q_lora_rank}), dq_a = empty({T, q_lora_rank});
    linear_backward(be, dq_a_normed, *q_b_proj, dq_in, saved.q_a_normed, false);
    q_a_layernorm.backward(be, dq_a, dq_a_normed, false);
    linear_backward(be, dx, *q_a_proj, dq_a, saved.x, true);
  } else {
    linear_backward(be, dx, *q_proj, dq_in, saved.x, true);
  }
}

}  // namespace moekit
