// CUDA kernels, part 1: fills, axpy/scale, index checks, SwiGLU, RoPE, embedding lookup, the
// cache's row write (set_rows), column copies and the MLA k/v split. Each is one pass over memory
// written as a lambda over the output elements (device_util.cuh's for_each; for_each_checked of
// index_check.cuh where the op reads an index tensor, which it checks itself): moekit's layouts
// ([T, heads, stride] views, interleaved rope pairs, per-head [k_nope | v] blocks) match no
// library routine, and one fused pass is the fastest way to do a memory-bound op.
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

__global__ void check_indices_kernel(int32_t* safe, const int32_t* idx, int64_t n, IndexCheck c) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) safe[i] = checked_index(c, idx[i]);
  record_first_bad_index(c, idx, n);
}

}  // namespace

cudaError_t check_indices(int32_t* safe, const int32_t* idx, int64_t n, const IndexCheck& c) {
  if (n <= 0) return cudaSuccess;
  check_indices_kernel<<<1, 1024, 0, stream()>>>(safe, idx, n, c);
  return cudaGetLastError();
}

namespace {

// SwiGLU on fp32 or bf16 storage (device_util.cuh's to_f32 / from_f32): fp32 math, one rounding
// per bf16 output. Eight elements per thread where n and the buffers allow 16-byte accesses
// (load8/store8): one element per thread ran the routed experts' bf16 SwiGLU at ~1.2 TB/s on the
// H200 (368 us for 75.7M elements). The same expression per element either way.
__device__ inline float silu_mul(float g, float u) {
  return g / (1.0f + expf(-g)) * u;
}
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

// One thread per unit of a head. In place a head's units are its rope pairs (half of them); into a
// separate out they are the `offset` elements before the pairs, the pairs, then the elements after
// them (head_stride - half units), so every element of out is written in the one pass. A pair is
// rotated in fp32 by the same expression for either O, so a BF16 out holds exactly the F32 result
// rounded (from_f32: nearest even, as round_bf16).
template <typename O>
cudaError_t rope_as(O* out, const float* x, int64_t tokens, int64_t heads, int64_t head_stride,
                    int64_t offset, int64_t half, const float* cos, const float* sin,
                    const int32_t* positions, const IndexCheck& positions_check, bool inverse) {
  const float sign = inverse ? -1.0f : 1.0f;
  const IndexCheck pc = positions_check;
  const bool in_place = static_cast<const void*>(out) == static_cast<const void*>(x);
  const int64_t units = in_place ? half : head_stride - half, first = in_place ? 0 : offset;
  return for_each_checked(tokens * heads * units, pc, positions, tokens, [=] __device__(int64_t e) {
    const int64_t u = e % units, th = e / units, j = u - first;
    const float* xh = x + th * head_stride;
    O* oh = out + th * head_stride;
    if (j < 0 || j >= half) {  // outside the rope dims: copied
      const int64_t col = j < 0 ? u : u + half;
      oh[col] = from_f32<O>(xh[col]);
      return;
    }
    const int64_t pos = checked_index(pc, positions[th / heads]);
    const int64_t p = offset + 2 * j;
    const float a = xh[p], b = xh[p + 1], c = cos[pos * half + j], s = sign * sin[pos * half + j];
    oh[p] = from_f32<O>(a * c - b * s);
    oh[p + 1] = from_f32<O>(b * c + a * s);
  });
}

}  // namespace

cudaError_t rope(void* out, DType out_dtype, const float* x, int64_t tokens, int64_t heads,
                 int64_t head_stride, int64_t offset, int64_t half, const float* cos,
                 const float* sin, const int32_t* positions, const IndexCheck& positions_check,
                 bool inverse) {
  if (out_dtype == DType::BF16)
    return rope_as(static_cast<bf16_t*>(out), x, tokens, heads, head_stride, offset, half, cos, sin,
                   positions, positions_check, inverse);
  return rope_as(static_cast<float*>(out), x, tokens, heads, head_stride, offset, half, cos, sin,
                 positions, positions_check, inverse);
}

cudaError_t copy_columns(float* dst, int64_t dst_ld, const float* src, int64_t src_ld, int64_t rows,
                         int64_t n, bool accumulate) {
  return for_each(rows * n, [=] __device__(int64_t e) {
    const int64_t r = e / n, c = e % n;
    const float v = src[r * src_ld + c];
    float& d = dst[r * dst_ld + c];
    d = accumulate ? d + v : v;
  });
}

namespace {

template <typename T>
cudaError_t mla_split_kv_as(T* k, T* v, const float* kv_b, const float* k_rope, int64_t tokens,
                            int64_t heads, int64_t dn, int64_t dr, int64_t dv) {
  const int64_t dk = dn + dr;
  cudaError_t e = for_each(tokens * heads * dk, [=] __device__(int64_t i) {
    const int64_t j = i % dk, th = i / dk;
    k[i] = from_f32<T>(j < dn ? kv_b[th * (dn + dv) + j] : k_rope[(th / heads) * dr + (j - dn)]);
  });
  if (e != cudaSuccess) return e;
  return for_each(tokens * heads * dv, [=] __device__(int64_t i) {
    const int64_t j = i % dv, th = i / dv;
    v[i] = from_f32<T>(kv_b[th * (dn + dv) + dn + j]);
  });
}

template <typename T>
cudaError_t mla_split_kv_backward_as(T* dkv_b, float* dk_rope, const float* dk, const float* dv,
                                     int64_t tokens, int64_t heads, int64_t dn, int64_t dr,
                                     int64_t dvd) {
  const int64_t w = dn + dvd, dkw = dn + dr;
  cudaError_t e = for_each(tokens * heads * w, [=] __device__(int64_t i) {
    const int64_t j = i % w, th = i / w;
    dkv_b[i] = from_f32<T>(j < dn ? dk[th * dkw + j] : dv[th * dvd + (j - dn)]);
  });
  if (e != cudaSuccess) return e;
  // The shared rope key gets the sum over heads, in head order (as the CPU backend).
  return for_each(tokens * dr, [=] __device__(int64_t i) {
    const int64_t t = i / dr, j = i % dr;
    float s = 0.0f;
    for (int64_t h = 0; h < heads; ++h) s += dk[(t * heads + h) * dkw + dn + j];
    dk_rope[i] = s;
  });
}

}  // namespace

cudaError_t mla_split_kv(void* k, void* v, DType dtype, const float* kv_b, const float* k_rope,
                         int64_t tokens, int64_t heads, int64_t dn, int64_t dr, int64_t dv) {
  if (dtype == DType::BF16)
    return mla_split_kv_as(static_cast<bf16_t*>(k), static_cast<bf16_t*>(v), kv_b, k_rope, tokens,
                           heads, dn, dr, dv);
  return mla_split_kv_as(static_cast<float*>(k), static_cast<float*>(v), kv_b, k_rope, tokens,
                         heads, dn, dr, dv);
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

__device__ inline float widen(float v) {
  return v;
}
__device__ inline float widen(__nv_bfloat16 v) {
  return __bfloat162float(v);  // exact: a bf16 is the upper half of an fp32
}

// The lookup over a table of T (float or __nv_bfloat16), widened to fp32.
template <typename T>
cudaError_t embedding_lookup(float* out, const T* table, const int32_t* ids, const IndexCheck& ic,
                             int64_t tokens, int64_t dim) {
  return for_each_checked(tokens * dim, ic, ids, tokens, [=] __device__(int64_t e) {
    const int64_t t = e / dim, c = e % dim;
    out[e] = widen(table[int64_t(checked_index(ic, ids[t])) * dim + c]);
  });
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
