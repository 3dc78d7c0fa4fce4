// The launch functions of moekit's CUDA kernels: plain pointers and sizes in, the launch status
// out. The .cu files (compiled by nvcc) define them; the host side of the backend (the .cpp files,
// compiled by the C++ compiler, where moekit::Error and fmt live) checks arguments, calls these
// and turns a failed status into an Error naming the op. All launches go to the backend's stream
// (stream.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "ops/ops.h"

namespace moekit::cuda {

// --- elementwise and layout (cuda_elementwise.cu)
cudaError_t fill_bits(void* p, int64_t n, int elem_bytes, uint32_t bits);
// f32 -> bf16 (round to nearest even), n elements.
cudaError_t convert_f32_bf16(void* out, const float* in, int64_t n);
cudaError_t add(float* y, const float* x, int64_t n, float alpha);
// y = beta * y + sum_{t < terms} float(x[t * n + i]) with x bf16 [terms, n], terms >= 1, added in
// order after beta * y; beta = 0 overwrites (NaN in y included).
cudaError_t add_bf16(float* y, const void* x, int64_t n, int64_t terms, float beta);
cudaError_t scale(float* y, int64_t n, float alpha);
// Where index checks record the first out-of-range entry seen since the backend last looked
// (CudaBackend::check_indices, CudaBackend::index_check): check = 0 while none, else the id of
// the failing check.
struct IndexError {
  int32_t check = 0;
  int32_t value = 0;
  int64_t position = 0;
};
// One range check of an index tensor, as the kernels see it (CudaBackend::index_check builds it):
// an entry v is valid when v < limit and v >= 0 (or negative, with allow_negative); an invalid one
// is replaced by `replacement` (a valid index) wherever it is used, so no kernel leaves its
// buffers, and the first invalid entry (lowest position) is recorded in *slot as (check, value,
// position) unless the slot already holds an earlier error. slot = nullptr: replace, record
// nothing (a second kernel reading indices that an earlier one of the same op checks, or no
// indices). Device side: index_check.cuh.
struct IndexCheck {
  IndexError* slot = nullptr;
  int64_t limit = 0;
  int32_t check = 0;
  int32_t replacement = 0;
  bool allow_negative = false;
};
// safe[i] = idx[i] when valid under `c`, else c.replacement; the first bad entry recorded as
// above (the copy spread over blocks, the record by the first). The ops on the decode
// path (rope, set_rows, embedding_forward, moe_experts_small, latent_attention, the fused MLA step
// ops) take an IndexCheck instead and check inside their own kernel: no launch and no scratch copy
// for the check.
cudaError_t check_indices(int32_t* safe, const int32_t* idx, int64_t n, const IndexCheck& c);
// dst[0, n) = words[0, n) for n <= kSmallTableWords: the words travel as the kernel's argument, so
// the copy is stream-ordered with no host buffer to keep alive. A cudaMemcpyAsync from pageable
// memory may wait for the stream to drain first: the pointer table of the shared experts' GEMM
// pair, queued while the host waits for the dispatch plan, held their GEMM back ~9 us that way.
constexpr int kSmallTableWords = 16;
cudaError_t write_small_table(uint64_t* dst, const uint64_t* words, int n);
// SwiGLU on activations stored as F32 or BF16 (`dtype`s; math in fp32, bf16 outputs rounded once).
// Forward: h, gate and up all of `dtype`. Backward: gate and up of in_dtype, dh of dh_dtype,
// dgate and dup of out_dtype.
cudaError_t swiglu_forward(void* h, DType h_dtype, const void* gate, const void* up, DType in_dtype,
                           int64_t n);
cudaError_t swiglu_backward(void* dgate, void* dup, DType out_dtype, const void* dh, DType dh_dtype,
                            const void* gate, const void* up, DType in_dtype, int64_t n);
// The backward of out[r] = scale[r] * silu(gate[r]) * up[r] over rows of `dim` (ops.h,
// swiglu_scaled_backward): every [rows, dim] operand of `dtype` (F32 or BF16), scale and dscale
// fp32 [rows].
cudaError_t swiglu_scaled_backward(void* dgate, void* dup, float* dscale, const void* dout,
                                   const void* gate, const void* up, const float* scale,
                                   DType dtype, int64_t rows, int64_t dim);
// out (of `out_dtype`: F32, or BF16 rounded as stored) = x with the pairs rotated; out == x (F32)
// rotates in place, writing only the pairs. positions [tokens], checked by `positions_check`
// (limit: the table's rows).
cudaError_t rope(void* out, DType out_dtype, const void* x, DType x_dtype, int64_t tokens,
                 int64_t heads, int64_t head_stride, int64_t offset, int64_t half, const float* cos,
                 const float* sin, const int32_t* positions, const IndexCheck& positions_check,
                 bool inverse);
// dst/src point at the first copied column; ld = row length in elements.
cudaError_t copy_columns(float* dst, int64_t dst_ld, const float* src, int64_t src_ld, int64_t rows,
                         int64_t n, bool accumulate);
// k, v (forward) and dkv_b (backward) of `dtype`: F32, or BF16 (rounded once as written). kv_b of
// kv_b_dtype: F32, or BF16 (widened exactly, so into BF16 k and v the split is a copy).
cudaError_t mla_split_kv(void* k, void* v, DType dtype, const void* kv_b, DType kv_b_dtype,
                         const float* k_rope, int64_t tokens, int64_t heads, int64_t dn, int64_t dr,
                         int64_t dv);
// k[t, h, dn + j] = k_rope[t, j] for every head h (k [T, H, dn + dr] of `dtype`, F32 or BF16):
// the shared rope part of MLA's keys, beside the dn columns mla_kv_up's GEMMs write.
cudaError_t mla_broadcast_k_rope(void* k, DType dtype, const float* k_rope, int64_t tokens,
                                 int64_t heads, int64_t dn, int64_t dr);
cudaError_t mla_split_kv_backward(void* dkv_b, DType dtype, float* dk_rope, const float* dk,
                                  const float* dv, int64_t tokens, int64_t heads, int64_t dn,
                                  int64_t dr, int64_t dvd);
// out[t, :] = table[ids[t], :] widened to fp32; the table is F32, or BF16 when table_bf16 (a frozen
// embedding of a bf16 model). ids checked by `ids_check` (limit: the table's rows).
cudaError_t embedding_forward(float* out, const void* table, bool table_bf16, const int32_t* ids,
                              const IndexCheck& ids_check, int64_t tokens, int64_t dim);
// Backend::set_rows: dst[rows[i]] = src[i] for i < n, rows of `dim` floats, the rows checked by
// `rows_check` (limit: dst's rows). (cuda_decode.cu still defines an unchecked overload that
// takes rows already checked; nothing calls it any more: it can go when that file is next
// edited.)
cudaError_t set_rows(float* dst, const float* src, const int32_t* rows,
                     const IndexCheck& rows_check, int64_t n, int64_t dim);

// --- few-row GEMMs (cuda_gemv.cu): c[m, n] = alpha * a[m, :] . w[n, :] + beta * c[m, n] for
// m < M <= kGemvMaxRows; w F32 or bf16 (w_bf16); leading dimensions in elements.
constexpr int kGemvMaxRows = 4;
cudaError_t gemv(float* c, const float* a, const void* w, bool w_bf16, int64_t M, int64_t N,
                 int64_t K, int64_t lda, int64_t ldw, int64_t ldc, float alpha, float beta);

// --- RMSNorm (cuda_norm.cu)
// out of out_dtype: F32, or BF16 (the fp32 value rounded to nearest even as it is stored).
cudaError_t rmsnorm_forward(void* out, DType out_dtype, float* rstd, const float* x, const float* w,
                            int64_t rows, int64_t dim, float eps);
// dx = (or += when accumulate) the input gradient; dx_bf16 (bf16, may be null) gets the final dx
// rounded to nearest even.
cudaError_t rmsnorm_backward_dx(float* dx, void* dx_bf16, const float* dout, const float* x,
                                const float* w, const float* rstd, int64_t rows, int64_t dim,
                                bool accumulate);
// dw += sum over rows of dout * x * rstd, in a fixed order: `partial` holds
// rmsnorm_dw_chunks(rows) * dim floats.
int64_t rmsnorm_dw_chunks(int64_t rows);
cudaError_t rmsnorm_backward_dw(float* dw, float* partial, const float* dout, const float* x,
                                const float* rstd, int64_t rows, int64_t dim);

// --- MoE dispatch/combine and gate (cuda_moe.cu)
// out [n, dim] of out_dtype (F32, or BF16: rounded once) = x[rows[i]] * (weights ? weights[i] : 1)
// with x of x_dtype (F32, or BF16: widened exactly); zeros for a negative row (no row). Or out and
// x both I32 (index tensors), weights null: copied bit for bit. The rows are checked under `check`
// inside the kernel.
cudaError_t gather_rows(void* out, DType out_dtype, const void* x, DType x_dtype,
                        const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                        const IndexCheck& check);
// A scatter plan: the positions 0..n-1 stably sorted by destination row (cub radix sort); a
// negative row (no row) is keyed num_rows, so it sorts after every real one. keys: scratch of n.
size_t row_plan_temp_bytes(int64_t n, int64_t num_rows);
cudaError_t row_plan(void* temp, size_t temp_bytes, const int32_t* rows, int32_t* keys,
                     int32_t* sorted_rows, int32_t* iota, int32_t* order, int64_t n,
                     int64_t num_rows);
// out[rows[i]] += w[i] * x[i], every destination summing its sources in increasing i; x [n, dim]
// of x_dtype (F32 or BF16), fp32 sums; rows at or past num_rows (no row) add nothing.
cudaError_t scatter_add_planned(float* out, const void* x, DType x_dtype, const float* weights,
                                const int32_t* sorted_rows, const int32_t* order, int64_t n,
                                int64_t dim, int64_t num_rows);
// The outputs and scratch of moe_dispatch_plan. Outputs: slot_token, slot_pair, slot_weight
// [slots], token_slots [n], expert_begin [n_experts+1], expert_rows [n_experts]. Scratch: counts
// [moe_plan_blocks(n) * (n_experts + 1)].
struct DispatchPlanBuffers {
  int32_t* slot_token = nullptr;
  int32_t* slot_pair = nullptr;
  float* slot_weight = nullptr;
  int32_t* token_slots = nullptr;
  int32_t* expert_begin = nullptr;
  int32_t* expert_rows = nullptr;
  int32_t* counts = nullptr;
};
// The most experts moe_dispatch_plan takes (its per-block tables live in shared memory).
constexpr int64_t kPlanMaxExperts = 4096;
// The blocks of moe_dispatch_plan's two passes over n pairs (each block a chunk of them).
int64_t moe_plan_blocks(int64_t n);
// The MoE permute plan (Backend::moe_dispatch_plan) of n = T*K pairs as a stable counting sort in
// two launches: each block counts its chunk's pairs per expert (and flags a bad expert index under
// `check`: block 0 of the second launch then records the first), then each block finds the padded
// expert begins (every block
// sums all counts: no third launch) and places its chunk's pairs in pair order: slot_pair =
// t*K+k, slot_token = t, slot_weight = topk_w[t*K+k], and token_slots[t*K + j] the token's j-th
// slot in increasing order; every other slot padding (-1, -1, 0). n_experts <= kPlanMaxExperts.
cudaError_t moe_dispatch_plan(const DispatchPlanBuffers& b, const int32_t* topk_idx,
                              const IndexCheck& check, const float* topk_w, int64_t n, int64_t k,
                              int64_t n_experts, int64_t align, int64_t slots);
// The combine of a dispatch plan: out[t] += sum over j < k of w[s] * x[s], s = token_slots[t*k +
// j] in that (increasing) order, w = weights or 1; out F32 [tokens, dim], x [slots, dim] of
// x_dtype (F32 or BF16, widened exactly), fp32 sums in scatter_add_planned's order (so the same
// values). The slots are checked under `check` inside the kernel. k <= kCombineMaxK.
constexpr int64_t kCombineMaxK = 32;
cudaError_t moe_combine(float* out, const void* x, DType x_dtype, const float* weights,
                        const int32_t* token_slots, const IndexCheck& check, int64_t tokens,
                        int64_t k, int64_t dim);
// The shared experts of moe_experts_small: one dense SwiGLU (gate, up [inter, hidden], down
// [hidden, inter], the routed experts' dtype) applied to every token with weight 1; h: scratch
// [tokens, inter]. Absent when gate is null (or inter is 0).
struct SmallShared {
  const void* gate = nullptr;
  const void* up = nullptr;
  const void* down = nullptr;
  float* h = nullptr;
  int64_t inter = 0;
};
// The few-token experts (Backend::moe_experts_small) as two memory-bound passes, pairs p = t*K+k:
// h [T*K, I] = silu(gate_e x_t) * up_e x_t (and shared.h [T, Is] alike, in the same launch), then
// y[t] (+)= sum_k topk_w[p] down_e h[p] (k in order) + down_s shared.h[t] (same launch). weights:
// a device table of 3 * n_experts pointers [gate_0, up_0, down_0, gate_1, ...], all F32 or all
// BF16 (`bf16`); topk_idx checked by `experts_check` (limit: n_experts).
cudaError_t moe_experts_small(float* y, float* h, const float* x, const int32_t* topk_idx,
                              const IndexCheck& experts_check, const float* topk_w,
                              const void* const* weights, bool bf16, int64_t tokens, int64_t k,
                              int64_t hidden, int64_t inter, bool accumulate,
                              const SmallShared& shared);
struct GateLaunch {
  GateParams p;
  float weight_scale = 1.0f;  // routed_scaling_factor when it applies (see cuda_ops.cpp)
  bool normalise = false;     // norm_topk_prob with top_k > 1
};
cudaError_t moe_gate_forward(int32_t* topk_idx, float* topk_w, float* scores, const float* logits,
                             const float* bias, const GateLaunch& g, int64_t tokens);
cudaError_t moe_gate_backward(float* dlogits, const float* dtopk_w, const int32_t* topk_idx,
                              const float* scores, const float* dscores, const GateLaunch& g,
                              int64_t tokens);

// --- the routed experts' GEMM on Hopper (cuda_expert_gemm.cu): for every 128-row block m of the
// permuted rows a [rows, k] (bf16, rows a multiple of 128; each block one expert's, the plan padded
// to 128), with e = block_expert[m]:
//   plain:  out[m-block, :n] = a_m @ W0_e^T                      (W0_e [n, k])
//   SwiGLU: out[m-block, :n] = silu(a_m @ W0_e^T) * (a_m @ W1_e^T) (W0_e, W1_e [n, k]: gate, up),
//           and gate / up (when not null) the two products, each rounded to bf16 before SwiGLU
//           reads it (as swiglu_forward on stored bf16 products).
// All bf16, fp32 accumulation; k % 8 == 0 and n % 2 == 0 (TMA strides, pair stores). One launch.
// The operands are described by TMA tensor maps (128 bytes each, encoded on the host).
struct alignas(64) TensorMap {
  uint8_t bytes[128];
};
// An attribute of the current device, 0 where it cannot be read (callers treat 0 as "not
// available": no Hopper kernels, no L2 to plan for).
inline int current_device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess)
    return 0;
  return value;
}

// A bf16 tensor of `rank` (1-5) dimensions as TMA sees it: dims[0] the contiguous one (elements),
// strides[i] the bytes between steps of dimension i + 1 (multiples of 16), boxes of box[i]
// elements (box[0] * 2 <= 128 bytes: the 128-byte swizzle of wgmma_util.cuh), out-of-range
// elements read as zero. cudaErrorNotSupported without a driver that encodes tensor maps,
// cudaErrorInvalidValue where TMA cannot describe it.
cudaError_t encode_bf16_tensor_map(TensorMap* map, const void* base, int rank, const uint64_t* dims,
                                   const uint64_t* strides, const uint32_t* box);
// Whether the kernel runs here: built for sm_90a and running on a compute capability 9.0 GPU.
bool expert_gemm_available();
// The map of a row-major bf16 matrix [rows, cols] with rows `ld` elements apart, read in boxes of
// 64 columns x 128 rows (128-byte swizzle). Fails (cudaErrorInvalidValue) where TMA cannot
// describe it: base not 16-byte aligned, ld * 2 not a multiple of 16, sizes past 2^31.
cudaError_t expert_gemm_tensor_map(TensorMap* map, const void* base, int64_t rows, int64_t cols,
                                   int64_t ld);
struct ExpertGemmArgs {
  TensorMap a_map;                        // the activations [rows, k]
  const TensorMap* w_maps = nullptr;      // device: [experts][2] (W0_e, W1_e; W1 unused when plain)
  const int32_t* block_expert = nullptr;  // device: [rows / 128]
  int64_t rows = 0, n = 0, k = 0;
  void* out = nullptr;  // [rows, n], ld_out elements per row
  int64_t ld_out = 0;
  void* gate = nullptr;  // SwiGLU only, may be null: [rows, n] with ld_out too
  void* up = nullptr;
  bool swiglu = false;
};
cudaError_t expert_gemm(const ExpertGemmArgs& args);

// --- decoding (cuda_decode.cu): Backend::causal_softmax and Backend::argmax on x [rows, cols].
cudaError_t causal_softmax(float* x, int64_t rows, int64_t cols, int64_t group, int64_t offset);
// argmax's scratch: best [rows] and done [rows], zero before the call and zero again after it
// (the kernel resets them), so one zeroed buffer serves every call on the stream.
cudaError_t argmax(int32_t* idx, unsigned long long* best, unsigned* done, const float* x,
                   int64_t rows, int64_t cols, int64_t n);

// --- sampling (cuda_sample.cu): Backend::sample on the first n entries of the logits row x.
// scratch: kSampleScratchBytes of device memory (8-byte aligned), zero before the call and zero
// again after it (the last kernel resets it), so one zeroed buffer serves every call on the
// stream. Nothing waits for the device; the id is written in device memory.
struct SampleLaunch {
  float inv_temperature = 1.0f;  // 1 / temperature, as the CPU computes it (fp32)
  int64_t top_k = 0;             // 0: no cut by count (the host passes 0 for top_k >= n)
  float top_p = 1.0f;            // >= 1: no nucleus
  double u01 = 0.0;              // the caller's uniform draw in [0, 1]
};
constexpr int64_t kSampleMaxN = int64_t(1) << 21;
constexpr size_t kSampleScratchBytes = 64 + 2048 * 16;
cudaError_t sample(int32_t* id, void* scratch, const float* x, int64_t n, const SampleLaunch& s);

// Backend::latent_attention as split-K ("flash decoding"): the cache rows are cut into splits of
// latent_chunk(cap) rows; one block per (split, group of kLatentBlockHeads heads, token) writes a
// partial (running max m, sum of exp l, unnormalised context) per head, and a second kernel merges
// a row's splits in split order. The split depends on the capacity only, never on the positions,
// so the launch configuration of a decode step stays the same while the cache fills (CUDA graphs).
// Register tiles bound the sizes: rank <= kLatentMaxRank, rope <= kLatentMaxRope.
constexpr int64_t kLatentMaxRank = 512, kLatentMaxRope = 64;  // DeepSeek-V2/V3: 512 and 64
// Heads per block (one warp each): a short context has few splits, so the heads are what spreads
// a decode step over the GPU (16 per block left 19 blocks busy at 289 cache rows: 13.4 us).
constexpr int64_t kLatentBlockHeads = 4;
constexpr int64_t kLatentMaxSplits = 256;    // bounds the partials (scratch) and the merge's work
constexpr int64_t kLatentMaxTokens = 65535;  // tokens per launch (grid.z)
// At least 16 rows per split (one staged tile: a short context still spreads over many blocks,
// each one round trip to memory), at most kLatentMaxSplits splits; a multiple of 16 rows.
inline int64_t latent_chunk(int64_t cap) {
  int64_t c = (cap + kLatentMaxSplits - 1) / kLatentMaxSplits;
  c = c < 16 ? 16 : c;
  return (c + 15) / 16 * 16;
}
inline int64_t latent_splits(int64_t cap) {
  const int64_t c = latent_chunk(cap);
  return (cap + c - 1) / c;
}
struct LatentShape {
  int64_t tokens = 0, heads = 0, rank = 0, rope = 0, cap = 0;
  float scale = 1.0f;
};
// ctx, q_lat [tokens * heads, rank], q_rope [tokens * heads, rope], kv_latent [cap, rank], k_rope
// [cap, rope], positions [tokens], each used through `positions_check` (limit: cap); the launch
// records the first bad entry of check_positions[0, check_n) (the op's positions, of which a long
// prompt's launches take a slice each: one launch records, the others pass a check without slot).
// Scratch: part_acc holds tokens * latent_splits(cap) * heads * rank floats, part_ml tokens *
// latent_splits(cap) * heads * 2. cudaErrorInvalidValue when a size is beyond the limits above.
cudaError_t latent_attention(float* ctx, float* part_acc, float* part_ml, const float* q_lat,
                             const float* q_rope, const float* kv_latent, const float* k_rope,
                             const int32_t* positions, const IndexCheck& positions_check,
                             const int32_t* check_positions, int64_t check_n, const LatentShape& s);

// --- MLA's fused decode-step ops (cuda_mla_step.cu; ops.h says what each computes). Positions
// are checked inside the kernels by `positions_check` (a bad one is replaced by row 0 and
// recorded, as set_rows does); cos and sin are [rows, rope / 2].
struct MlaStepShape {
  int64_t tokens = 0, heads = 0, rank = 0, dn = 0, dr = 0, dv = 0;
};
// Backend::mla_cache_write: kv_latent [cap, rank], k_rope [cap, dr], kv_a [tokens, rank + dr],
// norm_w [rank] (heads, dn, dv unused). One block per token.
cudaError_t mla_cache_write(float* kv_latent, float* k_rope, const float* kv_a, const float* norm_w,
                            float eps, const float* cos, const float* sin, const int32_t* positions,
                            const IndexCheck& positions_check, const MlaStepShape& s);
// Backend::mla_kv_a_split: kv_latent [tokens, rank] F32 or BF16 (latent_bf16), rstd [tokens],
// k_rope [tokens, dr], kv_a and norm_w as above. One block per token.
cudaError_t mla_kv_a_split(void* kv_latent, bool latent_bf16, float* rstd, float* k_rope,
                           const float* kv_a, const float* norm_w, float eps, const float* cos,
                           const float* sin, const int32_t* positions,
                           const IndexCheck& positions_check, const MlaStepShape& s);
// Backend::mla_absorb_query with kv_b [heads * (dn + dv), rank] F32, or BF16 (kv_b_bf16). One
// launch for any number of tokens (kMlaAbsorbTokens per pass over the weight).
constexpr int kMlaAbsorbTokens = 4;
constexpr int64_t kMlaAbsorbMaxDn = 256;  // q_nope staged in shared memory (DeepSeek: 128)
cudaError_t mla_absorb_query(float* q_lat, float* q_rope, const float* q, const void* kv_b,
                             bool kv_b_bf16, const float* cos, const float* sin,
                             const int32_t* positions, const IndexCheck& positions_check,
                             const MlaStepShape& s);
// Backend::mla_value_heads: o [tokens, heads * dv] from ctx [tokens * heads, rank] and kv_b as
// above (dr unused).
cudaError_t mla_value_heads(float* o, const float* ctx, const void* kv_b, bool kv_b_bf16,
                            const MlaStepShape& s);

// --- losses (cuda_loss.cu)
cudaError_t cross_entropy_forward(float* losses, const float* logits, const int32_t* targets,
                                  int64_t rows, int64_t vocab);
// dlogits: fp32, or bf16 (dlogits_bf16: each fp32 value rounded once).
cudaError_t cross_entropy_backward(void* dlogits, bool dlogits_bf16, const float* logits,
                                   const int32_t* targets, int64_t rows, int64_t vocab,
                                   float scale);
// Both in one kernel (Backend::cross_entropy_fused); dlogits may be logits itself. fp32 logits:
// the same losses and dlogits bits as the two above. bf16 logits (logits_bf16, with bf16
// dlogits): each row read from HBM once where it fits a block's shared memory, else twice; the
// same values to rounding (fixed orders: deterministic).
cudaError_t cross_entropy_fused(float* losses, void* dlogits, bool dlogits_bf16, const void* logits,
                                bool logits_bf16, const int32_t* targets, int64_t rows,
                                int64_t vocab, float scale);
// Whether cross_entropy_fused reads bf16 rows of `vocab` entries once, staged in shared memory, on
// the current device (else twice: a row longer than a block's shared memory holds).
bool cross_entropy_stages_rows(int64_t vocab);

// --- causal attention (cuda_attention.cu)
struct AttentionShape {
  int64_t batch = 0, seq = 0, heads = 0, dqk = 0, dv = 0;
  float scale = 1.0f;
};
// Fails with cudaErrorInvalidValue when the head dims need more shared memory than a block has.
cudaError_t attention_forward(float* out, float* lse, const float* q, const float* k,
                              const float* v, const AttentionShape& s);
// delta: scratch of batch * heads * seq floats.
cudaError_t attention_backward(float* dq, float* dk, float* dv, float* delta, const float* dout,
                               const float* out, const float* lse, const float* q, const float* k,
                               const float* v, const AttentionShape& s);
// delta[b, h, i] = dot(dO[b*seq + i, h], O[b*seq + i, h]) (the softmax-backward correction).
// out fp32, or bf16 when out_bf16 (widened exactly); fp32 products and sums either way.
cudaError_t attention_delta(float* delta, const float* dout, const void* out, bool out_bf16,
                            const AttentionShape& s);

// --- causal attention on the bf16 tensor cores, the kernels between the GEMMs
// (cuda_attention_tc.cu). One call covers `heads` heads of one sequence and the query rows
// [i0, i0 + rows); keys run over [0, keys) with keys = i0 + rows (causal). Per head, the score
// blocks s, dp and the outputs p, ds are row-major [rows, keys] at head * rows * keys (p, ds:
// bf16). lse and delta point at head 0's [seq] row of the [B, H, S] statistics; head h's row
// follows at h * seq.
// p = exp(s - lse) with lse = log sum_j<=i exp(s_ij) written; s holds scaled scores.
cudaError_t attention_tc_softmax(void* p, float* lse, const float* s, int64_t heads, int64_t rows,
                                 int64_t i0, int64_t seq);
// p = exp(s - lse), ds = p * (dp - delta) * scale, both zero above the diagonal.
cudaError_t attention_tc_dscores(void* p, void* ds, const float* s, const float* dp,
                                 const float* lse, const float* delta, int64_t heads, int64_t rows,
                                 int64_t i0, int64_t seq, float scale);

// --- causal attention forward on the bf16 tensor cores as one fused flash-attention kernel
// (cuda_flash_attention.cu): q, k bf16 [batch * seq, heads, dqk], v bf16 [.., dv], out fp32
// [.., dv] (or bf16 when out_bf16: the fp32 values rounded to nearest even as stored), lse
// [batch, heads, seq] (natural log of the scaled scores' sum of exponentials). Whether it takes
// the shape: dqk and dv multiples of 16 in [16, 256], q, k, v 16-byte and out 8-byte (bf16:
// 4-byte) aligned, the grid within limits.
bool flash_attention_supported(const AttentionShape& s, const void* out, bool out_bf16,
                               const void* q, const void* k, const void* v);
cudaError_t flash_attention_forward(void* out, bool out_bf16, float* lse, const void* q,
                                    const void* k, const void* v, const AttentionShape& s);
// The backward as fused kernels (cuda_flash_attention_bwd.cu), for the same shapes: dout bf16
// [.., dv], lse as the forward writes it, delta [batch, heads, seq] from attention_delta; dq, dk,
// dv fp32, assigned. dS = P * (dP - delta) * scale, P and dS rounded to bf16 before the products
// they feed, as attention_tc_dscores. Whether it takes the shape: as flash_attention_supported,
// dq, dk, dv 8-byte and dout 16-byte aligned.
bool flash_attention_backward_supported(const AttentionShape& s, const float* dq, const float* dk,
                                        const float* dv, const void* dout, const void* q,
                                        const void* k, const void* v);
cudaError_t flash_attention_backward(float* dq, float* dk, float* dv, const void* dout,
                                     const float* lse, const float* delta, const void* q,
                                     const void* k, const void* v, const AttentionShape& s);
// The tiling variant the environment variable `name` asks for (MOEKIT_FLASH_FWD_VARIANT,
// MOEKIT_FLASH_BWD_VARIANT; read per call, so tests and the throughput measurement can switch):
// an integer in [0, count), else `fallback` (the default, the fastest measured). An integer out of
// range runs the default, so a test can sweep one id over the forward and backward variants
// together; a value that is no integer at all is a typo, an Error naming the variable. Defined on
// the host side (cuda_attention_tc.cpp), where Error lives; the launchers above call it.
int flash_variant(const char* name, int count, int fallback);

// --- optimizer (cuda_optim.cu)
// w_bf16 (may be null): also the updated w rounded to bf16 (a master weight's GEMM copy).
cudaError_t adamw_step(float* w, float* m, float* v, const float* g, void* w_bf16, int64_t n,
                       const AdamWStep& s);
// *out = sum of x[i]^2 in double; `partial` holds sum_squares_blocks(n) doubles.
int64_t sum_squares_blocks(int64_t n);
cudaError_t sum_squares(double* out, double* partial, const float* x, int64_t n);

}  // namespace moekit::cuda
