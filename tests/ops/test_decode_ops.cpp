// The CPU backend's decode ops against scalar references written here: the strided batched GEMM
// (MLA's per-head products over head blocks of wider tensors), the causal row softmax, the cache
// write at given rows (set_rows), the latent attention at device-side positions and the fused ops
// of MLA's decode step (cache write, query absorption, value heads). The CPU backend is the
// oracle of the CUDA tests, so it is checked against plain loops first.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../tensor_testing.h"
#include "core/error.h"
#include "expect_error.h"
#include "ops/ops.h"

namespace moekit {
namespace {

using test::randn;

// C_g[i, j] = alpha * sum_k A_g[i, k] B_g[k, j] + beta * C_g[i, j], blocks as GemmBatch says.
void reference_batched(Tensor& c, const Tensor& a, const Tensor& b, bool ta, bool tb, float alpha,
                       float beta, const GemmBatch& g) {
  for (int64_t p = 0; p < g.count; ++p)
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < g.k; ++k) {
          const float x = a.f32()[p * g.stride_a + (ta ? k * g.lda + i : i * g.lda + k)];
          const float y = b.f32()[p * g.stride_b + (tb ? j * g.ldb + k : k * g.ldb + j)];
          s += double(x) * double(y);
        }
        float& out = c.f32()[p * g.stride_c + i * g.ldc + j];
        out = float(alpha * s + (beta == 0.0f ? 0.0 : double(beta) * out));
      }
}

TEST(DecodeOps, MatmulBatchedMatchesLoops) {
  std::mt19937_64 rng(3);
  Backend& cpu = backend(Device::CPU);
  // MLA's shapes: q [n, H, dn + dr] @ per-head [dn, r] blocks of W_kv_b -> [n, H, r], then the
  // value side with W_vb transposed. Odd sizes; every transpose combination.
  const int64_t n = 3, H = 4, dn = 5, dr = 2, dv = 6, r = 7;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(testing::Message() << "trans_a " << ta << " trans_b " << tb);
      GemmBatch g;
      g.count = H;
      g.m = n;
      g.n = r;
      g.k = dn;
      g.lda = ta ? H * n : H * (dn + dr);  // A stored [k, m] when transposed
      g.ldb = tb ? dn + dv : r;            // B stored [n, k] when transposed
      g.ldc = H * r;
      g.stride_a = ta ? n : dn + dr;
      g.stride_b = tb ? r * (dn + dv) : (dn + dv) * r;
      g.stride_c = r;
      Tensor a = randn({ta ? dn : n, ta ? H * n : H * (dn + dr)}, rng);
      Tensor b = randn({H * (tb ? r : dn + dv), tb ? dn + dv : r}, rng);
      Tensor c = randn({n, H * r}, rng), ref = c.clone();
      cpu.matmul_batched(c, a, b, ta, tb, 0.5f, 0.25f, g);
      reference_batched(ref, a, b, ta, tb, 0.5f, 0.25f, g);
      for (int64_t i = 0; i < c.numel(); ++i) EXPECT_NEAR(c.f32()[i], ref.f32()[i], 1e-5) << i;
    }
}

TEST(DecodeOps, MatmulBatchedRejectsBlocksOutsideTheTensor) {
  std::mt19937_64 rng(4);
  Tensor a = randn({2, 8}, rng), b = randn({4, 4}, rng), c = randn({2, 8}, rng);
  GemmBatch g;
  g.count = 2;
  g.m = 2;
  g.n = 4;
  g.k = 4;
  g.lda = 8;
  g.ldb = 4;
  g.ldc = 8;
  g.stride_a = 4;
  g.stride_b = 0;
  g.stride_c = 4;
  backend(Device::CPU).matmul_batched(c, a, b, false, false, 1.0f, 0.0f, g);  // fits exactly
  g.stride_c = 5;
  EXPECT_THROW(backend(Device::CPU).matmul_batched(c, a, b, false, false, 1.0f, 0.0f, g), Error);
}

TEST(DecodeOps, CausalSoftmaxRowLimits) {
  std::mt19937_64 rng(5);
  const int64_t tokens = 3, heads = 4, cached = 5, L = cached + tokens;
  Tensor x = randn({tokens * heads, L}, rng), ref = x.clone();
  backend(Device::CPU).causal_softmax(x, heads, cached + 1);
  for (int64_t row = 0; row < tokens * heads; ++row) {
    const int64_t visible = cached + 1 + row / heads;  // token i sees cache and itself
    const float* in = ref.f32() + row * L;
    double m = -INFINITY, z = 0.0;
    for (int64_t j = 0; j < visible; ++j) m = std::max(m, double(in[j]));
    for (int64_t j = 0; j < visible; ++j) z += std::exp(double(in[j]) - m);
    for (int64_t j = 0; j < L; ++j) {
      const double want = j < visible ? std::exp(double(in[j]) - m) / z : 0.0;
      EXPECT_NEAR(x.f32()[row * L + j], want, 1e-6) << "row " << row << " col " << j;
    }
  }
  // A limit past the row clamps to the row (every entry visible).
  Tensor y = randn({2, 3}, rng);
  backend(Device::CPU).causal_softmax(y, 1, 10);
  for (int64_t row = 0; row < 2; ++row) {
    double s = 0.0;
    for (int64_t j = 0; j < 3; ++j) s += y.f32()[row * 3 + j];
    EXPECT_NEAR(s, 1.0, 1e-6);
  }
}

TEST(DecodeOps, ArgmaxTakesTheFirstMaximumOfThePrefix) {
  Tensor x = Tensor::empty({3, 5});
  const float v[] = {1,  3,  3,     0, 2,   //
                     -5, -4, -4.5f, 9, -1,  //
                     0,  0,  0,     0, 0};
  std::copy(v, v + 15, x.f32());
  Tensor idx = Tensor::empty({3}, DType::I32);
  backend(Device::CPU).argmax(idx, x, 5);
  EXPECT_EQ(idx.i32()[0], 1);  // ties: the first
  EXPECT_EQ(idx.i32()[1], 3);
  EXPECT_EQ(idx.i32()[2], 0);
  backend(Device::CPU).argmax(idx, x, 3);  // only the first 3 columns count
  EXPECT_EQ(idx.i32()[1], 1);
}

TEST(DecodeOps, SetRowsWritesOnlyTheGivenRows) {
  std::mt19937_64 rng(6);
  const int64_t R = 9, D = 5;
  Tensor dst = randn({R, D}, rng), src = randn({3, D}, rng), ref = dst.clone();
  Tensor rows = Tensor::empty({3}, DType::I32);
  const int32_t r[] = {4, 0, 8};  // the first and the last row, out of order
  std::copy(r, r + 3, rows.i32());
  backend(Device::CPU).set_rows(dst, src, rows);
  for (int64_t i = 0; i < 3; ++i)
    std::copy(src.f32() + i * D, src.f32() + (i + 1) * D, ref.f32() + r[i] * D);
  for (int64_t i = 0; i < dst.numel(); ++i) EXPECT_EQ(dst.f32()[i], ref.f32()[i]) << i;
}

TEST(DecodeOps, SetRowsRejectsBadRowsAndShapes) {
  std::mt19937_64 rng(7);
  Tensor dst = randn({9, 5}, rng), src = randn({2, 5}, rng), before = dst.clone();
  Tensor rows = Tensor::empty({2}, DType::I32);
  Backend& cpu = backend(Device::CPU);
  for (int32_t bad : {9, -1}) {
    rows.i32()[0] = 3;
    rows.i32()[1] = bad;
    try {
      cpu.set_rows(dst, src, rows);
      ADD_FAILURE() << "no error for row " << bad;
    } catch (const Error& e) {
      const std::string want =
          "set_rows: row " + std::to_string(bad) + " at position 1 out of " + "range [0, 9)";
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
    // Checked before anything is written: the good row 3 is untouched too.
    for (int64_t i = 0; i < dst.numel(); ++i) EXPECT_EQ(dst.f32()[i], before.f32()[i]) << i;
  }
  rows.i32()[1] = 2;
  Tensor narrow = randn({2, 4}, rng), three = randn({3, 5}, rng);
  EXPECT_THROW(cpu.set_rows(dst, narrow, rows), Error);             // row width differs
  EXPECT_THROW(cpu.set_rows(dst, three, rows), Error);              // 3 sources, 2 rows
  EXPECT_THROW(cpu.set_rows(dst, src, Tensor::zeros({2})), Error);  // F32 rows
}

// ctx[i*H+h] = sum_j softmax_j(scale * (q_lat . kv_latent[j] + q_rope . k_rope[j])) kv_latent[j]
// over j <= positions[i], in double.
Tensor reference_latent_attention(const Tensor& q_lat, const Tensor& q_rope,
                                  const Tensor& kv_latent, const Tensor& k_rope,
                                  const Tensor& positions, int64_t H, float scale) {
  const int64_t n = positions.numel(), r = kv_latent.dim(1), dr = k_rope.dim(1);
  Tensor ctx = Tensor::empty({n * H, r});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t row = i * H + h, seen = positions.i32()[i] + 1;
      std::vector<double> s(size_t(seen), 0.0);
      double m = -INFINITY;
      for (int64_t j = 0; j < seen; ++j) {
        double d = 0.0;
        for (int64_t c = 0; c < r; ++c)
          d += double(q_lat.f32()[row * r + c]) * kv_latent.f32()[j * r + c];
        for (int64_t c = 0; c < dr; ++c)
          d += double(q_rope.f32()[row * dr + c]) * k_rope.f32()[j * dr + c];
        s[size_t(j)] = double(scale) * d;
        m = std::max(m, s[size_t(j)]);
      }
      double z = 0.0;
      for (double& v : s) z += (v = std::exp(v - m));
      for (int64_t c = 0; c < r; ++c) {
        double acc = 0.0;
        for (int64_t j = 0; j < seen; ++j) acc += s[size_t(j)] * kv_latent.f32()[j * r + c];
        ctx.f32()[row * r + c] = float(acc / z);
      }
    }
  return ctx;
}

TEST(DecodeOps, LatentAttentionMatchesReference) {
  std::mt19937_64 rng(8);
  const int64_t H = 4, r = 24, dr = 8, cap = 11;
  const float scale = 0.3f;  // scores of a few units: a peaked but not one-hot softmax
  Tensor kv = randn({cap, r}, rng), kr = randn({cap, dr}, rng);
  // One token at the first row, one at the last, and several tokens at different positions
  // (a step of n > 1: each sees its own prefix).
  for (const std::vector<int32_t>& pos :
       {std::vector<int32_t>{0}, {int32_t(cap - 1)}, {5, 0, int32_t(cap - 1), 6}}) {
    const int64_t n = int64_t(pos.size());
    SCOPED_TRACE(testing::Message() << n << " tokens, first at " << pos[0]);
    Tensor positions = Tensor::empty({n}, DType::I32);
    std::copy(pos.begin(), pos.end(), positions.i32());
    Tensor q_lat = randn({n * H, r}, rng), q_rope = randn({n * H, dr}, rng);
    Tensor ctx = Tensor::empty({n * H, r});
    backend(Device::CPU).latent_attention(ctx, q_lat, q_rope, kv, kr, positions, H, scale);
    const Tensor ref = reference_latent_attention(q_lat, q_rope, kv, kr, positions, H, scale);
    for (int64_t i = 0; i < ctx.numel(); ++i) EXPECT_NEAR(ctx.f32()[i], ref.f32()[i], 1e-5) << i;
  }
}

TEST(DecodeOps, LatentAttentionRejectsBadShapesAndPositions) {
  std::mt19937_64 rng(9);
  const int64_t n = 2, H = 3, r = 8, dr = 4, cap = 6;
  Tensor kv = randn({cap, r}, rng), kr = randn({cap, dr}, rng);
  Tensor q_lat = randn({n * H, r}, rng), q_rope = randn({n * H, dr}, rng);
  Tensor ctx = Tensor::empty({n * H, r}), pos = Tensor::zeros({n}, DType::I32);
  Backend& cpu = backend(Device::CPU);
  cpu.latent_attention(ctx, q_lat, q_rope, kv, kr, pos, H, 1.0f);  // fits
  auto expect_error = [&](const std::function<void()>& f, const std::string& what) {
    try {
      f();
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("latent_attention"), std::string::npos) << e.what();
    }
  };
  Tensor wide = randn({n * H, r + 1}, rng), short_rope = randn({cap - 1, dr}, rng);
  Tensor few = randn({(n - 1) * H, r}, rng), rope3 = randn({n * H, dr - 1}, rng);
  expect_error([&] { cpu.latent_attention(ctx, wide, q_rope, kv, kr, pos, H, 1.0f); }, "q_lat");
  expect_error([&] { cpu.latent_attention(few, q_lat, q_rope, kv, kr, pos, H, 1.0f); }, "ctx");
  expect_error([&] { cpu.latent_attention(ctx, q_lat, rope3, kv, kr, pos, H, 1.0f); }, "q_rope");
  expect_error([&] { cpu.latent_attention(ctx, q_lat, q_rope, kv, short_rope, pos, H, 1.0f); },
               "k_rope rows");
  expect_error([&] { cpu.latent_attention(ctx, q_lat, q_rope, kv, kr, pos, H + 1, 1.0f); },
               "heads");
  expect_error(
      [&] { cpu.latent_attention(ctx, q_lat, q_rope, kv, kr, Tensor::zeros({n}), H, 1.0f); },
      "F32 positions");
  for (int32_t bad : {int32_t(cap), -1}) {
    pos.i32()[1] = bad;
    try {
      cpu.latent_attention(ctx, q_lat, q_rope, kv, kr, pos, H, 1.0f);
      ADD_FAILURE() << "no error for position " << bad;
    } catch (const Error& e) {
      const std::string want = "latent_attention: position " + std::to_string(bad) +
                               " at position 1 out of range [0, 6)";
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The fused ops of MLA's decode step against plain loops (in double). Odd sizes, several tokens
// at positions out of order, a rope table [max_pos, dr/2] of random angles.

struct RopeTab {
  Tensor cos, sin;
};
RopeTab random_rope(int64_t max_pos, int64_t dr, std::mt19937_64& rng) {
  RopeTab t{Tensor::empty({max_pos, dr / 2}), Tensor::empty({max_pos, dr / 2})};
  std::uniform_real_distribution<float> angle(-3.0f, 3.0f);
  for (int64_t i = 0; i < t.cos.numel(); ++i) {
    const float a = angle(rng);
    t.cos.f32()[i] = std::cos(a);
    t.sin.f32()[i] = std::sin(a);
  }
  return t;
}

Tensor positions_of(const std::vector<int32_t>& p) {
  Tensor t = Tensor::empty({int64_t(p.size())}, DType::I32);
  std::copy(p.begin(), p.end(), t.i32());
  return t;
}

// out[2j], out[2j+1]: the pair of in rotated by the table's angle at `pos` (the rope op's
// convention: (a, b) -> (a c - b s, b c + a s)).
void reference_rotate(double* out, const float* in, int64_t dr, const RopeTab& t, int64_t pos) {
  for (int64_t j = 0; j < dr / 2; ++j) {
    const double a = in[2 * j], b = in[2 * j + 1];
    const double c = t.cos.f32()[pos * (dr / 2) + j], s = t.sin.f32()[pos * (dr / 2) + j];
    out[2 * j] = a * c - b * s;
    out[2 * j + 1] = b * c + a * s;
  }
}

using test::expect_error_containing;

TEST(DecodeOps, MlaCacheWriteMatchesLoops) {
  std::mt19937_64 rng(10);
  const int64_t cap = 11, r = 13, dr = 6, n = 3;
  const float eps = 1e-6f;
  const RopeTab rope = random_rope(cap + 2, dr, rng);
  const std::vector<int32_t> pos = {7, 0, int32_t(cap - 1)};  // out of order, both ends
  Tensor kv_latent = randn({cap, r}, rng), k_rope = randn({cap, dr}, rng);
  const Tensor lat_before = kv_latent.clone(), rope_before = k_rope.clone();
  const Tensor kv_a = randn({n, r + dr}, rng), w = randn({r}, rng);
  backend(Device::CPU)
      .mla_cache_write(kv_latent, k_rope, kv_a, w, eps, rope.cos, rope.sin, positions_of(pos));
  for (int64_t row = 0; row < cap; ++row) {
    const auto it = std::find(pos.begin(), pos.end(), int32_t(row));
    if (it == pos.end()) {  // rows no token names are untouched
      for (int64_t c = 0; c < r; ++c)
        EXPECT_EQ(kv_latent.f32()[row * r + c], lat_before.f32()[row * r + c]) << row;
      for (int64_t c = 0; c < dr; ++c)
        EXPECT_EQ(k_rope.f32()[row * dr + c], rope_before.f32()[row * dr + c]) << row;
      continue;
    }
    const int64_t i = it - pos.begin();
    const float* x = kv_a.f32() + i * (r + dr);
    double ss = 0.0;
    for (int64_t c = 0; c < r; ++c) ss += double(x[c]) * x[c];
    const double rstd = 1.0 / std::sqrt(ss / double(r) + eps);
    for (int64_t c = 0; c < r; ++c)
      EXPECT_NEAR(kv_latent.f32()[row * r + c], w.f32()[c] * x[c] * rstd, 1e-5) << row << " " << c;
    std::vector<double> want(static_cast<size_t>(dr));
    reference_rotate(want.data(), x + r, dr, rope, row);
    for (int64_t c = 0; c < dr; ++c)
      EXPECT_NEAR(k_rope.f32()[row * dr + c], want[size_t(c)], 1e-5) << row << " " << c;
  }

  // The ops it replaces (copy_columns, rmsnorm_forward, rope, set_rows) give the same values, to
  // rounding (the compiler may contract a product and a sum differently in the two loops).
  Backend& cpu = backend(Device::CPU);
  Tensor lat2 = lat_before.clone(), rope2 = rope_before.clone();
  Tensor c_kv = Tensor::empty({n, r}), kr = Tensor::empty({n, dr}), normed = Tensor::empty({n, r});
  Tensor rstd = Tensor::empty({n});
  cpu.copy_columns(c_kv, 0, kv_a, 0, r, false);
  cpu.copy_columns(kr, 0, kv_a, r, dr, false);
  cpu.rope(kr, kr, 1, dr, 0, dr, rope.cos, rope.sin, positions_of(pos), false);
  cpu.rmsnorm_forward(normed, rstd, c_kv, w, eps);
  cpu.set_rows(lat2, normed, positions_of(pos));
  cpu.set_rows(rope2, kr, positions_of(pos));
  for (int64_t i = 0; i < lat2.numel(); ++i) EXPECT_NEAR(kv_latent.f32()[i], lat2.f32()[i], 1e-6);
  for (int64_t i = 0; i < rope2.numel(); ++i) EXPECT_NEAR(k_rope.f32()[i], rope2.f32()[i], 1e-6);
}

// The prefill's split of kv_a (Backend::mla_kv_a_split): row i of kv_latent is the norm of token
// i's c_kv (rstd[i] its 1 / rms), row i of k_rope its k_pe rotated at positions[i] (repeated and
// out of order, as a batch of sequences has them). A kv_a that does not split into the two is
// an error.
TEST(DecodeOps, MlaKvASplitMatchesLoops) {
  std::mt19937_64 rng(12);
  const int64_t r = 13, dr = 6, max_pos = 9;
  const float eps = 1e-6f;
  const RopeTab rope = random_rope(max_pos, dr, rng);
  const std::vector<int32_t> pos = {4, 0, 8, 4, 1};
  const int64_t n = int64_t(pos.size());
  const Tensor kv_a = randn({n, r + dr}, rng), w = randn({r}, rng);
  Tensor kv_latent = Tensor::empty({n, r}), rstd = Tensor::empty({n}),
         k_rope = Tensor::empty({n, dr});
  Backend& cpu = backend(Device::CPU);
  cpu.mla_kv_a_split(kv_latent, rstd, k_rope, kv_a, w, eps, rope.cos, rope.sin, positions_of(pos));
  for (int64_t i = 0; i < n; ++i) {
    const float* x = kv_a.f32() + i * (r + dr);
    double ss = 0.0;
    for (int64_t c = 0; c < r; ++c) ss += double(x[c]) * x[c];
    const double want_rstd = 1.0 / std::sqrt(ss / double(r) + eps);
    EXPECT_NEAR(rstd.f32()[i], want_rstd, 1e-6 * want_rstd) << i;
    for (int64_t c = 0; c < r; ++c)
      EXPECT_NEAR(kv_latent.f32()[i * r + c], w.f32()[c] * x[c] * want_rstd, 1e-5) << i << " " << c;
    std::vector<double> want(static_cast<size_t>(dr));
    reference_rotate(want.data(), x + r, dr, rope, pos[size_t(i)]);
    for (int64_t c = 0; c < dr; ++c)
      EXPECT_NEAR(k_rope.f32()[i * dr + c], want[size_t(c)], 1e-5) << i << " " << c;
  }
  Tensor narrow = randn({n, r + dr - 1}, rng);
  expect_error_containing(
      [&] {
        cpu.mla_kv_a_split(kv_latent, rstd, k_rope, narrow, w, eps, rope.cos, rope.sin,
                           positions_of(pos));
      },
      "mla_kv_a_split: kv_a [5, 18] does not split into kv_latent [5, 13] and k_rope [5, 6]");
}

TEST(DecodeOps, MlaCacheWriteRejectsBadPositionsAndShapes) {
  std::mt19937_64 rng(11);
  const int64_t cap = 9, r = 5, dr = 4, n = 2;
  Tensor kv_latent = randn({cap, r}, rng), k_rope = randn({cap, dr}, rng);
  const Tensor before = kv_latent.clone();
  const Tensor kv_a = randn({n, r + dr}, rng), w = randn({r}, rng);
  Backend& cpu = backend(Device::CPU);
  // The bound is the smaller of the cache and the rope table.
  struct Bad {
    int64_t table_rows;
    int32_t position;
    int64_t limit;
  };
  for (const Bad& b : {Bad{cap + 3, int32_t(cap), cap}, Bad{6, 6, 6}, Bad{20, -1, cap}}) {
    const RopeTab rope = random_rope(b.table_rows, dr, rng);
    const int32_t bad = b.position;
    const int64_t limit = b.limit;
    expect_error_containing(
        [&] {
          cpu.mla_cache_write(kv_latent, k_rope, kv_a, w, 1e-6f, rope.cos, rope.sin,
                              positions_of({3, bad}));
        },
        "mla_cache_write: position " + std::to_string(bad) + " at position 1 out of range [0, " +
            std::to_string(limit) + ")");
    // Checked before anything is written: the good row 3 is untouched too.
    for (int64_t i = 0; i < before.numel(); ++i) EXPECT_EQ(kv_latent.f32()[i], before.f32()[i]);
  }
  const RopeTab rope = random_rope(cap, dr, rng);
  const Tensor pos = positions_of({1, 2});
  Tensor narrow = randn({n, r + dr - 1}, rng), short_rope = randn({cap - 1, dr}, rng);
  EXPECT_THROW(cpu.mla_cache_write(kv_latent, k_rope, narrow, w, 1e-6f, rope.cos, rope.sin, pos),
               Error);
  EXPECT_THROW(cpu.mla_cache_write(kv_latent, short_rope, kv_a, w, 1e-6f, rope.cos, rope.sin, pos),
               Error);
  EXPECT_THROW(cpu.mla_cache_write(kv_latent, k_rope, kv_a, randn({r + 1}, rng), 1e-6f, rope.cos,
                                   rope.sin, pos),
               Error);
  EXPECT_THROW(
      cpu.mla_cache_write(kv_latent, k_rope, kv_a, w, 1e-6f, rope.cos, rope.sin, positions_of({1})),
      Error);
}

// q_lat[i*H+h, c] = sum_d q[i, h*(dn+dr)+d] kv_b[h*(dn+dv)+d, c]; q_rope = the roped q_pe.
void reference_absorb(Tensor& q_lat, Tensor& q_rope, const Tensor& q, const Tensor& kv_b,
                      const RopeTab& rope, const std::vector<int32_t>& pos, int64_t H, int64_t dn,
                      int64_t dr, int64_t dv) {
  const int64_t n = q.dim(0), r = kv_b.dim(1);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q.f32() + i * H * (dn + dr) + h * (dn + dr);
      for (int64_t c = 0; c < r; ++c) {
        double s = 0.0;
        for (int64_t d = 0; d < dn; ++d)
          s += double(qh[d]) * kv_b.f32()[(h * (dn + dv) + d) * r + c];
        q_lat.f32()[(i * H + h) * r + c] = float(s);
      }
      std::vector<double> rot(static_cast<size_t>(dr));
      reference_rotate(rot.data(), qh + dn, dr, rope, pos[size_t(i)]);
      for (int64_t c = 0; c < dr; ++c) q_rope.f32()[(i * H + h) * dr + c] = float(rot[size_t(c)]);
    }
}

TEST(DecodeOps, MlaAbsorbQueryMatchesLoops) {
  std::mt19937_64 rng(12);
  const int64_t H = 3, dn = 5, dr = 4, dv = 7, r = 9, n = 3;
  const RopeTab rope = random_rope(8, dr, rng);
  const std::vector<int32_t> pos = {4, 0, 7};
  const Tensor q = randn({n, H * (dn + dr)}, rng), q_before = q.clone();
  const Tensor kv_b = randn({H * (dn + dv), r}, rng);
  Tensor q_lat = Tensor::empty({n * H, r}), q_rope = Tensor::empty({n * H, dr});
  backend(Device::CPU)
      .mla_absorb_query(q_lat, q_rope, q, kv_b, rope.cos, rope.sin, positions_of(pos), H, dn, dr,
                        dv);
  Tensor ref_lat = Tensor::empty({n * H, r}), ref_rope = Tensor::empty({n * H, dr});
  reference_absorb(ref_lat, ref_rope, q, kv_b, rope, pos, H, dn, dr, dv);
  for (int64_t i = 0; i < q_lat.numel(); ++i) EXPECT_NEAR(q_lat.f32()[i], ref_lat.f32()[i], 1e-5);
  for (int64_t i = 0; i < q_rope.numel(); ++i)
    EXPECT_NEAR(q_rope.f32()[i], ref_rope.f32()[i], 1e-5);
  for (int64_t i = 0; i < q.numel(); ++i) EXPECT_EQ(q.f32()[i], q_before.f32()[i]);  // q is input

  Backend& cpu = backend(Device::CPU);
  expect_error_containing(
      [&] {
        cpu.mla_absorb_query(q_lat, q_rope, q, kv_b, rope.cos, rope.sin, positions_of({1, 8, 2}), H,
                             dn, dr, dv);
      },
      "mla_absorb_query: position 8 at position 1 out of range [0, 8)");
  const Tensor p = positions_of(pos);
  EXPECT_THROW(
      cpu.mla_absorb_query(q_lat, q_rope, q, kv_b, rope.cos, rope.sin, p, H, dn, dr, dv + 1),
      Error);  // kv_b rows
  EXPECT_THROW(cpu.mla_absorb_query(q_lat, q_rope, q, kv_b, rope.cos, rope.sin, p, H, dn + 1,
                                    dr - 1, dv - 1),
               Error);  // odd rope dim
  Tensor few = Tensor::empty({(n - 1) * H, r});
  EXPECT_THROW(cpu.mla_absorb_query(few, q_rope, q, kv_b, rope.cos, rope.sin, p, H, dn, dr, dv),
               Error);
}

TEST(DecodeOps, MlaValueHeadsMatchesLoops) {
  std::mt19937_64 rng(13);
  const int64_t H = 3, dn = 5, dv = 7, r = 9, n = 2;
  const Tensor ctx = randn({n * H, r}, rng), kv_b = randn({H * (dn + dv), r}, rng);
  Tensor o = Tensor::empty({n, H * dv});
  backend(Device::CPU).mla_value_heads(o, ctx, kv_b, H, dn, dv);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < dv; ++j) {
        double s = 0.0;
        for (int64_t c = 0; c < r; ++c)
          s +=
              double(ctx.f32()[(i * H + h) * r + c]) * kv_b.f32()[(h * (dn + dv) + dn + j) * r + c];
        EXPECT_NEAR(o.f32()[i * H * dv + h * dv + j], s, 1e-5) << i << " " << h << " " << j;
      }
  Backend& cpu = backend(Device::CPU);
  EXPECT_THROW(cpu.mla_value_heads(o, ctx, kv_b, H, dn + 1, dv), Error);
  Tensor wide = Tensor::empty({n, H * dv + 1});
  EXPECT_THROW(cpu.mla_value_heads(wide, ctx, kv_b, H, dn, dv), Error);
  EXPECT_THROW(cpu.mla_value_heads(o, randn({n * H + 1, r}, rng), kv_b, H, dn, dv), Error);
}

}  // namespace
}  // namespace moekit
