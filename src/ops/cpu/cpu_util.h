// Small helpers shared by the CPU kernels: any tensor seen as 2-D [rows, last dim]; the fp32-only
// dtype check; the range check of an index tensor; F32 or BF16 stores; RoPE's rotation of one
// row's pairs.
#pragma once

#include <initializer_list>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"

namespace moekit {

inline int64_t cols(const Tensor& t) {
  return t.ndim() == 0 ? 1 : t.dim(-1);
}
inline int64_t rows(const Tensor& t) {
  int64_t c = cols(t);
  return c == 0 ? 0 : t.numel() / c;
}

// The CPU backend computes on F32 tensors only (Backend::supports says no to anything else): a
// one-line error naming the op for an operand of another dtype (the bf16 activation variants of
// the MoE ops exist on CUDA only). Null and undefined tensors are skipped.
inline void expect_f32_on_cpu(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t && t->defined() && t->dtype() != DType::F32)
      fail(
          "CPU {}: {} operand (the CPU backend computes in fp32 only; bf16 activations need the "
          "CUDA backend)",
          op, dtype_name(t->dtype()));
}

// Every entry of the I32 index tensor idx in [0, limit) (or negative, "no row", where allowed),
// checked before the op writes anything: "OP: WHAT V at position I out of range [0, LIMIT)" for
// the first bad one.
inline void expect_indices(const Tensor& idx, int64_t limit, const char* op, const char* what,
                           bool allow_negative = false) {
  const int32_t* v = idx.i32();
  for (int64_t i = 0; i < idx.numel(); ++i)
    MOEKIT_CHECK((allow_negative && v[i] < 0) || (v[i] >= 0 && v[i] < limit),
                 "{}: {} {} at position {} out of range [0, {})", op, what, v[i], i, limit);
}

// An fp32 result stored as an F32 element, or as a BF16 one (the bits of the nearest bf16, ties
// to even, as round_bf16 stores): the ops with a BF16 output variant write through these, so that
// variant holds exactly the F32 one rounded.
inline void store_elem(float* p, float v) {
  *p = v;
}
inline void store_elem(uint16_t* p, float v) {
  *p = f32_to_bf16(v);
}

// out[2j], out[2j+1] = the pair (in[2j], in[2j+1]) rotated by the angle whose cosines and sines
// are cos_row[j], sign * sin_row[j] (Backend::rope's interleaved convention; sign -1 undoes it),
// stored as O (float, or uint16_t bf16 bits: the fp32 result rounded). A float out may be in.
template <typename O>
void rotate_pairs(O* out, const float* in, int64_t half, const float* cos_row, const float* sin_row,
                  float sign = 1.0f) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = in[2 * j], b = in[2 * j + 1], c = cos_row[j], s = sign * sin_row[j];
    store_elem(out + 2 * j, a * c - b * s);
    store_elem(out + 2 * j + 1, b * c + a * s);
  }
}

}  // namespace moekit
