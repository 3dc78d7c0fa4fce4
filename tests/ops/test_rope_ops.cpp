// RoPE's op contract on the CPU backend (the reference for the GPU's): rotating into a separate
// output gives, to the bit, the in-place rotation (F32 out) and the in-place rotation followed by
// round_bf16 (BF16 out), which is what MLA relied on before it let the rotation round q and dq
// itself (nn/mla.cpp); x is left as it was; the elements outside the rope dims are copied
// (rounded). Head layouts: q's (nope dims, then the rope pairs), an odd one with elements on both
// sides of the pairs, and k_rope's (one head of pairs only). Bad outputs are refused with one-line
// errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

#include "../tensor_testing.h"
#include "core/dtype.h"
#include "expect_error.h"
#include "nn/rope.h"
#include "ops/ops.h"

namespace moekit {
namespace {

using test::bit_equal;
using test::randn;

using test::expect_error_containing;

// The model's own table (theta 10000, no scaling), [max_pos, rope_dim / 2] on the CPU.
RopeTable rope_table(int64_t max_pos, int64_t rope_dim) {
  ModelConfig c;
  c.qk_rope_head_dim = rope_dim;
  return RopeTable::build(c, max_pos, Device::CPU);
}

struct Layout {
  int64_t heads, stride, offset, rope_dim;
};

TEST(CpuRope, SeparateOutputEqualsInPlaceThenRounding) {
  Backend& be = backend(Device::CPU);
  EXPECT_TRUE(be.supports(Op::Rope, DType::BF16));
  std::mt19937_64 rng(41);
  const int64_t T = 23, max_pos = 40;
  for (const Layout& l : {Layout{3, 24, 16, 8}, Layout{2, 37, 5, 12}, Layout{1, 8, 0, 8}}) {
    const RopeTable tab = rope_table(max_pos, l.rope_dim);
    Tensor pos = Tensor::empty({T}, DType::I32);
    std::uniform_int_distribution<int32_t> u(0, int32_t(max_pos - 1));
    for (int64_t i = 0; i < T; ++i) pos.i32()[i] = u(rng);
    for (bool inverse : {false, true}) {
      SCOPED_TRACE(testing::Message()
                   << "heads " << l.heads << " stride " << l.stride << " offset " << l.offset
                   << " rope_dim " << l.rope_dim << " inverse " << inverse);
      const Tensor x = randn({T, l.heads * l.stride}, rng, 3.0f);
      const Tensor x_before = x.clone();
      auto rope = [&](Tensor& out, const Tensor& in) {
        be.rope(out, in, l.heads, l.stride, l.offset, l.rope_dim, tab.cos, tab.sin, pos, inverse);
      };
      Tensor in_place = x.clone();
      rope(in_place, in_place);
      Tensor rounded = Tensor::empty(x.shape(), DType::BF16);
      be.round_bf16(rounded, in_place);

      Tensor f32 = Tensor::empty(x.shape()), bf16 = Tensor::empty(x.shape(), DType::BF16);
      f32.fill(std::nanf(""));
      rope(f32, x);
      rope(bf16, x);
      EXPECT_TRUE(bit_equal(f32, in_place)) << "F32 out vs in place";
      EXPECT_TRUE(bit_equal(bf16, rounded)) << "BF16 out vs in place + round_bf16";
      EXPECT_TRUE(bit_equal(x, x_before)) << "x changed";
      // Not vacuous: the pairs moved, the rest is x (rounded), element by element.
      int64_t moved = 0, bad_copies = 0;
      const auto* b16 = static_cast<const uint16_t*>(bf16.raw());
      for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % l.stride;
        if (c >= l.offset && c < l.offset + l.rope_dim)
          moved += in_place.f32()[i] != x.f32()[i];
        else
          bad_copies += in_place.f32()[i] != x.f32()[i] || b16[i] != f32_to_bf16(x.f32()[i]);
      }
      EXPECT_GT(moved, x.numel() / l.stride * l.rope_dim / 2);
      EXPECT_EQ(bad_copies, 0);
    }
  }
}

// A BF16 x (q as its bf16 GEMM writes it, rotated in place by MLA under the bf16 attention): the
// rotation reads the values widened exactly, so in place it equals the F32 rotation of the
// widened x rounded (the pairs; the other elements keep their bits), and into a separate BF16 out
// the same. Not vacuous: the pairs move.
TEST(CpuRope, Bf16InputInPlaceEqualsWidenedThenRounded) {
  Backend& be = backend(Device::CPU);
  std::mt19937_64 rng(43);
  const int64_t T = 19, max_pos = 32;
  for (const Layout& l : {Layout{3, 24, 16, 8}, Layout{2, 37, 5, 12}}) {
    const RopeTable tab = rope_table(max_pos, l.rope_dim);
    Tensor pos = Tensor::empty({T}, DType::I32);
    std::uniform_int_distribution<int32_t> u(0, int32_t(max_pos - 1));
    for (int64_t i = 0; i < T; ++i) pos.i32()[i] = u(rng);
    const Tensor x = randn({T, l.heads * l.stride}, rng, 3.0f);
    Tensor x16 = Tensor::empty(x.shape(), DType::BF16), widened = Tensor::empty(x.shape());
    be.round_bf16(x16, x);
    const auto* bits = static_cast<const uint16_t*>(x16.raw());
    for (int64_t i = 0; i < x.numel(); ++i) widened.f32()[i] = bf16_to_f32(bits[i]);
    Tensor ref = Tensor::empty(x.shape(), DType::BF16);
    be.rope(ref, widened, l.heads, l.stride, l.offset, l.rope_dim, tab.cos, tab.sin, pos, false);
    Tensor in_place = x16.clone(), out = Tensor::empty(x.shape(), DType::BF16);
    be.rope(in_place, in_place, l.heads, l.stride, l.offset, l.rope_dim, tab.cos, tab.sin, pos,
            false);
    be.rope(out, x16, l.heads, l.stride, l.offset, l.rope_dim, tab.cos, tab.sin, pos, false);
    EXPECT_TRUE(bit_equal(in_place, ref)) << "in place vs the widened x's rotation, rounded";
    EXPECT_TRUE(bit_equal(out, ref)) << "separate BF16 out";
    EXPECT_FALSE(bit_equal(in_place, x16)) << "nothing rotated";
  }
}

// Output checks alike on every backend (ops.h, rope_in_place): out's size, and an out that is x's
// memory under another dtype (the in-place rotation writes only the pairs, so it must be x).
TEST(CpuRope, RefusesBadOutputs) {
  Backend& be = backend(Device::CPU);
  std::mt19937_64 rng(42);
  const RopeTable tab = rope_table(8, 4);
  Tensor pos = Tensor::zeros({3}, DType::I32);
  Tensor x = randn({3, 2 * 6}, rng);
  Tensor small = Tensor::empty({3, 11}, DType::BF16);
  expect_error_containing([&] { be.rope(small, x, 2, 6, 2, 4, tab.cos, tab.sin, pos, false); },
                          "rope: x [3, 12]");
  Tensor alias = Tensor::view_of(x.raw(), x.shape(), DType::BF16, nullptr);
  expect_error_containing([&] { be.rope(alias, x, 2, 6, 2, 4, tab.cos, tab.sin, pos, false); },
                          "rope: out is x's memory as BF16");
  Tensor i32 = Tensor::empty(x.shape(), DType::I32);
  expect_error_containing([&] { be.rope(i32, x, 2, 6, 2, 4, tab.cos, tab.sin, pos, false); },
                          "CPU rope: I32 operand");
  expect_error_containing([&] { be.rope(x, x, 2, 6, 3, 4, tab.cos, tab.sin, pos, false); },
                          "rope: offset 3 + rope_dim 4 vs head_stride 6");
}

}  // namespace
}  // namespace moekit
