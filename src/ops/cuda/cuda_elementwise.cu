// CUDA kernels, part 1: fills, axpy/scale, index checks, SwiGLU, RoPE, embedding lookup, the
// cache's row write (set_rows), column copies and the MLA k/v split. Each is one pass over memory:
// a lambda over the output elements (device_util.cuh's for_each; for_each_checked of
// index_check.cuh where the op reads an index tensor, which it checks itself), or for the ops over
// row layouts (RoPE, the k/v split and its backward, column copies, the embedding lookup) a row
// op whose row and head come from the launch (for_each_row, for_each_row_checked), without a
// division per element. moekit's layouts ([T, heads, stride] views, interleaved rope pairs,
// per-head [k_nope | v] blocks) match no library routine, and one fused pass is the fastest way
// to do a memory-bound op.
#include <cuda_bf16.h>

#include "ops/cuda/device_util.cuh"
#include "ops/cuda/index_check.cuh"
#include "ops/cuda/kernels.h"

namespace moekit::cuda {

namespace {

template <typename T>
cudaError_t fill_as(void* p, int64_t n, T value) {
  T* q = static_cast<T*>(p);
  return for_each(n, [=] __device__(int64_t i) { q[i] = value; });
}

}  // namespace

cudaError_t fill_bits(void* p, int64_t n, int elem_bytes, uint32_t bits) {
  if (elem_bytes == 4) return fill_as<uint32_t>(p, n, bits);
  if (elem_bytes == 2) return fill_as<uint16_t>(p, n, uint16_t(bits));
  return cudaErrorInvalidValue;
}

// The conversion (to nearest even, as from_f32) and the axpy/scale run eight elements per
// thread where they can (for_each8): the routed experts' fp32 weights, rounded for each GEMM that
// reads them, took ~13 us per 2048 x 1408 matrix one element per thread (~1.9 ms per 4-layer ESFT
// step on the H200).
cudaError_t convert_f32_bf16(void* out, const float* in, int64_t n) {
  auto* o = static_cast<bf16_t*>(out);
  return for_each8(
      n,
      [=] __device__(int64_t c) {
        float v[8];
        load8(in + 8 * c, v);
        store8(o + 8 * c, v);
      },
      [=] __device__(int64_t i) { o[i] = from_f32<bf16_t>(in[i]); }, in, o);
}

cudaError_t add_bf16(float* y, const void* x, int64_t n, int64_t terms, float beta) {
  const auto* xb = static_cast<const bf16_t*>(x);
  if (terms < 1) return cudaErrorInvalidValue;
  return for_each(n, [=] __device__(int64_t i) {
    // beta = 0 never reads y (NaN included); the terms are added in order after beta * y.
    const float first = __bfloat162float(xb[i]);
    float acc = beta == 0.0f ? first : beta * y[i] + first;
    for (int64_t t = 1; t < terms; ++t) acc += __bfloat162float(xb[t * n + i]);
    y[i] = acc;
  });
}

cudaError_t add(float* y, const float* x, int64_t n, float alpha) {
  return for_each8(
      n,
      [=] __device__(int64_t c) {
        float v[8], w[8];
        load8(y + 8 * c, v);
        load8(x + 8 * c, w);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = fmaf(alpha, w[j], v[j]);
        store8(y + 8 * c, v);
      },
      [=] __device__(int64_t i) { y[i] = fmaf(alpha, x[i], y[i]); }, y, x);
}

cudaError_t scale(float* y, int64_t n, float alpha) {
  return for_each8(
      n,
      [=] __device__(int64_t c) {
        float v[8];
        load8(y + 8 * c, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= alpha;
        store8(y + 8 * c, v);
      },
      [=] __device__(int64_t i) { y[i] *= alpha; }, y);
}

namespace {

// Every block copies a grid-stride share; block 0 also scans all of idx for the first bad entry.
// 1024-thread blocks, so that block 0's scan (16-byte loads, kLoadBatch in flight per thread)
// covers the 8192 x 6 top-k indices of a training step in two rounds of loads. The one-block
// kernel this replaces copied and then scanned one entry per thread at a time: 14.6 us per call
// on the H200, ~59 calls per training step.
constexpr int kCheckThreads = 1024;

__global__ void check_indices_kernel(int32_t* safe, const int32_t* idx, int64_t n, IndexCheck c) {
  if (blockIdx.x == 0) record_first_bad_index(c, idx, n);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    safe[i] = checked_index(c, idx[i]);
}

}  // namespace

namespace {

struct SmallTable {
  uint64_t words[kSmallTableWords];
};

__global__ void write_small_table_kernel(uint64_t* dst, SmallTable t, int n) {
  if (int(threadIdx.x) < n) dst[threadIdx.x] = t.words[threadIdx.x];
}

}  // namespace

cudaError_t write_small_table(uint64_t* dst, const uint64_t* words, int n) {
  if (n <= 0) return cudaSuccess;
  if (n > kSmallTableWords) return cudaErrorInvalidValue;
  SmallTable t{};
  for (int i = 0; i < n; ++i) t.words[i] = words[i];
  write_small_table_kernel<<<1, kSmallTableWords, 0, stream()>>>(dst, t, n);
  return cudaGetLastError();
}

cudaError_t check_indices(int32_t* safe, const int32_t* idx, int64_t n, const IndexCheck& c) {
  if (n <= 0) return cudaSuccess;
  check_indices_kernel<<<blocks_for(n, kCheckThreads), kCheckThreads, 0, stream()>>>(safe, idx, n,
                                                                                     c);
  return cudaGetLastError();
}

namespace {

// SwiGLU on fp32 or bf16 storage (device_util.cuh's to_f32 / from_f32): fp32 math, one rounding
// per bf16 output. Eight elements per thread where n and the buffers allow 16-byte accesses
// (load8/store8): one element per thread ran the routed experts' bf16 SwiGLU at ~1.2 TB/s on the
// H200 (368 us for 75.7M elements). The same expression per element either way (silu_mul).
// d(silu(g) u)/dg and /du times d: the gradients of one element.
__device__ inline void silu_mul_backward(float d, float g, float u, float& dg, float& du) {
  const float s = 1.0f / (1.0f + expf(-g));
  du = d * g * s;
  dg = d * u * s * (1.0f + g * (1.0f - s));
}

// In: gate and up (G); out: h (T).
template <typename T, typename G>
cudaError_t swiglu_forward_as(T* h, const G* gate, const G* up, int64_t n) {
  if (n % 8 == 0 && all_aligned16(h, gate, up))
    return for_each(n / 8, [=] __device__(int64_t i) {
      float g[8], u[8], o[8];
      load8(gate + 8 * i, g);
      load8(up + 8 * i, u);
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = silu_mul(g[j], u[j]);
      store8(h + 8 * i, o);
    });
  return for_each(n, [=] __device__(int64_t i) {
    h[i] = from_f32<T>(silu_mul(to_f32(gate[i]), to_f32(up[i])));
  });
}

// In: gate and up (G), dh (D); out: dgate and dup (O).
template <typename G, typename D, typename O>
cudaError_t swiglu_backward_as(O* dgate, O* dup, const D* dh, const G* gate, const G* up,
                               int64_t n) {
  if (n % 8 == 0 && all_aligned16(dgate, dup, dh, gate, up))
    return for_each(n / 8, [=] __device__(int64_t i) {
      float g[8], u[8], d[8], dg[8], du[8];
      load8(gate + 8 * i, g);
      load8(up + 8 * i, u);
      load8(dh + 8 * i, d);
#pragma unroll
      for (int j = 0; j < 8; ++j) silu_mul_backward(d[j], g[j], u[j], dg[j], du[j]);
      store8(dup + 8 * i, du);
      store8(dgate + 8 * i, dg);
    });
  return for_each(n, [=] __device__(int64_t i) {
    float dg, du;
    silu_mul_backward(to_f32(dh[i]), to_f32(gate[i]), to_f32(up[i]), dg, du);
    dup[i] = from_f32<O>(du);
    dgate[i] = from_f32<O>(dg);
  });
}

template <typename G, typename D>
cudaError_t swiglu_backward_out(void* dgate, void* dup, DType out, const void* dh, const void* gate,
                                const void* up, int64_t n) {
  const D* d = static_cast<const D*>(dh);
  const G *g = static_cast<const G*>(gate), *u = static_cast<const G*>(up);
  if (out == DType::BF16)
    return swiglu_backward_as(static_cast<bf16_t*>(dgate), static_cast<bf16_t*>(dup), d, g, u, n);
  return swiglu_backward_as(static_cast<float*>(dgate), static_cast<float*>(dup), d, g, u, n);
}

template <typename G>
cudaError_t swiglu_backward_dh(void* dgate, void* dup, DType out, const void* dh, DType dh_dtype,
                               const void* gate, const void* up, int64_t n) {
  if (dh_dtype == DType::BF16)
    return swiglu_backward_out<G, bf16_t>(dgate, dup, out, dh, gate, up, n);
  return swiglu_backward_out<G, float>(dgate, dup, out, dh, gate, up, n);
}

// One warp per row (the row's dscale is a sum over its elements: a fixed shuffle tree, so the
// result does not depend on the launch), V elements per lane per step (8: 16-byte accesses where
// the width and the buffers allow). Padding rows of the MoE plan (scale 0, dout 0) give zeros.
template <typename T, int V>
__global__ void swiglu_scaled_backward_kernel(T* dgate, T* dup, float* dscale, const T* dout,
                                              const T* gate, const T* up, const float* scale,
                                              int64_t rows, int64_t dim) {
  const int64_t r = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;  // whole warps leave together
  const float s = scale[r];
  float dot = 0.0f;
  for (int64_t c = r * dim + lane * V; c < (r + 1) * dim; c += 32 * V) {
    float g[V], u[V], d[V], dg[V], du[V];
    if constexpr (V == 8) {
      load8(gate + c, g);
      load8(up + c, u);
      load8(dout + c, d);
    } else {
      g[0] = to_f32(gate[c]), u[0] = to_f32(up[c]), d[0] = to_f32(dout[c]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      dot += d[j] * silu_mul(g[j], u[j]);
      silu_mul_backward(s * d[j], g[j], u[j], dg[j], du[j]);
    }
    if constexpr (V == 8) {
      store8(dgate + c, dg);
      store8(dup + c, du);
    } else {
      dgate[c] = from_f32<T>(dg[0]), dup[c] = from_f32<T>(du[0]);
    }
  }
  dot = warp_reduce(dot, Sum{});
  if (lane == 0) dscale[r] = dot;
}

template <typename T>
cudaError_t swiglu_scaled_backward_as(void* dgate, void* dup, float* dscale, const void* dout,
                                      const void* gate, const void* up, const float* scale,
                                      int64_t rows, int64_t dim) {
  T *dg = static_cast<T*>(dgate), *du = static_cast<T*>(dup);
  const T *d = static_cast<const T*>(dout), *g = static_cast<const T*>(gate),
          *u = static_cast<const T*>(up);
  const unsigned blocks = blocks_for(rows * 32);
  if (dim % 8 == 0 && all_aligned16(dg, du, d, g, u))
    swiglu_scaled_backward_kernel<T, 8>
        <<<blocks, kThreads, 0, stream()>>>(dg, du, dscale, d, g, u, scale, rows, dim);
  else
    swiglu_scaled_backward_kernel<T, 1>
        <<<blocks, kThreads, 0, stream()>>>(dg, du, dscale, d, g, u, scale, rows, dim);
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_scaled_backward(void* dgate, void* dup, float* dscale, const void* dout,
                                   const void* gate, const void* up, const float* scale,
                                   DType dtype, int64_t rows, int64_t dim) {
  if (rows == 0) return cudaSuccess;
  if (dtype == DType::BF16)
    return swiglu_scaled_backward_as<bf16_t>(dgate, dup, dscale, dout, gate, up, scale, rows, dim);
  return swiglu_scaled_backward_as<float>(dgate, dup, dscale, dout, gate, up, scale, rows, dim);
}

cudaError_t swiglu_forward(void* h, DType h_dtype, const void* gate, const void* up, DType in_dtype,
                           int64_t n) {
  if (in_dtype == DType::BF16)
    return swiglu_forward_as(static_cast<bf16_t*>(h), static_cast<const bf16_t*>(gate),
                             static_cast<const bf16_t*>(up), n);
  const auto *g = static_cast<const float*>(gate), *u = static_cast<const float*>(up);
  // F32 in, BF16 out: the F32 variant's value rounded once (the same expression, in fp32).
  if (h_dtype == DType::BF16) return swiglu_forward_as(static_cast<bf16_t*>(h), g, u, n);
  return swiglu_forward_as(static_cast<float*>(h), g, u, n);
}

cudaError_t swiglu_backward(void* dgate, void* dup, DType out_dtype, const void* dh, DType dh_dtype,
                            const void* gate, const void* up, DType in_dtype, int64_t n) {
  if (in_dtype == DType::BF16)
    return swiglu_backward_dh<bf16_t>(dgate, dup, out_dtype, dh, dh_dtype, gate, up, n);
  return swiglu_backward_dh<float>(dgate, dup, out_dtype, dh, dh_dtype, gate, up, n);
}

namespace {

// RoPE as row ops (device_util.cuh's for_each_row; block (0, 0) checks the positions): a row is
// one head of one token, [head_stride] at x + (t * heads + h) * head_stride. A pair is rotated in
// fp32 by the same expressions for any X and O (a BF16 x widened exactly), so a BF16 out holds
// exactly the F32 result rounded (from_f32: nearest even, as round_bf16). In place (out == x, one
// dtype) only the pairs are written; into a separate out every element is, the ones outside
// [offset, offset + 2 half) copied.
template <typename X>
struct RopeArgs {
  const X* x;
  const float *cos, *sin;  // [positions, half]
  const int32_t* positions;
  IndexCheck pc;
  int64_t heads, head_stride, offset, half;
  float sign;  // -1: the inverse rotation
};

// The rotation of the pair (a, b) by (c, s): the expressions of the kernel this replaces, so that
// the results (fused multiply-adds included) stay those bits.
__device__ inline void rotate_pair(float a, float b, float c, float s, float& ra, float& rb) {
  ra = a * c - b * s;
  rb = b * c + a * s;
}

// Units of 8 elements (stride, offset and 2 half multiples of 8; x, out, cos and sin 16-byte
// aligned): each unit lies either inside the rope dims (4 pairs, rotated by cos/sin[pos, j..j+3])
// or outside (copied). In place the units are the rope dims' only.
template <typename O, typename X>
struct RopeRows8 {
  RopeArgs<X> a;
  O* out;
  int64_t first;  // the column of unit 0
  struct Regs {
    float v[8], c[4], s[4];
  };
  __device__ bool rotated(int64_t col) const {
    return col >= a.offset && col < a.offset + 2 * a.half;
  }
  __device__ void load(int64_t t, int h, int u, Regs& r) const {
    const int64_t col = first + 8 * int64_t(u);
    load8(a.x + (t * a.heads + h) * a.head_stride + col, r.v);
    if (!rotated(col)) return;
    const int64_t pos = checked_index(a.pc, a.positions[t]), j = (col - a.offset) / 2;
    const float4 c = *reinterpret_cast<const float4*>(a.cos + pos * a.half + j);
    const float4 s = *reinterpret_cast<const float4*>(a.sin + pos * a.half + j);
    r.c[0] = c.x, r.c[1] = c.y, r.c[2] = c.z, r.c[3] = c.w;
    r.s[0] = a.sign * s.x, r.s[1] = a.sign * s.y, r.s[2] = a.sign * s.z, r.s[3] = a.sign * s.w;
  }
  __device__ void store(int64_t t, int h, int u, const Regs& r) const {
    const int64_t col = first + 8 * int64_t(u);
    O* o = out + (t * a.heads + h) * a.head_stride + col;
    if (!rotated(col)) return store8(o, r.v);
    float v[8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      rotate_pair(r.v[2 * i], r.v[2 * i + 1], r.c[i], r.s[i], v[2 * i], v[2 * i + 1]);
    store8(o, v);
  }
};

// Any layout, units of a pair or one copied element: in place the row's `half` pairs; into a
// separate out the `offset` elements before the pairs, the pairs, then the elements after them
// (head_stride - half units), so every element of out is written in the one pass.
template <typename O, typename X>
struct RopeRows1 {
  RopeArgs<X> a;
  O* out;
  int64_t first;  // the unit of pair 0: 0 in place, offset into a separate out
  struct Regs {
    float x0, x1, c, s;
  };
  // Unit u of a row: the pair j (0 <= j < half), or the copied column col (j = -1).
  __device__ void unit(int u, int64_t& j, int64_t& col) const {
    j = u - first;
    if (j >= 0 && j < a.half) {
      col = a.offset + 2 * j;
    } else {
      col = j < 0 ? u : u + a.half;
      j = -1;
    }
  }
  __device__ void load(int64_t t, int h, int u, Regs& r) const {
    int64_t j, col;
    unit(u, j, col);
    const X* xh = a.x + (t * a.heads + h) * a.head_stride;
    r.x0 = to_f32(xh[col]);
    if (j < 0) return;
    const int64_t pos = checked_index(a.pc, a.positions[t]);
    r.x1 = to_f32(xh[col + 1]);
    r.c = a.cos[pos * a.half + j];
    r.s = a.sign * a.sin[pos * a.half + j];
  }
  __device__ void store(int64_t t, int h, int u, const Regs& r) const {
    int64_t j, col;
    unit(u, j, col);
    O* oh = out + (t * a.heads + h) * a.head_stride;
    if (j < 0) {
      oh[col] = from_f32<O>(r.x0);
      return;
    }
    float ra, rb;
    rotate_pair(r.x0, r.x1, r.c, r.s, ra, rb);
    oh[col] = from_f32<O>(ra);
    oh[col + 1] = from_f32<O>(rb);
  }
};

template <typename O, typename X>
cudaError_t rope_as(O* out, const RopeArgs<X>& a, int64_t tokens) {
  const bool in_place = static_cast<const void*>(out) == static_cast<const void*>(a.x);
  if (a.head_stride % 8 == 0 && a.offset % 8 == 0 && a.half % 4 == 0 &&
      all_aligned16(out, a.x, a.cos, a.sin)) {
    const int64_t units = (in_place ? 2 * a.half : a.head_stride) / 8;
    return for_each_row_checked(tokens, a.heads, units, a.pc, a.positions, tokens,
                                RopeRows8<O, X>{a, out, in_place ? a.offset : 0});
  }
  const int64_t units = in_place ? a.half : a.head_stride - a.half;
  return for_each_row_checked(tokens, a.heads, units, a.pc, a.positions, tokens,
                              RopeRows1<O, X>{a, out, in_place ? 0 : a.offset});
}

}  // namespace

namespace {

template <typename X>
cudaError_t rope_from(void* out, DType out_dtype, const RopeArgs<X>& a, int64_t tokens) {
  if (out_dtype == DType::BF16) return rope_as(static_cast<bf16_t*>(out), a, tokens);
  return rope_as(static_cast<float*>(out), a, tokens);
}

}  // namespace

cudaError_t rope(void* out, DType out_dtype, const void* x, DType x_dtype, int64_t tokens,
                 int64_t heads, int64_t head_stride, int64_t offset, int64_t half, const float* cos,
                 const float* sin, const int32_t* positions, const IndexCheck& positions_check,
                 bool inverse) {
  const float sign = inverse ? -1.0f : 1.0f;
  if (x_dtype == DType::BF16)
    return rope_from(out, out_dtype,
                     RopeArgs<bf16_t>{static_cast<const bf16_t*>(x), cos, sin, positions,
                                      positions_check, heads, head_stride, offset, half, sign},
                     tokens);
  return rope_from(out, out_dtype,
                   RopeArgs<float>{static_cast<const float*>(x), cos, sin, positions,
                                   positions_check, heads, head_stride, offset, half, sign},
                   tokens);
}

namespace {

// Rows of V-element units (V = 8 where n, both leading dimensions and both pointers allow 16-byte
// accesses): the same d + v or v per element as before, without the flat index's divisions
// (13.5 us per call for [8192, 576] -> [8192, 512] on the H200).
template <int V>
struct CopyColumnRows {
  float* dst;
  const float* src;
  int64_t dst_ld, src_ld;
  bool accumulate;
  struct Regs {
    float s[V], d[V];
  };
  __device__ void load(int64_t r, int, int u, Regs& g) const {
    load_n<V>(src + r * src_ld + int64_t(u) * V, g.s);
    if (accumulate) load_n<V>(dst + r * dst_ld + int64_t(u) * V, g.d);
  }
  __device__ void store(int64_t r, int, int u, const Regs& g) const {
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = accumulate ? g.d[i] + g.s[i] : g.s[i];
    store_n<V>(dst + r * dst_ld + int64_t(u) * V, v);
  }
};

}  // namespace

cudaError_t copy_columns(float* dst, int64_t dst_ld, const float* src, int64_t src_ld, int64_t rows,
                         int64_t n, bool accumulate) {
  if (n % 8 == 0 && dst_ld % 4 == 0 && src_ld % 4 == 0 && all_aligned16(dst, src))
    return for_each_row(rows, 1, n / 8, CopyColumnRows<8>{dst, src, dst_ld, src_ld, accumulate});
  return for_each_row(rows, 1, n, CopyColumnRows<1>{dst, src, dst_ld, src_ld, accumulate});
}

namespace {

// The MLA k/v split as one row op over (token, head) rows of V-element units: the k units (dn
// from kv_b, then dr broadcast from k_rope) and then the v units. Each element is read as stored
// (a bf16 kv_b widened exactly) and written by from_f32, as the two passes it replaces did (106
// and 65 us for V2-Lite's [8192, 16, 256] on the H200, both dividing a flat index per element).
// V = 8 needs dn, dr and dv multiples of 8 and the pointers 16-byte aligned.
template <typename K, typename T, int V>
struct SplitKvRows {
  T *k, *v;
  const K* kv_b;
  const float* k_rope;
  int64_t heads, dn, dr, dv;
  struct Regs {
    float x[V];
  };
  __device__ void load(int64_t t, int h, int u, Regs& g) const {
    const int64_t j = int64_t(u) * V, row = t * heads + h, dk = dn + dr;
    if (j < dn)
      load_n<V>(kv_b + row * (dn + dv) + j, g.x);
    else if (j < dk)
      load_n<V>(k_rope + t * dr + (j - dn), g.x);
    else
      load_n<V>(kv_b + row * (dn + dv) + dn + (j - dk), g.x);
  }
  __device__ void store(int64_t t, int h, int u, const Regs& g) const {
    const int64_t j = int64_t(u) * V, row = t * heads + h, dk = dn + dr;
    if (j < dk)
      store_n<V>(k + row * dk + j, g.x);
    else
      store_n<V>(v + row * dv + (j - dk), g.x);
  }
};

template <typename K, typename T>
cudaError_t mla_split_kv_as(T* k, T* v, const K* kv_b, const float* k_rope, int64_t tokens,
                            int64_t heads, int64_t dn, int64_t dr, int64_t dv) {
  const int64_t width = dn + dr + dv;
  if (dn % 8 == 0 && dr % 8 == 0 && dv % 8 == 0 && all_aligned16(k, v, kv_b, k_rope))
    return for_each_row(tokens, heads, width / 8,
                        SplitKvRows<K, T, 8>{k, v, kv_b, k_rope, heads, dn, dr, dv});
  return for_each_row(tokens, heads, width,
                      SplitKvRows<K, T, 1>{k, v, kv_b, k_rope, heads, dn, dr, dv});
}

// dkv_b per (token, head) row: [dk's first dn | dv], V-element units, each element rounded by
// from_f32 as before (132 us per call for V2-Lite at 8192 tokens, dividing a flat index).
template <typename T, int V>
struct SplitKvBackwardRows {
  T* dkv_b;
  const float *dk, *dv;
  int64_t heads, dn, dr, dvd;
  struct Regs {
    float x[V];
  };
  __device__ void load(int64_t t, int h, int u, Regs& g) const {
    const int64_t j = int64_t(u) * V, row = t * heads + h;
    if (j < dn)
      load_n<V>(dk + row * (dn + dr) + j, g.x);
    else
      load_n<V>(dv + row * dvd + (j - dn), g.x);
  }
  __device__ void store(int64_t t, int h, int u, const Regs& g) const {
    store_n<V>(dkv_b + (t * heads + h) * (dn + dvd) + int64_t(u) * V, g.x);
  }
};

// dk_rope per token row: the sum over heads of dk's last dr, in head order from 0.0f (as the CPU
// backend and the kernel before), kHeadBatch heads' loads at a time; one row per thread (the
// loads in flight come from the heads: [8192, 64] is only 8192 x 8 units).
template <int V>
struct KRopeSumRows {
  static constexpr int kRowsPerThread = 1, kHeadBatch = 8;
  float* dk_rope;
  const float* dk;
  int64_t heads, dn, dr;
  struct Regs {
    float s[V];
  };
  __device__ void load(int64_t t, int, int u, Regs& g) const {
    const int64_t dkw = dn + dr;
    const float* p = dk + t * heads * dkw + dn + int64_t(u) * V;
#pragma unroll
    for (int i = 0; i < V; ++i) g.s[i] = 0.0f;
    for (int64_t h0 = 0; h0 < heads; h0 += kHeadBatch) {
      float x[kHeadBatch][V];
#pragma unroll
      for (int b = 0; b < kHeadBatch; ++b)
        if (h0 + b < heads) load_n<V>(p + (h0 + b) * dkw, x[b]);
#pragma unroll
      for (int b = 0; b < kHeadBatch; ++b) {
        if (h0 + b >= heads) break;
#pragma unroll
        for (int i = 0; i < V; ++i) g.s[i] += x[b][i];
      }
    }
  }
  __device__ void store(int64_t t, int, int u, const Regs& g) const {
    float s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) s[i] = g.s[i];
    store_n<V>(dk_rope + t * dr + int64_t(u) * V, s);
  }
};

template <typename T>
cudaError_t mla_split_kv_backward_as(T* dkv_b, float* dk_rope, const float* dk, const float* dv,
                                     int64_t tokens, int64_t heads, int64_t dn, int64_t dr,
                                     int64_t dvd) {
  const bool vec =
      dn % 8 == 0 && dr % 8 == 0 && dvd % 8 == 0 && all_aligned16(dkv_b, dk_rope, dk, dv);
  cudaError_t e = vec ? for_each_row(tokens, heads, (dn + dvd) / 8,
                                     SplitKvBackwardRows<T, 8>{dkv_b, dk, dv, heads, dn, dr, dvd})
                      : for_each_row(tokens, heads, dn + dvd,
                                     SplitKvBackwardRows<T, 1>{dkv_b, dk, dv, heads, dn, dr, dvd});
  if (e != cudaSuccess) return e;
  return vec ? for_each_row(tokens, 1, dr / 8, KRopeSumRows<8>{dk_rope, dk, heads, dn, dr})
             : for_each_row(tokens, 1, dr, KRopeSumRows<1>{dk_rope, dk, heads, dn, dr});
}

template <typename K>
cudaError_t mla_split_kv_from(void* k, void* v, DType dtype, const K* kv_b, const float* k_rope,
                              int64_t tokens, int64_t heads, int64_t dn, int64_t dr, int64_t dv) {
  if (dtype == DType::BF16)
    return mla_split_kv_as(static_cast<bf16_t*>(k), static_cast<bf16_t*>(v), kv_b, k_rope, tokens,
                           heads, dn, dr, dv);
  return mla_split_kv_as(static_cast<float*>(k), static_cast<float*>(v), kv_b, k_rope, tokens,
                         heads, dn, dr, dv);
}

}  // namespace

cudaError_t mla_split_kv(void* k, void* v, DType dtype, const void* kv_b, DType kv_b_dtype,
                         const float* k_rope, int64_t tokens, int64_t heads, int64_t dn, int64_t dr,
                         int64_t dv) {
  if (kv_b_dtype == DType::BF16)
    return mla_split_kv_from(k, v, dtype, static_cast<const bf16_t*>(kv_b), k_rope, tokens, heads,
                             dn, dr, dv);
  return mla_split_kv_from(k, v, dtype, static_cast<const float*>(kv_b), k_rope, tokens, heads, dn,
                           dr, dv);
}

namespace {

// mla_broadcast_k_rope as a row op over (token, head) rows of V-element units of the dr columns.
template <typename T, int V>
struct BroadcastKRopeRows {
  T* k;
  const float* k_rope;
  int64_t heads, dn, dr;
  struct Regs {
    float x[V];
  };
  __device__ void load(int64_t t, int, int u, Regs& g) const {
    load_n<V>(k_rope + t * dr + int64_t(u) * V, g.x);
  }
  __device__ void store(int64_t t, int h, int u, const Regs& g) const {
    store_n<V>(k + (t * heads + h) * (dn + dr) + dn + int64_t(u) * V, g.x);
  }
};

template <typename T>
cudaError_t broadcast_k_rope_as(T* k, const float* k_rope, int64_t tokens, int64_t heads,
                                int64_t dn, int64_t dr) {
  if (dn % 8 == 0 && dr % 8 == 0 && all_aligned16(k, k_rope))
    return for_each_row(tokens, heads, dr / 8, BroadcastKRopeRows<T, 8>{k, k_rope, heads, dn, dr});
  return for_each_row(tokens, heads, dr, BroadcastKRopeRows<T, 1>{k, k_rope, heads, dn, dr});
}

}  // namespace

cudaError_t mla_broadcast_k_rope(void* k, DType dtype, const float* k_rope, int64_t tokens,
                                 int64_t heads, int64_t dn, int64_t dr) {
  if (dtype == DType::BF16)
    return broadcast_k_rope_as(static_cast<bf16_t*>(k), k_rope, tokens, heads, dn, dr);
  return broadcast_k_rope_as(static_cast<float*>(k), k_rope, tokens, heads, dn, dr);
}

cudaError_t mla_split_kv_backward(void* dkv_b, DType dtype, float* dk_rope, const float* dk,
                                  const float* dv, int64_t tokens, int64_t heads, int64_t dn,
                                  int64_t dr, int64_t dvd) {
  if (dtype == DType::BF16)
    return mla_split_kv_backward_as(static_cast<bf16_t*>(dkv_b), dk_rope, dk, dv, tokens, heads, dn,
                                    dr, dvd);
  return mla_split_kv_backward_as(static_cast<float*>(dkv_b), dk_rope, dk, dv, tokens, heads, dn,
                                  dr, dvd);
}

namespace {

// The lookup per token row over a table of T (float or bf16_t, widened exactly by to_f32), V
// elements per unit (8 where dim and the pointers allow 16-byte accesses): the flat index's
// divisions cost 82 us per call at 8192 tokens x 2048 on the H200.
template <typename T, int V>
struct EmbeddingRows {
  float* out;
  const T* table;
  const int32_t* ids;
  IndexCheck ic;
  int64_t dim;
  struct Regs {
    float x[V];
  };
  __device__ void load(int64_t t, int, int u, Regs& g) const {
    load_n<V>(table + int64_t(checked_index(ic, ids[t])) * dim + int64_t(u) * V, g.x);
  }
  __device__ void store(int64_t t, int, int u, const Regs& g) const {
    store_n<V>(out + t * dim + int64_t(u) * V, g.x);
  }
};

template <typename T>
cudaError_t embedding_lookup(float* out, const T* table, const int32_t* ids, const IndexCheck& ic,
                             int64_t tokens, int64_t dim) {
  if (dim % 8 == 0 && all_aligned16(out, table))
    return for_each_row_checked(tokens, 1, dim / 8, ic, ids, tokens,
                                EmbeddingRows<T, 8>{out, table, ids, ic, dim});
  return for_each_row_checked(tokens, 1, dim, ic, ids, tokens,
                              EmbeddingRows<T, 1>{out, table, ids, ic, dim});
}

}  // namespace

cudaError_t embedding_forward(float* out, const void* table, bool table_bf16, const int32_t* ids,
                              const IndexCheck& ids_check, int64_t tokens, int64_t dim) {
  if (table_bf16)
    return embedding_lookup(out, static_cast<const __nv_bfloat16*>(table), ids, ids_check, tokens,
                            dim);
  return embedding_lookup(out, static_cast<const float*>(table), ids, ids_check, tokens, dim);
}

cudaError_t set_rows(float* dst, const float* src, const int32_t* rows,
                     const IndexCheck& rows_check, int64_t n, int64_t dim) {
  const IndexCheck rc = rows_check;
  return for_each_checked(n * dim, rc, rows, n, [=] __device__(int64_t e) {
    const int64_t i = e / dim;
    dst[int64_t(checked_index(rc, rows[i])) * dim + e % dim] = src[e];
  });
}

}  // namespace moekit::cuda
