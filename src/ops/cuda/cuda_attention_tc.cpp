// CUDA backend, host side part 3: causal attention on the bf16 tensor cores, the path of
// Precision::Bf16 (the fused fp32 kernel of cuda_attention.cu stays the exact Fp32 path).
// Plain algebra on cuBLAS: per sequence, the scores of a chunk of query rows for a batch of heads
// are one strided batched GEMM (head h of q is a [S, Dqk] matrix with row stride H*Dqk at offset
// h*Dqk, so no head is ever copied out), a row kernel turns them into P (bf16), and the next GEMM
// writes its fp32 result straight into the [tokens, heads, dim] output. Operands are bf16
// (q, k, v, dO rounded once per call, P and dS rounded by the row kernels); every GEMM
// accumulates in fp32, and the softmax itself runs on fp32 scores.
//
// Causality and memory: a chunk of query rows [i0, i1) only needs keys [0, i1), so the GEMMs of
// n chunks cover (n+1)/2n of the full square (256-row chunks of a 2048-token sequence: 56%, the
// causal half being 50%), and the fp32 score blocks of one chunk, not [S, S] per head, are all
// the scratch (bounded by kScratchBytes; heads, then rows, are split further when a sequence is
// long). Backward recomputes S and P from the saved lse, as the fp32 path does.
//
// Results are deterministic: dK and dV sum the query chunks in order through the GEMMs' beta = 1.
//
// out may be BF16 (a layer whose output only bf16 GEMMs read): the flash kernel rounds it as it
// stores; the GEMM path writes fp32 into scratch and rounds that, the same values. The backward
// reads O only for delta = rowsum(dO * O), from whichever dtype it was stored in.
//
// Where the head dims allow (multiples of 16 up to 256), fused flash-attention kernels replace the
// GEMM steps (scores never leave the SM): the forward of cuda_flash_attention.cu (same roundings,
// same lse) and the backward of cuda_flash_attention_bwd.cu (same roundings of P and dS, the same
// delta kernel). MOEKIT_CUDA_FLASH=0 selects the GEMM path for both (read per call, so tests can
// compare both).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_util.h"
#include "ops/cuda/kernels.h"

namespace moekit {

using cuda::check;

namespace {

// Most bytes of per-chunk score scratch (fp32 S and dP, bf16 P and dS) one call holds.
constexpr int64_t kScratchBytes = int64_t(512) << 20;
// Query rows per chunk: fewer rows skip more of the masked triangle, more rows make larger GEMMs.
constexpr int64_t kRowChunk = 256;

struct Chunking {
  int64_t heads = 1, rows = 1;  // heads per batched GEMM, query rows per chunk
};

// The scratch of a chunk is heads * rows * keys * bytes_per_score with keys <= seq.
Chunking chunking(int64_t seq, int64_t heads, int64_t bytes_per_score) {
  Chunking c{heads, std::min(seq, kRowChunk)};
  auto bytes = [&] { return c.heads * c.rows * seq * bytes_per_score; };
  while (c.heads > 1 && bytes() > kScratchBytes) c.heads = (c.heads + 1) / 2;
  while (c.rows > 16 && bytes() > kScratchBytes) c.rows = (c.rows + 1) / 2;
  return c;
}

bool flash_enabled() {
  const char* env = std::getenv("MOEKIT_CUDA_FLASH");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// The fused backward (cuda_flash_attention_bwd.cu), on by default with the flash forward;
// MOEKIT_CUDA_FLASH_BWD=0 keeps the cuBLAS path. Measured on the H200 (192/128, 16 heads):
// its first version ran 0.758 ms against the cuBLAS path's 0.712 at batch 1 x 2048; its variant 1
// (the default) 0.726 there and 2.249 ms at 4 x 2048 (114.6 TFLOP/s), the training shape.
bool flash_backward_enabled() {
  const char* env = std::getenv("MOEKIT_CUDA_FLASH_BWD");
  return flash_enabled() && (env == nullptr || std::strcmp(env, "0") != 0);
}

const void* bf16_at(const Tensor& t, int64_t offset) {
  return static_cast<const uint16_t*>(t.raw()) + offset;
}

}  // namespace

int cuda::flash_variant(const char* name, int count, int fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if (end == env || *end != '\0')
    fail("{} must be an integer (a flash-attention kernel variant), got \"{}\"", name, env);
  return v >= 0 && v < count ? int(v) : fallback;
}

void CudaBackend::attention_forward_tc(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,
                                       const Tensor& v, int64_t batch, int64_t seq, int64_t heads,
                                       float scale) {
  const char* op = "attention_forward (bf16)";
  const int64_t n = batch * seq * heads, dqk = q.numel() / n, dvd = v.numel() / n;
  const int64_t ldqk = heads * dqk, ldv = heads * dvd;
  const Tensor q16 = as_bf16(q), k16 = as_bf16(k), v16 = as_bf16(v);
  const cuda::AttentionShape shape{batch, seq, heads, dqk, dvd, scale};
  const bool out_bf16 = out.dtype() == DType::BF16;
  if (flash_enabled() && cuda::flash_attention_supported(shape, out.raw(), out_bf16, q16.raw(),
                                                         k16.raw(), v16.raw())) {
    check(cuda::flash_attention_forward(out.raw(), out_bf16, lse.f32(), q16.raw(), k16.raw(),
                                        v16.raw(), shape),
          op);
    return;
  }
  // The GEMMs below write fp32: a BF16 out gets them rounded after.
  Tensor out32 = out_bf16 ? scratch(out.shape(), DType::F32) : out;
  const Chunking c = chunking(seq, heads, /*S*/ 4 + /*P*/ 2);
  Tensor s = scratch({c.heads * c.rows * seq}, DType::F32);
  Tensor p = scratch({c.heads * c.rows * seq}, DType::BF16);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h0 = 0; h0 < heads; h0 += c.heads)
      for (int64_t i0 = 0; i0 < seq; i0 += c.rows) {
        const int64_t hc = std::min(c.heads, heads - h0), rows = std::min(c.rows, seq - i0);
        const int64_t keys = i0 + rows, tok = b * seq, bh = b * heads + h0;
        // Per head: S[rows, keys] = scale * Q[i0:i1] K[0:i1]^T.
        gemm_batched(s.raw(), DType::F32, keys, rows * keys,
                     {bf16_at(q16, ((tok + i0) * heads + h0) * dqk), DType::BF16, ldqk, dqk, false},
                     {bf16_at(k16, (tok * heads + h0) * dqk), DType::BF16, ldqk, dqk, true}, rows,
                     keys, dqk, hc, scale, 0.0f);
        check(cuda::attention_tc_softmax(p.raw(), lse.f32() + bh * seq, s.f32(), hc, rows, i0, seq),
              op);
        // O[i0:i1] = P V[0:i1], written into out's rows of these heads.
        gemm_batched(out32.f32() + ((tok + i0) * heads + h0) * dvd, DType::F32, ldv, dvd,
                     {p.raw(), DType::BF16, keys, rows * keys, false},
                     {bf16_at(v16, (tok * heads + h0) * dvd), DType::BF16, ldv, dvd, false}, rows,
                     dvd, keys, hc, 1.0f, 0.0f);
      }
  if (out_bf16) round_bf16(out, out32);
}

void CudaBackend::attention_backward_tc(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout,
                                        const Tensor& out, const Tensor& lse, const Tensor& q,
                                        const Tensor& k, const Tensor& v, int64_t batch,
                                        int64_t seq, int64_t heads, float scale) {
  const char* op = "attention_backward (bf16)";
  const int64_t n = batch * seq * heads, dqk = q.numel() / n, dvd = v.numel() / n;
  const int64_t ldqk = heads * dqk, ldv = heads * dvd;
  const Tensor q16 = as_bf16(q), k16 = as_bf16(k), v16 = as_bf16(v), do16 = as_bf16(dout);
  // delta = rowsum(dO * O) in fp32 from the unrounded dO and O as stored (an F32 O as the fp32
  // path; a BF16 O widened exactly).
  Tensor delta = scratch({n}, DType::F32);
  const cuda::AttentionShape shape{batch, seq, heads, dqk, dvd, scale};
  check(
      cuda::attention_delta(delta.f32(), dout.f32(), out.raw(), out.dtype() == DType::BF16, shape),
      op);
  if (flash_backward_enabled() &&
      cuda::flash_attention_backward_supported(shape, dq.f32(), dk.f32(), dv.f32(), do16.raw(),
                                               q16.raw(), k16.raw(), v16.raw())) {
    check(cuda::flash_attention_backward(dq.f32(), dk.f32(), dv.f32(), do16.raw(), lse.f32(),
                                         delta.f32(), q16.raw(), k16.raw(), v16.raw(), shape),
          op);
    return;
  }
  // dK, dV sum over the query chunks (beta = 1); the op assigns them, so start from zero.
  fill(dk, 0.0f);
  fill(dv, 0.0f);
  const Chunking c = chunking(seq, heads, /*S, dP*/ 2 * 4 + /*P, dS*/ 2 * 2);
  const int64_t chunk = c.heads * c.rows * seq;
  Tensor s = scratch({chunk}, DType::F32), dp = scratch({chunk}, DType::F32);
  Tensor p = scratch({chunk}, DType::BF16), ds = scratch({chunk}, DType::BF16);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h0 = 0; h0 < heads; h0 += c.heads)
      for (int64_t i0 = 0; i0 < seq; i0 += c.rows) {
        const int64_t hc = std::min(c.heads, heads - h0), rows = std::min(c.rows, seq - i0);
        const int64_t keys = i0 + rows, tok = b * seq, bh = b * heads + h0;
        const GemmOperand q_rows{bf16_at(q16, ((tok + i0) * heads + h0) * dqk), DType::BF16, ldqk,
                                 dqk, false};
        const GemmOperand do_rows{bf16_at(do16, ((tok + i0) * heads + h0) * dvd), DType::BF16, ldv,
                                  dvd, false};
        const GemmOperand k_all{bf16_at(k16, (tok * heads + h0) * dqk), DType::BF16, ldqk, dqk,
                                false};
        const GemmOperand v_all{bf16_at(v16, (tok * heads + h0) * dvd), DType::BF16, ldv, dvd,
                                false};
        GemmOperand k_t = k_all, v_t = v_all;
        k_t.trans = v_t.trans = true;
        // S = scale * Q K^T and dP = dO V^T, [rows, keys] per head.
        gemm_batched(s.raw(), DType::F32, keys, rows * keys, q_rows, k_t, rows, keys, dqk, hc,
                     scale, 0.0f);
        gemm_batched(dp.raw(), DType::F32, keys, rows * keys, do_rows, v_t, rows, keys, dvd, hc,
                     1.0f, 0.0f);
        check(cuda::attention_tc_dscores(p.raw(), ds.raw(), s.f32(), dp.f32(), lse.f32() + bh * seq,
                                         delta.f32() + bh * seq, hc, rows, i0, seq, scale),
              op);
        const GemmOperand p_t{p.raw(), DType::BF16, keys, rows * keys, true};
        const GemmOperand ds_n{ds.raw(), DType::BF16, keys, rows * keys, false};
        GemmOperand ds_t = ds_n;
        ds_t.trans = true;
        // dV[0:i1] += P^T dO[i0:i1];  dK[0:i1] += dS^T Q[i0:i1];  dQ[i0:i1] = dS K[0:i1].
        gemm_batched(dv.f32() + (tok * heads + h0) * dvd, DType::F32, ldv, dvd, p_t, do_rows, keys,
                     dvd, rows, hc, 1.0f, 1.0f);
        gemm_batched(dk.f32() + (tok * heads + h0) * dqk, DType::F32, ldqk, dqk, ds_t, q_rows, keys,
                     dqk, rows, hc, 1.0f, 1.0f);
        gemm_batched(dq.f32() + ((tok + i0) * heads + h0) * dqk, DType::F32, ldqk, dqk, ds_n, k_all,
                     rows, dqk, keys, hc, 1.0f, 0.0f);
      }
}

}  // namespace moekit
