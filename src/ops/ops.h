// The op set: every numeric kernel moekit's layers use, declared once.
// Each backend (ops/cpu, ops/cuda) implements `Backend`; layer code calls the free functions in
// namespace ops, which dispatch on the device of the first output tensor (one dispatch point).
// Conventions (llm.c): outputs first, then inputs, then dims; activations are row-major
// [tokens, features]; parameter gradients accumulate (+=), activation gradients assign (=)
// unless an argument says otherwise.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "core/tensor.h"

namespace moekit {

enum class Op : uint8_t {
  Matmul,
  GroupedMatmul,
  MatmulBatched,
  RoundBf16,
  Add,
  Scale,
  Embedding,
  RmsNorm,
  SwiGLU,
  Rope,
  Attention,
  CausalSoftmax,
  Argmax,
  Sample,
  SetRows,
  LatentAttention,
  MlaCacheWrite,
  MlaAbsorbQuery,
  MlaValueHeads,
  CrossEntropy,
  GatherRows,
  ScatterAddRows,
  CopyColumns,
  MlaSplitKv,
  MlaKvUp,
  MoeGate,
  MoeDispatchPlan,
  MoeExpertsSmall,
  AdamW,
  SumSquares,
  Count
};

// How the MoE gate turns logits into (expert, weight) pairs (architecture.md, "Gate").
enum class ScoringFunc : uint8_t { Softmax, Sigmoid };
enum class TopkMethod : uint8_t { Greedy, GroupLimitedGreedy, NoauxTc };
struct GateParams {
  ScoringFunc scoring = ScoringFunc::Softmax;
  TopkMethod method = TopkMethod::Greedy;
  int64_t n_experts = 0;
  int64_t top_k = 1;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
};

// The scalars of one AdamW update (train/adamw.cpp derives them from the step count and the LR):
//   m = beta1 m + (1-beta1) g;  v = beta2 v + (1-beta2) g^2;  w -= decay w;
//   w -= step_size m / (sqrt(v * inv_bc2) + eps)
struct AdamWStep {
  float beta1 = 0.9f, beta2 = 0.95f;
  float step_size = 0.0f;  // lr / (1 - beta1^t)
  float decay = 0.0f;      // lr * weight_decay; 0 for tensors without decay
  float inv_bc2 = 1.0f;    // 1 / (1 - beta2^t)
  float eps = 1e-8f;
};

// Sampling's knobs (Backend::sample; infer/generator.h fills them from the user's options):
// logits are divided by the temperature (> 0) before the softmax; top_k > 0 keeps the k most likely
// tokens (0, or k >= n: all); top_p < 1 keeps the shortest most-likely-first prefix of those whose
// probability mass reaches top_p.
struct SampleParams {
  float temperature = 1.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
};

// How a backend runs F32 GEMMs and attention. Fp32: exact (the CPU always is; the default, which
// the parity tests rely on). Tf32: tensor cores with 10-bit-mantissa inputs. Bf16: F32 operands are
// rounded to bf16 and run on bf16 tensor cores with fp32 accumulation (a bf16 model's precision).
// Whatever the mode, a GEMM with a BF16 operand (bf16 weights or activations) runs in bf16.
// moe_experts_small ignores the mode (weights as stored, fp32 activations). Under Bf16, a backend
// that supports the BF16 variants of gather_rows, grouped_matmul, swiglu_* and scatter_add_rows
// lets the MoE layer keep its routed experts' activations in bf16 (nn/moe.cpp).
enum class Precision : uint8_t { Fp32, Tf32, Bf16 };

// The layout of a strided batch of row-major GEMMs (per-head products of MLA's absorbed decode):
// problem g multiplies the [rows, cols] blocks of each operand that start at element g * stride of
// its tensor, rows ld elements apart. m, n, k as in Backend::matmul.
struct GemmBatch {
  int64_t count = 1, m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;
};

// One expert's SwiGLU weights for Backend::moe_experts_small (a routed expert, or the fused shared
// experts): gate_proj and up_proj [I, H], down_proj [H, I] (the checkpoint's nn.Linear layout,
// out x in).
struct ExpertWeights {
  const Tensor* gate_proj = nullptr;
  const Tensor* up_proj = nullptr;
  const Tensor* down_proj = nullptr;
};

// One term of Backend::grouped_matmul_sum: the rows a [R,K] and one weight per group, as in
// Backend::grouped_matmul.
struct GroupedTerm {
  const Tensor* a = nullptr;
  std::span<const Tensor* const> b;
};

// A backend's record of a sequence of ops that can be run again as a whole (a CUDA graph):
// one launch instead of one per op. Replays read and write the same memory as the recorded ops.
class CapturedWork {
 public:
  virtual ~CapturedWork() = default;
  virtual void replay() = 0;
};

// A copy to host memory under way (Backend::copy_to_host_async).
class PendingHostCopy {
 public:
  virtual ~PendingHostCopy() = default;
  // Waits for the copy (and only for the work queued before it) and returns the host tensor.
  virtual Tensor wait() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual bool supports(Op op, DType dtype) const = 0;

  // Memory.
  virtual std::shared_ptr<Storage> allocate(size_t bytes) = 0;
  virtual void copy(Tensor& dst, const Tensor& src) = 0;  // either side may be host memory
  // Starts copying src to a new host tensor and returns at once: work queued before wait() runs
  // on the device while the host waits only for what was queued before this call (an MoE layer
  // queues its shared experts between its plan's copy and the wait, so the device does not idle
  // while the host reads the plan). wait() reports deferred errors as a synchronous copy does.
  // One copy in flight at a time per backend. The default copies at once.
  virtual std::unique_ptr<PendingHostCopy> copy_to_host_async(const Tensor& src);
  virtual void fill(Tensor& t, float value) = 0;
  // Free and total bytes of the device's memory (the host: available and physical memory).
  virtual void memory_info(size_t& free_bytes, size_t& total_bytes) = 0;
  // Waits until the device has finished the queued work (and reports any deferred error).
  virtual void synchronize() {}
  // Most bytes held by live tensors of this backend since start (0 where not tracked: the host).
  virtual size_t peak_bytes() { return 0; }
  // Memory windows (the profile's peak per step): open one, and close it to get the most bytes
  // held at once while it was open. Windows nest (closed in reverse order of opening); 0 where
  // not tracked.
  virtual void open_memory_window() {}
  virtual size_t close_memory_window() { return 0; }

  // Records the ops that `work` queues without running them, for replay() (CUDA graphs: a decode
  // step is dozens of small kernels whose launches cost more than their work). Tensors allocated
  // inside `work` keep their memory for the life of the returned object (so every replay writes
  // where the record did); `work` may read only tensors that outlive it, must not wait for the
  // device, and must not depend on host values that change between replays. Null where the
  // backend cannot record (the CPU, or recording disabled): the caller then runs `work` itself.
  virtual std::unique_ptr<CapturedWork> capture(const std::function<void()>& work) {
    (void)work;
    return nullptr;
  }

  // The compute precision of F32 GEMMs and attention (see Precision); a backend without tensor
  // cores keeps Fp32 and ignores the request.
  virtual void set_precision(Precision) {}
  virtual Precision precision() const { return Precision::Fp32; }
  // SwiGLU's two projections of one input: y0 = x @ w0^T and y1 = x @ w1^T, each as
  // matmul(y, x, w, false, true, 1, 0) (the default: two matmuls). y0 and y1 of one shape and
  // dtype, w0 and w1 too; a backend may run both products in one call (the CUDA backend on its
  // bf16 tensor cores, where matmul would run cuBLAS: half the launches, and twice the tiles per
  // launch fill the last wave better).
  virtual void matmul_pair(Tensor& y0, Tensor& y1, const Tensor& x, const Tensor& w0,
                           const Tensor& w1);

  // c[M,N] = alpha * op(a) @ op(b) + beta * c, op(a) [M,K], op(b) [K,N]; 2-D views.
  // Dtypes: F32 on every backend. Where the backend supports(Matmul, BF16), a and b may each be
  // F32 or BF16 (F32 activations x BF16 weights; BF16 x BF16 for the routed experts' weight
  // gradients, F32 c += BF16 dy^T @ BF16 x with beta 1). A BF16 operand (or Precision::Bf16) runs
  // the GEMM in bf16, an F32 operand rounded to bf16, accumulating in fp32; c may then be BF16
  // (rounded once).
  virtual void matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                      float alpha, float beta) = 0;
  // The routed experts' GEMM over rows grouped by expert: for every group g, the rows
  // [begin[g], begin[g+1]) of a [R,K] and c [R,N] (R = begin.back(), begin[0] = 0):
  //   c_g = a_g @ op(b[g]) + beta * c_g,  op(b[g]) [K,N], one weight tensor per group.
  // Empty groups are skipped (a null b[g] is allowed there).
  // Dtypes: F32 on every backend. Where the backend supports(GroupedMatmul, BF16):
  // - the weights may differ in dtype (F32 trainable, BF16 frozen experts);
  // - a may be BF16 (bf16 activations, used as they are);
  // - c may be BF16, with beta = 0 only: the bf16-rounded products are written straight to c.
  // Any BF16 operand (or Precision::Bf16) runs every group in bf16 with fp32 accumulation; an F32
  // c then receives c = beta * c + (the products rounded to bf16).
  virtual void grouped_matmul(Tensor& c, const Tensor& a, std::span<const Tensor* const> b,
                              std::span<const int64_t> begin, bool trans_b, float beta) = 0;
  // The sum of grouped products over the same groups (the routed experts' input gradient
  // dgate @ W_gate + dup @ W_up):  c_g = beta * c_g + sum_t terms[t].a_g @ op(terms[t].b[g]),
  // terms added in order; c F32 (with more than one term). Dtype rules of grouped_matmul per term.
  // Equal to grouped_matmul with beta for the first term and 1 for the others (the default);
  // a backend may run all terms in one launch.
  virtual void grouped_matmul_sum(Tensor& c, std::span<const GroupedTerm> terms,
                                  std::span<const int64_t> begin, bool trans_b, float beta);
  // The routed experts' gate and up projections and SwiGLU over grouped_matmul's row groups: for
  // every group g, the rows [begin[g], begin[g+1]) of x [R,K] (R = begin.back(), begin[0] = 0):
  //   gate_g = x_g @ gate_w[g]^T, up_g = x_g @ up_w[g]^T, h_g = silu(gate_g) * up_g,
  // with gate_w[g] and up_w[g] [I,K] and h [R,I]. gate and up [R,I] (each may be null: not kept)
  // receive the two products. h, gate and up share one dtype; h is computed from the products as
  // they are stored (under BF16 rounded first), so it equals swiglu_forward on them. Dtype rules
  // of grouped_matmul (trans_b, beta 0) per product. The default runs exactly that: two
  // grouped_matmul and one swiglu_forward; a backend may fuse them (the CUDA backend's expert GEMM
  // computes h in its epilogue and writes the products only where they are kept).
  virtual void grouped_swiglu(Tensor& h, Tensor* gate, Tensor* up, const Tensor& x,
                              std::span<const Tensor* const> gate_w,
                              std::span<const Tensor* const> up_w, std::span<const int64_t> begin);
  // The routed experts' weight gradients over the same row groups: for every group g whose
  // dw[g] is not null and whose rows [begin[g], begin[g+1]) are not empty (begin as in
  // grouped_matmul, R = begin.back()):
  //   dw[g] += dy_g^T @ x_g,  dy [R,N], x [R,K], dw[g] [N,K].
  // A null dw[g] (a frozen expert) gets no GEMM: its gradient does not exist. An empty group
  // leaves dw[g] as it is. The dw[g] are distinct tensors (a backend may write them at once).
  // Dtypes: dw F32; dy and x F32 on every backend, each F32 or BF16 where the backend
  // supports(Matmul, BF16); a BF16 operand (or Precision::Bf16) runs in bf16, an F32 operand
  // rounded, accumulating in fp32 (matmul's rules). The default is one matmul(dw[g], dy_g, x_g,
  // true, false, 1, 1) per group; a backend may batch the groups.
  virtual void grouped_weight_grad(std::span<Tensor* const> dw, const Tensor& dy, const Tensor& x,
                                   std::span<const int64_t> begin);
  // For g < batch.count: C_g = alpha * op(A_g) @ op(B_g) + beta * C_g, where X_g is operand x's
  // block g (GemmBatch). Every block must lie inside its tensor; c must not overlap a or b.
  virtual void matmul_batched(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a,
                              bool trans_b, float alpha, float beta, const GemmBatch& batch) = 0;
  // out (BF16) = x (F32) rounded to the nearest bf16 (ties to even), element by element, equal
  // numel: the rounding matmul applies to each F32 operand of a bf16 GEMM, as a pass of its own.
  // A layer whose input feeds several GEMMs rounds it once here and hands the BF16 copy to each
  // (nn/linear.h, gemm_input): the products are bit-identical and the per-GEMM conversions go.
  // Where supports(RoundBf16, BF16): the CUDA backend, and the CPU (exact; for tests, since its
  // GEMMs take no BF16 operand and its precision is always Fp32, no layer calls it there).
  virtual void round_bf16(Tensor& out, const Tensor& x) = 0;
  // The most rows of an F32 activation `a` that matmul(c, a, b, false, true) with an F32 c reads
  // unrounded, in fp32, whatever the precision (a GEMV for decoding one or a few tokens); 0 where
  // there is no such path. Rounding such an `a` beforehand would change the product, so layers
  // keep these few rows in F32 (gemm_input).
  virtual int64_t unrounded_gemv_rows() const { return 0; }

  // y += alpha * x (same numel).
  virtual void add(Tensor& y, const Tensor& x, float alpha) = 0;
  virtual void scale(Tensor& y, float alpha) = 0;

  // out[T,C] = table[ids[t]]; backward: dtable[ids[t]] += dout[t]. out, dout and dtable are F32;
  // the forward's table may be BF16 (a frozen table of a bf16 model) where the backend
  // supports(Embedding, BF16), and is widened exactly.
  virtual void embedding_forward(Tensor& out, const Tensor& table, const Tensor& ids) = 0;
  virtual void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) = 0;

  // out = x * rstd * w, rstd[T] = 1/sqrt(mean(x^2)+eps) saved for backward. x, w, rstd F32; out
  // F32, or BF16 where supports(RmsNorm, BF16): the F32 result rounded to the nearest bf16 (ties to
  // even, as round_bf16) as it is stored, for a norm whose output only bf16 GEMMs read.
  virtual void rmsnorm_forward(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w,
                               float eps) = 0;
  // dx = (or, when accumulate, dx +=) the input gradient; dw += the weight gradient, dw null for a
  // frozen weight. All F32. dx_bf16 (may be null; where supports(RmsNorm, BF16)): a BF16 tensor
  // that also receives the final dx rounded as round_bf16 would (a residual gradient that bf16
  // GEMMs read besides fp32 code).
  virtual void rmsnorm_backward(Tensor& dx, Tensor* dx_bf16, Tensor* dw, const Tensor& dout,
                                const Tensor& x, const Tensor& w, const Tensor& rstd,
                                bool accumulate) = 0;

  // h = silu(gate) * up, all [T,I]. Dtypes: all F32, or, where supports(SwiGLU, BF16), all BF16
  // or F32 gate and up with a BF16 h (math in fp32, h rounded once: a dense MLP's h under Bf16,
  // read only by GEMMs that would round it anyway).
  virtual void swiglu_forward(Tensor& h, const Tensor& gate, const Tensor& up) = 0;
  // dgate, dup from dh. Dtypes: all F32; where supports(SwiGLU, BF16), gate and up share a dtype
  // (F32 or BF16), dh is F32 or BF16, dgate and dup share a dtype (F32 or BF16): math in fp32, a
  // BF16 output rounded once.
  virtual void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dh, const Tensor& gate,
                               const Tensor& up) = 0;
  // The backward of out[r, :] = scale[r] * silu(gate[r, :]) * up[r, :] over the rows of [R, I]
  // tensors: dgate and dup as swiglu_backward of dh[r, :] = scale[r] * dout[r, :], and
  // dscale[r] = sum_i dout[r, i] * h[r, i] with h recomputed from gate and up (fp32 sums). The MoE
  // layer folds each slot's combine weight in here, so its backward needs neither the experts'
  // outputs nor h saved. dout, gate, up, dgate and dup share one dtype: F32, or BF16 where
  // supports(SwiGLU, BF16) (math in fp32, dgate and dup rounded once); scale and dscale F32 [R].
  virtual void swiglu_scaled_backward(Tensor& dgate, Tensor& dup, Tensor& dscale,
                                      const Tensor& dout, const Tensor& gate, const Tensor& up,
                                      const Tensor& scale) = 0;

  // out = x, both viewed as [T, heads, head_stride], with the pairs (2j, 2j+1) of the dims
  // [offset, offset + rope_dim) of every head rotated by angle pos*freq_j (the checkpoint's
  // interleaved layout; equal in q.k to the reference's de-interleave + rotate-half). cos/sin:
  // [max_pos, rope_dim/2]; positions: I32 [T]. inverse rotates by -angle (the backward pass).
  // x F32, or BF16 where supports(Rope, BF16) (widened exactly). out is x itself (in place: only
  // the pairs are written; a BF16 x takes its rotated pairs rounded), or a separate tensor of
  // equal numel that receives every element: F32, or BF16 where supports(Rope, BF16), each value
  // (the rotated ones and the copied rest) rounded to the nearest bf16 as round_bf16 would round
  // the in-place result. That is one pass where rotation then round_bf16 were two: dq for the bf16
  // GEMMs of q's projection; q under the bf16 attention is rotated in place in bf16, as its GEMM
  // writes it (nn/mla.cpp).
  virtual void rope(Tensor& out, const Tensor& x, int64_t heads, int64_t head_stride,
                    int64_t offset, int64_t rope_dim, const Tensor& cos, const Tensor& sin,
                    const Tensor& positions, bool inverse) = 0;

  // Causal attention per sequence: q,k [B*S, H, Dqk], v [B*S, H, Dv] -> out [B*S, H, Dv];
  // lse [B, H, S] (log-sum-exp of scaled scores) saved for backward. All F32; under
  // Precision::Bf16, where supports(Attention, BF16), q, k and v may be BF16 (the values the bf16
  // path would round them to, used as they are: a layer rounds them once for both passes), and
  // out may be BF16 (the F32 result rounded to nearest even as it is stored: an output that only
  // bf16 GEMMs read besides the backward). The backward reads out only for delta =
  // rowsum(dout * out), from a BF16 out widened exactly (so the gradients follow the rounded O).
  virtual void attention_forward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                 const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                                 float scale) = 0;
  virtual void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                  const Tensor& out, const Tensor& lse, const Tensor& q,
                                  const Tensor& k, const Tensor& v, int64_t batch, int64_t seq,
                                  int64_t heads, float scale) = 0;

  // In place on scores x [R, L]: row r becomes the softmax of its first
  // min(L, offset + r / group) entries, and 0 beyond (decode: rows are (token, head) pairs,
  // group = heads, offset = cached tokens + 1, so token i sees the cache and itself).
  virtual void causal_softmax(Tensor& x, int64_t group, int64_t offset) = 0;
  // idx I32 [R]: per row of x [R, L], the index of the largest of its first n entries (the first
  // one on ties); greedy decoding reads back this one id instead of the logits.
  virtual void argmax(Tensor& idx, const Tensor& x, int64_t n) = 0;
  // id I32 [1]: one token drawn from row 0 of logits F32 [1, V] among its first n entries
  // (n <= V), given the caller's uniform draw u01 in [0, 1) (made on the host, so every backend
  // makes the same choice from the same draw). With w_i = exp((x_i - max x) / temperature) (fp32)
  // and tokens ordered most likely first (larger logit, ties to the lower id):
  //   candidates: the first top_k (all when top_k is 0 or >= n); z = their mass;
  //   kept: with top_p < 1, the shortest prefix of the candidates whose mass reaches top_p * z,
  //         else every candidate;
  //   pick: the first kept token at which the running mass exceeds u01 * (mass of the kept),
  //         walking most likely first; when nothing is cut (all candidates, top_p >= 1) the walk
  //         goes in id order instead (the same distribution, and no ordering of the vocabulary).
  // sample_row is the rule on a host row (the CPU backend's implementation). Logits must be finite
  // or -inf (NaN gives an unspecified id). Sampling's temperature > 0; greedy decoding is argmax.
  // The id stays on the logits' device, so a decode loop reads back 4 bytes; the GPU's op waits
  // for nothing. A backend's masses may differ from the CPU's by rounding (~1e-7 relative), so its
  // pick can differ only where u01 * kept mass or top_p * z lies that close to a boundary.
  virtual void sample(Tensor& id, const Tensor& logits, int64_t n, const SampleParams& p,
                      double u01) = 0;

  // Decode steps whose kernels read no host-side length (so a step can be replayed as a CUDA
  // graph while the cache grows; infer/mla_decode.h, mla_decode_step):
  // dst[rows[i], :] = src[i, :] for dst [R, D], src [n, D] (F32), rows I32 [n] in [0, R) (the
  // cache write at device-side positions). Rows should be distinct: for a repeated row the CPU
  // keeps the last source, the GPU an unspecified one.
  virtual void set_rows(Tensor& dst, const Tensor& src, const Tensor& rows) = 0;
  // MLA's absorbed attention over the latent cache for n new tokens (DeepSeek-V2 §2.1.3). Rows of
  // q_lat [n*H, r], q_rope [n*H, dr] and ctx [n*H, r] are (token i, head h) pairs i*H+h;
  // kv_latent [cap, r] and k_rope [cap, dr] are the whole cache buffers; positions I32 [n], each
  // in [0, cap). Row (i, h) attends to the cache rows j <= positions[i] (the token's own row is
  // already written):
  //   s_j = scale * (q_lat[row] . kv_latent[j] + q_rope[row] . k_rope[j]),
  //   ctx[row] = sum_j softmax(s)_j kv_latent[j]   (fp32).
  // How many rows are read comes from `positions` in the tensor's memory, never from the host.
  virtual void latent_attention(Tensor& ctx, const Tensor& q_lat, const Tensor& q_rope,
                                const Tensor& kv_latent, const Tensor& k_rope,
                                const Tensor& positions, int64_t heads, float scale) = 0;

  // The rest of MLA's batch-1 decode step around latent_attention, fused so that a step launches
  // few kernels (each small launch costs about as much as its work; infer/mla_decode.cpp):
  //
  // The cache write of n tokens from the kv_a projection kv_a [n, r + dr] = [c_kv | k_rope]:
  //   kv_latent[positions[i]] = RMSNorm(c_kv[i]) * norm_w  (as rmsnorm_forward: rstd from the
  //                             fp32 mean of squares, out = w * (x * rstd)),
  //   k_rope[positions[i]]    = k_rope[i] rotated as Backend::rope does at positions[i].
  // kv_latent [cap, r], k_rope [cap, dr] (dr even), norm_w F32 [r], cos/sin [max_pos, dr/2],
  // positions I32 [n], each in [0, min(cap, max_pos)). Rows should be distinct (as set_rows).
  virtual void mla_cache_write(Tensor& kv_latent, Tensor& k_rope, const Tensor& kv_a,
                               const Tensor& norm_w, float eps, const Tensor& cos,
                               const Tensor& sin, const Tensor& positions) = 0;
  // The absorbed query (DeepSeek-V2 §2.1.3: W_kb folded into the query) from q [n, H*(dn+dr)],
  // per head [q_nope (dn) | q_pe (dr)], with kv_b = W_kv_b [H*(dn+dv), r], per head
  // [W_kb (dn rows) | W_vb (dv rows)]. Rows of q_lat [n*H, r] and q_rope [n*H, dr] are (token i,
  // head h) pairs i*H+h:
  //   q_lat[i*H+h, c] = sum_{d < dn} q[i, h*(dn+dr) + d] * kv_b[h*(dn+dv) + d, c]  (fp32 sums)
  //   q_rope[i*H+h]   = q_pe of head h of token i rotated as Backend::rope at positions[i].
  // q is not modified. kv_b F32, or BF16 where supports(MlaAbsorbQuery, BF16) (read as stored,
  // widened exactly). positions I32 [n], each in [0, max_pos). Deterministic.
  virtual void mla_absorb_query(Tensor& q_lat, Tensor& q_rope, const Tensor& q, const Tensor& kv_b,
                                const Tensor& cos, const Tensor& sin, const Tensor& positions,
                                int64_t heads, int64_t dn, int64_t dr, int64_t dv) = 0;
  // W_vb applied to the attention context ctx [n*H, r] (rows i*H+h), giving o [n, H*dv]:
  //   o[i, h*dv + j] = sum_c ctx[i*H+h, c] * kv_b[h*(dn+dv) + dn + j, c]  (fp32 sums).
  // kv_b as in mla_absorb_query (BF16 where supports(MlaValueHeads, BF16)). Deterministic.
  virtual void mla_value_heads(Tensor& o, const Tensor& ctx, const Tensor& kv_b, int64_t heads,
                               int64_t dn, int64_t dv) = 0;

  // losses[T] = -log softmax(logits[t])[targets[t]]; targets < 0 are ignored (loss 0).
  virtual void cross_entropy_forward(Tensor& losses, const Tensor& logits,
                                     const Tensor& targets) = 0;
  // dlogits = (softmax(logits) - onehot(target)) * scale; ignored rows get 0. dlogits is F32 (it
  // may be logits itself: each row is read before it is written), or BF16 where
  // supports(CrossEntropy, BF16) (the fp32 value rounded once; a separate tensor): the LM head's
  // gradient under Bf16, which only bf16 GEMMs read.
  virtual void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                      float scale) = 0;
  // Both of the above on the same rows, in one call: losses as cross_entropy_forward, dlogits as
  // cross_entropy_backward (same dtype rules; dlogits may be logits itself). The default runs the
  // two ops in sequence; a backend may read each row once for both (the LM head's training
  // step, where the passes over [rows, vocab] logits are the loss's whole cost). Where
  // supports(CrossEntropy, BF16), logits may also be BF16 (widened exactly; the LM head's
  // training logits under Bf16, as a bf16 model computes them), with BF16 dlogits, which may be
  // logits itself; a backend that accepts them overrides this op (the default's two ops take F32
  // logits only).
  virtual void cross_entropy_fused(Tensor& losses, Tensor& dlogits, const Tensor& logits,
                                   const Tensor& targets, float scale);

  // Token dispatch for MoE: out[i] = x[rows[i]] * (weights ? weights[i] : 1). weights F32; x and
  // out F32, or either BF16 where supports(GatherRows, BF16) (a BF16 x widened exactly, the
  // product in fp32, a BF16 out rounded once). x and out both I32, without weights, where
  // supports(GatherRows, I32): index tensors (a dispatch plan's slot tokens, compacted to the
  // trainable experts' slots) copied bit for bit.
  // In both ops a negative row is no row (a dispatch plan's padding slot): gather writes zeros,
  // scatter_add_rows skips it.
  virtual void gather_rows(Tensor& out, const Tensor& x, const Tensor& rows,
                           const Tensor* weights) = 0;
  // Combine: out[rows[i]] += x[i] * (weights ? weights[i] : 1). Deterministic order. out and
  // weights F32; x F32, or BF16 where supports(ScatterAddRows, BF16) (widened exactly, fp32 sums).
  virtual void scatter_add_rows(Tensor& out, const Tensor& x, const Tensor& rows,
                                const Tensor* weights) = 0;
  // The combine of a dispatch plan: scatter_add_rows(out, x, slot_token, weights), given also the
  // plan's token_slots I32 [T, K] (each token's K slots in increasing order, moe_dispatch_plan's),
  // which holds the same sums in the same order without a sort by destination. out F32 [T, H]; x
  // [S, H] and weights [S] (the plan's slots, padding included). The default ignores token_slots.
  virtual void combine_slots(Tensor& out, const Tensor& x, const Tensor& slot_token,
                             const Tensor& token_slots, const Tensor* weights);
  // dst[:, dst_col:dst_col+n] (+)= src[:, src_col:src_col+n] for 2-D tensors with equal rows.
  virtual void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col,
                            int64_t n, bool accumulate) = 0;

  // MLA: kv_b [T, H*(Dn+Dv)] per head [k_nope | v], k_rope [T, Dr] shared by heads ->
  // k [T, H, Dn+Dr] = [k_nope | k_rope], v [T, H, Dv]. Backward assigns dkv_b and dk_rope. F32;
  // where supports(MlaSplitKv, BF16), k and v (forward) and dkv_b (backward) may be BF16: the
  // values rounded once as they are written, for a bf16 attention and a bf16 GEMM to read; and
  // kv_b may be BF16 (a bf16 GEMM's output, widened exactly: into BF16 k and v the split copies).
  virtual void mla_split_kv(Tensor& k, Tensor& v, const Tensor& kv_b, const Tensor& k_rope,
                            int64_t heads, int64_t dn, int64_t dr, int64_t dv) = 0;
  virtual void mla_split_kv_backward(Tensor& dkv_b, Tensor& dk_rope, const Tensor& dk,
                                     const Tensor& dv, int64_t heads, int64_t dn, int64_t dr,
                                     int64_t dvd) = 0;
  // MLA's kv_a split (prefill and training; the decode step's is mla_cache_write): from kv_a
  // [T, r + dr] = [c_kv | k_pe] (F32),
  //   kv_latent[i] = RMSNorm(c_kv[i]) * norm_w, rstd[i] its 1 / rms (as rmsnorm_forward),
  //   k_rope[i]    = k_pe[i] rotated as Backend::rope at positions[i].
  // kv_latent [T, r] F32, or BF16 where supports(RmsNorm, BF16) (rounded once as written);
  // rstd F32 [T]; k_rope F32 [T, dr]. The default runs copy_columns, rope and rmsnorm_forward; a
  // backend may do it in one pass (the same values; the sum of squares in its own order).
  virtual void mla_kv_a_split(Tensor& kv_latent, Tensor& rstd, Tensor& k_rope, const Tensor& kv_a,
                              const Tensor& norm_w, float eps, const Tensor& cos, const Tensor& sin,
                              const Tensor& positions);
  // MLA's key/value up-projection and split in one op: k [T, H, dn+dr] = [kv_latent W_k,h^T |
  // k_rope], v [T, H, dv] = kv_latent W_v,h^T, where w_kv_b [H*(dn+dv), r] holds each head's
  // [W_k,h; W_v,h] rows (kv_b_proj's weight). The default is that GEMM into a kv_b [T, H*(dn+dv)]
  // (BF16 where k is BF16 and the backend writes bf16 GEMM outputs, else F32) and mla_split_kv;
  // where supports(MlaKvUp, BF16) a backend may write BF16 k and v straight from the GEMMs (the
  // same products, rounded once as stored).
  virtual void mla_kv_up(Tensor& k, Tensor& v, const Tensor& kv_latent, const Tensor& w_kv_b,
                         const Tensor& k_rope, int64_t heads, int64_t dn, int64_t dr, int64_t dv);

  // Gate: logits [T,E] (fp32) -> topk_idx I32 [T,K], topk_w [T,K], scores [T,E] (softmax or
  // sigmoid, saved for backward). bias [E] (may be undefined) shifts selection only.
  virtual void moe_gate_forward(Tensor& topk_idx, Tensor& topk_w, Tensor& scores,
                                const Tensor& logits, const Tensor& bias, const GateParams& p) = 0;
  // dlogits [T,E] from dtopk_w [T,K].
  // dscores [T,E] (may be undefined) adds a direct gradient on the scores (auxiliary loss).
  virtual void moe_gate_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& topk_idx,
                                 const Tensor& scores, const Tensor& dscores,
                                 const GateParams& p) = 0;

  // MoE permute plan: the (token, k) pairs of topk_idx I32 [T,K] (entries in [0, n_experts))
  // sorted by expert, stable in pair order t*K+k (deterministic), each expert's block of slots
  // padded with empty slots to a multiple of `align` rows (align >= 1; 1: no padding). Per slot s
  // of a pair: slot_pair[s] = t*K+k, slot_token[s] = t, slot_weight[s] = topk_w[t,k]; per padding
  // slot: -1, -1 and 0 (gather_rows makes its row zero, the combine skips it, so every expert GEMM
  // reads and writes zeros there and the weight gradients stay exact). token_slots I32 [T, K]:
  // each token's K slots in increasing order (for combine_slots). expert_begin I32
  // [n_experts+1]: expert e owns the slots [expert_begin[e], expert_begin[e+1]), padding included;
  // expert_rows I32 [n_experts]: its pairs (the load, without padding). The slot tensors hold
  // dispatch_slots(T*K, n_experts, align) entries: those past expert_begin[n_experts] are padding
  // too. Padding lets a backend run the experts' GEMMs as batched GEMMs over equal-sized blocks
  // (expert_row_alignment says when it pays). All on topk_idx's device (no host round trip but the
  // index check).
  virtual void moe_dispatch_plan(Tensor& slot_token, Tensor& slot_pair, Tensor& slot_weight,
                                 Tensor& token_slots, Tensor& expert_begin, Tensor& expert_rows,
                                 const Tensor& topk_idx, const Tensor& topk_w, int64_t n_experts,
                                 int64_t align) = 0;
  // The row multiple to pad each expert's slots to (moe_dispatch_plan's align) for `pairs`
  // (token, expert) pairs over n_experts experts: 1 (no padding) unless the backend runs padded
  // expert GEMMs faster than grouped ones at this size (the CUDA backend under bf16).
  virtual int64_t expert_row_alignment(int64_t pairs, int64_t n_experts) const {
    (void)pairs;
    (void)n_experts;
    return 1;
  }

  // The routed experts of a few tokens straight from the device-side routing (decode: no permute
  // plan, nothing read back to the host), and optionally the shared experts in the same pass. For
  // every token t of x [T,H]:
  //   y[t] (+)= (sum_{k in order} topk_w[t,k] * down_e(silu(gate_e x_t) * up_e x_t))
  //             + down_s(silu(gate_s x_t) * up_s x_t),   e = topk_idx[t,k],
  // with topk_idx I32 [T,K] (entries in [0, experts.size())), topk_w F32 [T,K], y F32 [T,H]
  // (accumulate: add to y, else assign). The second line is present when `shared` is given: the
  // shared experts (DeepSeekMoE's always-active experts, fused into one SwiGLU of width Is: gate_s
  // and up_s [Is,H], down_s [H,Is]; Is may differ from the routed I) with weight 1. Summation
  // order: the shared term is added to the routed sum, and that total to y (the CPU exactly so;
  // the GPU adds it into the same per-thread partial sums after the routed terms, then reduces).
  // Folding the shared experts in saves a decode step its four launches (two GEMVs, SwiGLU, one
  // GEMV). Every weight, shared ones included, has one dtype (F32, or BF16 where
  // supports(MoeExpertsSmall, BF16)); they are read as stored, activations stay fp32 and sums are
  // fp32, whatever the Precision (x is never rounded to bf16). Deterministic.
  virtual void moe_experts_small(Tensor& y, const Tensor& x, const Tensor& topk_idx,
                                 const Tensor& topk_w, std::span<const ExpertWeights> experts,
                                 bool accumulate, const ExpertWeights* shared = nullptr) = 0;

  // Optimizer. One AdamW update of parameter w with its moments m, v from gradient g (all F32,
  // same numel, same device), in place. w_bf16 (BF16, same numel; may be null) also receives the
  // updated w rounded to bf16 (to nearest even, as round_bf16): a master weight's GEMM copy
  // (Param::gemm_copy), written in the same pass instead of by a rounding before every GEMM.
  virtual void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& g, const AdamWStep& s,
                          Tensor* w_bf16) = 0;
  // Sum of squares of every element of an F32 tensor, accumulated in double (the global gradient
  // norm of clipping); a host value, so the caller waits for the device.
  virtual double sum_squares(const Tensor& x) = 0;
};

// The slots of moe_dispatch_plan for `pairs` pairs over n_experts experts padded to multiples of
// `align`: room for every pair and the most padding (align - 1 per expert).
inline int64_t dispatch_slots(int64_t pairs, int64_t n_experts, int64_t align) {
  return pairs + n_experts * (align - 1);
}

// M, N, K of Backend::matmul's c = op(a) @ op(b), after checking the shapes agree (every backend
// validates the same way).
struct MatmulDims {
  int64_t M = 0, N = 0, K = 0;
};
MatmulDims matmul_dims(const Tensor& c, const Tensor& a, const Tensor& b, bool trans_a,
                       bool trans_b);
// Checks that every block of a batched GEMM lies inside its tensor (all backends validate alike).
void check_gemm_batch(const Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                      const GemmBatch& g);

// The sizes of Backend::latent_attention after checking every shape (one-line errors): n tokens,
// H heads, latent rank r, rope dim dr, cache capacity cap. Positions are range-checked by each
// backend (on the GPU without waiting for the device).
struct LatentAttentionDims {
  int64_t n = 0, H = 0, r = 0, dr = 0, cap = 0;
};
LatentAttentionDims latent_attention_dims(const Tensor& ctx, const Tensor& q_lat,
                                          const Tensor& q_rope, const Tensor& kv_latent,
                                          const Tensor& k_rope, const Tensor& positions,
                                          int64_t heads);
// Whether Backend::rope runs in place (out is x itself), after checking what every backend checks
// alike: x of T * heads * head_stride elements (T = positions' count), out as many, the rope dims
// [offset, offset + rope_dim) inside a head (rope_dim even), cos and sin [max_pos, rope_dim / 2],
// positions I32, and an in-place out F32 (x's dtype). Dtypes beyond that: each backend's own.
bool rope_in_place(const Tensor& out, const Tensor& x, int64_t heads, int64_t head_stride,
                   int64_t offset, int64_t rope_dim, const Tensor& cos, const Tensor& sin,
                   const Tensor& positions);
// The row width D of Backend::set_rows after checking dst [R, D], src [n, D], rows I32 [n].
int64_t set_rows_dims(const Tensor& dst, const Tensor& src, const Tensor& rows);

// The sizes of the fused MLA step ops after checking every shape (one-line errors naming the op);
// positions are range-checked by each backend. n tokens, H heads, latent rank r, rope dim dr,
// cache capacity cap; limit: the positions' bound, min(cap, rope table rows) for the cache write
// and the rope table rows for the query.
struct MlaStepDims {
  int64_t n = 0, H = 0, r = 0, dr = 0, cap = 0, limit = 0;
};
MlaStepDims mla_cache_write_dims(const Tensor& kv_latent, const Tensor& k_rope, const Tensor& kv_a,
                                 const Tensor& norm_w, const Tensor& cos, const Tensor& sin,
                                 const Tensor& positions);
MlaStepDims mla_absorb_query_dims(const Tensor& q_lat, const Tensor& q_rope, const Tensor& q,
                                  const Tensor& kv_b, const Tensor& cos, const Tensor& sin,
                                  const Tensor& positions, int64_t heads, int64_t dn, int64_t dr,
                                  int64_t dv);
MlaStepDims mla_value_heads_dims(const Tensor& o, const Tensor& ctx, const Tensor& kv_b,
                                 int64_t heads, int64_t dn, int64_t dv);

// N, K of Backend::grouped_matmul (c_g [rows, N] = a_g [rows, K] @ op(b[g])) after checking
// that the groups tile the rows of a and c and that every non-empty group has a weight of the
// right shape.
struct GroupedMatmulDims {
  int64_t N = 0, K = 0;
};
GroupedMatmulDims grouped_matmul_dims(const Tensor& c, const Tensor& a,
                                      std::span<const Tensor* const> b,
                                      std::span<const int64_t> begin, bool trans_b);
// N, K of Backend::grouped_weight_grad (dw[g] [N, K] += dy_g^T [N, rows] @ x_g [rows, K]) after
// checking that the groups tile the rows of dy and x and that every non-null dw[g] is F32 [N, K].
GroupedMatmulDims grouped_weight_grad_dims(std::span<Tensor* const> dw, const Tensor& dy,
                                           const Tensor& x, std::span<const int64_t> begin);

// The sizes of Backend::moe_experts_small after checking the shapes of every argument (y and x
// [T,H], topk_idx and topk_w [T,K], each expert's weights [I,H], [I,H], [H,I], the shared experts'
// [Is,H], [Is,H], [H,Is] when given) and that all weights share one dtype, returned as `dtype`.
// Is = 0 without shared experts.
struct MoeExpertsSmallDims {
  int64_t T = 0, K = 0, H = 0, I = 0, E = 0, Is = 0;
  DType dtype = DType::F32;
};
MoeExpertsSmallDims moe_experts_small_dims(const Tensor& y, const Tensor& x, const Tensor& topk_idx,
                                           const Tensor& topk_w,
                                           std::span<const ExpertWeights> experts,
                                           const ExpertWeights* shared = nullptr);

// Backend::sample's rule on a host row of n logits (ops/cpu/cpu_sample.cpp): the CPU backend's
// implementation and every other backend's reference. It orders only the tokens it must (heap
// selections of the most likely few), so it stays cheap on a 100k vocabulary.
int32_t sample_row(const float* logits, int64_t n, const SampleParams& p, double u01);
// Backend::sample's argument checks (one-line errors, alike on every backend): id [1] I32, logits
// [1, V] F32, 0 < n <= V, temperature > 0, top_k >= 0, u01 in [0, 1].
void check_sample(const Tensor& id, const Tensor& logits, int64_t n, const SampleParams& p,
                  double u01);

// The backend for a device; throws a clear Error when that backend is not built or no device.
Backend& backend(Device device);
bool backend_available(Device device);

}  // namespace moekit
