// The CUDA decode step's ops against the CPU backend: argmax and sampling (also replayed from a
// CUDA graph), the cache's row write, index checks inside graph replays, the latent attention and
// the MLA step's cache write, query absorption and value heads. Tolerances and the fixture:
// cuda_backend_testing.h.
#include "cuda_backend_testing.h"

namespace moekit {
namespace {

using namespace test;

TEST_F(CudaBackendTest, ArgmaxFirstMaximumOfThePrefix) {
  // A vocabulary-sized row (greedy decoding), ties, and a prefix limit (the allowed vocabulary).
  const int64_t R = 3, L = 102400;
  Tensor x = randn({R, L});
  x.f32()[0 * L + 70000] = 50.0f;
  x.f32()[0 * L + 90000] = 50.0f;  // tie: the first wins
  x.f32()[1 * L + 5] = -1e30f;
  x.f32()[2 * L + L - 1] = 60.0f;  // outside the prefix below
  for (int64_t n : {L, L - 1, int64_t(7)}) {
    Tensor idx = Tensor::empty({R}, DType::I32), gidx = poisoned({R}, DType::I32);
    cpu().argmax(idx, x, n);
    gpu().argmax(gidx, dev(x), n);
    expect_equal_i32(gidx, idx);
  }
}

// Backend::sample against the CPU's rule. The GPU sums integer masses (units of 2^-40 of the most
// likely token's) of its own exp, the CPU double sums of glibc's expf: their picks may differ only
// where u01 * kept mass or top_p * z lies within rounding (~1e-7 relative) of a boundary.
// SampleReference (a full sort, in double) lists the ids allowed with a slack of 1e-6 of the mass:
// where that is one id, the GPU and the CPU must both return it; elsewhere the GPU one of them.
// Rows: DeepSeek-V2's vocabulary (all of it and a prefix), one with ties at every cut (logits on
// a grid: the GPU finds the tied token of a rank by a scan), masked (-inf) entries, tiny rows.
TEST_F(CudaBackendTest, SampleMatchesCpu) {
  struct Row {
    std::string name;
    std::vector<float> x;
    int64_t n;
  };
  std::vector<Row> rows;
  auto add = [&](const std::string& name, int64_t V, int64_t n, float stddev, float grid) {
    std::vector<float> x(size_t(V), 0.5f);  // stddev 0: all equal
    if (stddev > 0.0f) {
      const Tensor t = randn({V}, stddev);
      x.assign(t.f32(), t.f32() + V);
    }
    if (grid > 0.0f)
      for (float& v : x) v = std::round(v / grid) * grid;
    rows.push_back({name, std::move(x), n});
  };
  add("vocab 102400", 102400, 102400, 2.5f, 0.0f);
  add("prefix of 102400", 102400, 101000, 2.5f, 0.0f);
  add("102400 on a 0.5 grid (ties)", 102400, 102400, 2.0f, 0.5f);
  add("5000", 5000, 5000, 1.0f, 0.0f);
  add("1000 on a 1.0 grid (ties)", 1000, 1000, 1.5f, 1.0f);
  add("7", 7, 7, 1.0f, 0.0f);
  add("2", 2, 2, 1.0f, 0.0f);
  add("1", 1, 1, 1.0f, 0.0f);
  add("300 equal", 300, 300, 0.0f, 0.0f);
  rows.push_back(rows[3]);
  rows.back().name = "5000 with masked entries";
  for (size_t i = 0; i < rows.back().x.size(); i += 3)
    rows.back().x[i] = -std::numeric_limits<float>::infinity();

  const SampleParams params[] = {{1.0f, 0, 1.0f},    {0.7f, 50, 1.0f},  {1.0f, 0, 0.9f},
                                 {0.8f, 50, 0.95f},  {1.0f, 1, 1.0f},   {1.0f, 0, 1e-6f},
                                 {1.5f, 1000, 0.8f}, {1.0f, 0, 0.5f},   {2.0f, 5, 1.0f},
                                 {0.6f, 0, 0.99f},   {1.0f, 4000, 1.0f}};
  std::vector<double> draws = {0.0, 1e-7, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999999};
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int i = 0; i < 8; ++i) draws.push_back(uniform(rng_));
  int exact = 0, cases = 0;
  for (const Row& row : rows) {
    const int64_t V = int64_t(row.x.size());
    Tensor x = Tensor::empty({1, V});
    std::copy(row.x.begin(), row.x.end(), x.f32());
    const Tensor gx = dev(x);
    const SampleReference ref(row.x.data(), row.n);
    for (const SampleParams& p : params)
      for (double u : draws) {
        SCOPED_TRACE(testing::Message() << row.name << ", T " << p.temperature << " top_k "
                                        << p.top_k << " top_p " << p.top_p << " u01 " << u);
        Tensor id = Tensor::empty({1}, DType::I32), gid = poisoned({1}, DType::I32);
        cpu().sample(id, x, row.n, p, u);
        gpu().sample(gid, gx, row.n, p, u);
        const int32_t c = id.i32()[0], g = gid.to_host().i32()[0];
        gpu().sample(gid, gx, row.n, p, u);  // deterministic: the same id again
        EXPECT_EQ(gid.to_host().i32()[0], g) << "a second call chose differently";
        const std::set<int32_t> ok = ref.allowed(p, u, 1e-6);
        ++cases;
        if (ok.size() == 1) {
          ++exact;
          EXPECT_EQ(c, *ok.begin()) << "the CPU's rule";
          EXPECT_EQ(g, c);
        } else {
          EXPECT_TRUE(ok.count(g)) << "GPU id " << g << " (CPU " << c << ")";
        }
      }
  }
  // Boundaries within 1e-6 are rare: most cases must have been compared exactly.
  EXPECT_GE(exact, cases * 3 / 4) << exact << " of " << cases;
}

// The sampling kernels wait for nothing and read their parameters from launch arguments, so a
// recorded call replays: the same id as the eager call, every time (its scratch is zero again
// after each run).
TEST_F(CudaBackendTest, SampleReplaysFromAGraph) {
  const int64_t V = 102400;
  const Tensor x = randn({1, V}, 2.0f), gx = dev(x);
  const SampleParams p{0.9f, 40, 0.9f};
  Tensor eager = poisoned({1}, DType::I32), replayed = poisoned({1}, DType::I32);
  gpu().sample(eager, gx, V, p, 0.37);
  const std::unique_ptr<CapturedWork> graph =
      gpu().capture([&] { gpu().sample(replayed, gx, V, p, 0.37); });
  ASSERT_NE(graph, nullptr) << "graphs are off (MOEKIT_CUDA_GRAPHS=0)";
  for (int i = 0; i < 3; ++i) {
    gpu().fill(replayed, -1.0f);
    graph->replay();
    EXPECT_EQ(replayed.to_host().i32()[0], eager.to_host().i32()[0]) << "replay " << i;
  }
}

TEST_F(CudaBackendTest, SetRowsEqualsCpu) {
  // A decode step's cache write: a few rows of a V2-Lite-sized latent cache, the first and the
  // last among them; every other row must stay as it was.
  const int64_t R = 1000, D = 512, n = 5;
  Tensor dst = randn({R, D}), src = randn({n, D}), rows = Tensor::empty({n}, DType::I32);
  const int32_t r[] = {999, 0, 517, 3, 64};
  std::copy(r, r + n, rows.i32());
  Tensor gdst = dev(dst);
  cpu().set_rows(dst, src, rows);
  gpu().set_rows(gdst, dev(src), dev(rows));
  EXPECT_CLOSE(gdst, dst, 0.0);  // copies: exact
  // A bad row is reported and written to row 0 in its place (the kernel checks the rows itself);
  // no other entry writes row 0 here.
  Tensor bad = rows.clone();
  bad.i32()[1] = 5;
  bad.i32()[2] = int32_t(R);
  expect_index_error([&] { gpu().set_rows(gdst, dev(src), dev(bad)); }, gdst,
                     "set_rows: row 1000 at position 2 out of range [0, 1000)");
  Tensor fixed = bad.clone();
  fixed.i32()[2] = 0;
  cpu().set_rows(dst, src, fixed);
  EXPECT_CLOSE(gdst, dst, 0.0);
}

// The ops that check their indices inside their own kernel (embedding_forward, set_rows, rope,
// moe_experts_small) mark the checks pending while a graph records them, so a replay on bad
// indices is reported at the next read back, naming the first failing op; a replay on good
// indices afterwards is clean and exact.
TEST_F(CudaBackendTest, FusedIndexChecksReportFromGraphReplays) {
  const int64_t V = 50, C = 40, T = 3, R = 20;
  const Tensor table = randn({V, C}), src = randn({T, C});
  const Tensor ids_ok = randint({T}, 0, int32_t(V));
  Tensor rows_ok = Tensor::empty({T}, DType::I32);
  for (int64_t i = 0; i < T; ++i) rows_ok.i32()[i] = int32_t(2 * i + 1);
  const Tensor gtable = dev(table), gsrc = dev(src);
  Tensor ids = dev(ids_ok), rows = dev(rows_ok), out = poisoned({T, C}), dst = dev(randn({R, C}));
  const std::unique_ptr<CapturedWork> graph = gpu().capture([&] {
    gpu().embedding_forward(out, gtable, ids);
    gpu().set_rows(dst, gsrc, rows);
  });
  ASSERT_NE(graph, nullptr) << "graphs are off (MOEKIT_CUDA_GRAPHS=0)";
  graph->replay();
  Tensor ref = Tensor::empty({T, C});
  cpu().embedding_forward(ref, table, ids_ok);
  EXPECT_CLOSE(out, ref, 0.0);
  Tensor bad_rows = rows_ok.clone(), bad_ids = ids_ok.clone();
  bad_rows.i32()[1] = int32_t(R);
  rows.copy_from(bad_rows);
  expect_index_error([&] { graph->replay(); }, dst,
                     "set_rows: row 20 at position 1 out of range [0, 20)");
  bad_ids.i32()[2] = -1;
  ids.copy_from(bad_ids);  // both fail: the first in stream order is reported
  expect_index_error([&] { graph->replay(); }, out,
                     "embedding_forward: token id -1 at position 2 out of range [0, 50)");
  ids.copy_from(ids_ok);
  rows.copy_from(rows_ok);
  graph->replay();
  EXPECT_NO_THROW((void)out.to_host());
  EXPECT_CLOSE(out, ref, 0.0);
}

struct LatentCase {
  int64_t heads, r, dr, cap;
  std::vector<int32_t> positions;
  float scale;
};

TEST_F(CudaBackendTest, LatentAttentionEqualsCpu) {
  // The split-K kernel against the CPU's GEMMs. V2-Lite sizes (16 heads, r 512, dr 64, scale
  // 1/sqrt(192)) over a cache of 1000 rows (16-row splits, one tile each): the first row only, a
  // length that is no multiple of a split or a tile, the whole cache, and several tokens at
  // different positions in one call; a sharper softmax (the running maximum moves between tiles
  // and splits); V3's 128 heads (32 head groups per token); a long cache (80-row splits); odd
  // small sizes (a partial head group with idle warps, r and dr not multiples of 32, rope rows
  // not 16-byte aligned: the plain staging copy instead of the asynchronous one). Tolerance: the
  // fp32 1e-5 (sums of 576 products and of up to 10000 weighted rows).
  const float v2 = 1.0f / std::sqrt(192.0f);
  const std::vector<LatentCase> cases = {
      {16, 512, 64, 1000, {0}, v2},           {16, 512, 64, 1000, {516}, v2},
      {16, 512, 64, 1000, {999}, v2},         {16, 512, 64, 1000, {100, 999, 0, 516}, v2},
      {16, 512, 64, 1000, {999, 400}, 0.3f},  {128, 512, 64, 700, {699, 333}, v2},
      {16, 512, 64, 10000, {9999, 4321}, v2}, {3, 12, 4, 50, {0, 13, 31, 49}, 0.5f},
      {21, 40, 6, 77, {76, 5}, 0.3f},
  };
  for (const LatentCase& c : cases) {
    const int64_t n = int64_t(c.positions.size()), H = c.heads;
    SCOPED_TRACE(testing::Message() << "H " << H << " r " << c.r << " dr " << c.dr << " cap "
                                    << c.cap << " tokens " << n << " first at " << c.positions[0]);
    Tensor kv = randn({c.cap, c.r}), kr = randn({c.cap, c.dr});
    // Rows past every token's position are NaN: reading one would poison the result.
    const int32_t last = *std::max_element(c.positions.begin(), c.positions.end());
    for (int64_t j = last + 1; j < c.cap; ++j) {
      std::fill(kv.f32() + j * c.r, kv.f32() + (j + 1) * c.r, std::nanf(""));
      std::fill(kr.f32() + j * c.dr, kr.f32() + (j + 1) * c.dr, std::nanf(""));
    }
    Tensor q_lat = randn({n * H, c.r}), q_rope = randn({n * H, c.dr});
    Tensor pos = Tensor::empty({n}, DType::I32);
    std::copy(c.positions.begin(), c.positions.end(), pos.i32());
    Tensor ctx = Tensor::empty({n * H, c.r}), gctx = poisoned({n * H, c.r});
    cpu().latent_attention(ctx, q_lat, q_rope, kv, kr, pos, H, c.scale);
    const Tensor gkv = dev(kv), gkr = dev(kr), gq_lat = dev(q_lat), gq_rope = dev(q_rope);
    const Tensor gpos = dev(pos);
    gpu().latent_attention(gctx, gq_lat, gq_rope, gkv, gkr, gpos, H, c.scale);
    EXPECT_CLOSE(gctx, ctx, kF32Tol);
    Tensor again = poisoned({n * H, c.r});
    gpu().latent_attention(again, gq_lat, gq_rope, gkv, gkr, gpos, H, c.scale);
    EXPECT_TRUE(bit_equal(gctx, again)) << "latent attention is not deterministic";
  }
}

TEST_F(CudaBackendTest, LatentAttentionErrors) {
  const int64_t H = 16, r = 512, dr = 64, cap = 1000, n = 2;
  Tensor kv = dev(randn({cap, r})), kr = dev(randn({cap, dr}));
  Tensor q_lat = dev(randn({n * H, r})), q_rope = dev(randn({n * H, dr}));
  Tensor ctx = poisoned({n * H, r}), pos = Tensor::empty({n}, DType::I32);
  pos.i32()[0] = 3;
  pos.i32()[1] = int32_t(cap);
  const float scale = 0.1f;
  expect_index_error(
      [&] { gpu().latent_attention(ctx, q_lat, q_rope, kv, kr, dev(pos), H, scale); }, ctx,
      "latent_attention: position 1000 at position 1 out of range [0, 1000)");
  pos.i32()[1] = 7;
  // Shapes are checked on the host, before any launch.
  Tensor short_rope = dev(randn({cap - 1, dr})), wide = poisoned({n * H, r + 1});
  EXPECT_THROW(gpu().latent_attention(ctx, q_lat, q_rope, kv, short_rope, dev(pos), H, scale),
               Error);
  EXPECT_THROW(gpu().latent_attention(wide, q_lat, q_rope, kv, kr, dev(pos), H, scale), Error);
  EXPECT_THROW(gpu().latent_attention(ctx, q_lat, q_rope, kv, kr, pos, H, scale), Error);  // host
  // Beyond the kernel's register tiles (r <= 512): a clear error, not a wrong result.
  Tensor kv_big = dev(randn({cap, 640})), q_big = dev(randn({n * H, 640}));
  Tensor ctx_big = poisoned({n * H, 640});
  expect_error_containing(
      [&] { gpu().latent_attention(ctx_big, q_big, q_rope, kv_big, kr, dev(pos), H, scale); },
      "beyond the kernel's limits");
}

// ---------------------------------------------------------------------------------------------
// The fused ops of MLA's decode step (cuda_mla_step.cu) against the CPU's loops. V2-Lite sizes (r
// 512, dr 64, dn 128, dv 128, 16 heads) and odd ones (rows no multiple of a 16-byte chunk: the
// element-wise load paths; ranks past the cache write's registers: its tail loop), one token and
// several at positions out of order (the absorption's groups of 4 tokens and the value side's
// rows of 4, with a partial last group). BF16 weights: the CPU reads the same bf16 values widened
// to fp32, so both sides multiply the same numbers. Tolerance: the fp32 1e-5 (see the top of the
// file): sums of at most 1000 products (squares of the RMSNorm, dn terms of the absorption, r of
// the value side), both in fp32 in different orders, and the rope's two products per element.

// A random rope table [rows, dr/2] (cos, sin of random angles).
std::pair<Tensor, Tensor> random_rope_table(int64_t rows, int64_t dr, std::mt19937_64& rng) {
  Tensor c = Tensor::empty({rows, dr / 2}), s = Tensor::empty({rows, dr / 2});
  std::uniform_real_distribution<float> angle(-3.0f, 3.0f);
  for (int64_t i = 0; i < c.numel(); ++i) {
    const float a = angle(rng);
    c.f32()[i] = std::cos(a);
    s.f32()[i] = std::sin(a);
  }
  return {c, s};
}

Tensor i32_of(const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty({int64_t(v.size())}, DType::I32);
  std::copy(v.begin(), v.end(), t.i32());
  return t;
}

struct MlaStepCase {
  int64_t heads, r, dr, dn, dv;
  std::vector<int32_t> positions;
};

// The prefill's kv_a split (one launch of the cache write's kernel, writing row i and rstd)
// against the CPU's composition of copy_columns, rope and rmsnorm_forward: V2-Lite's 512 + 64 at
// repeated and unordered positions, a rank past the 512 values kept in registers, odd sizes. The
// latent F32 (kF32Tol: the sums of squares run in other orders), and BF16: the CPU's F32 latent
// rounded once, to one bf16 step (2^-8 relative) where the two sums round it differently. A bad
// position is reported naming the op.
TEST_F(CudaBackendTest, MlaKvASplitEqualsCpu) {
  struct Case {
    int64_t n, r, dr, max_pos;
  };
  for (const Case& c : {Case{300, 512, 64, 2048}, Case{7, 1000, 64, 20}, Case{33, 37, 6, 50}}) {
    SCOPED_TRACE(testing::Message() << "n " << c.n << " r " << c.r << " dr " << c.dr);
    Tensor cos_t, sin_t;
    std::tie(cos_t, sin_t) = random_rope_table(c.max_pos, c.dr, rng_);
    const Tensor kv_a = randn({c.n, c.r + c.dr}, 2.0f), w = randn({c.r});
    const Tensor pos = randint({c.n}, 0, int32_t(c.max_pos));
    Tensor lat = Tensor::empty({c.n, c.r}), rstd = Tensor::empty({c.n}),
           kr = Tensor::empty({c.n, c.dr});
    cpu().mla_kv_a_split(lat, rstd, kr, kv_a, w, 1e-6f, cos_t, sin_t, pos);
    for (const DType d : {DType::F32, DType::BF16}) {
      SCOPED_TRACE(dtype_name(d));
      Tensor glat = poisoned({c.n, c.r}, d), grstd = poisoned({c.n}), gkr = poisoned({c.n, c.dr});
      gpu().mla_kv_a_split(glat, grstd, gkr, dev(kv_a), dev(w), 1e-6f, dev(cos_t), dev(sin_t),
                           dev(pos));
      if (d == DType::F32)
        EXPECT_CLOSE(glat, lat, kF32Tol);
      else
        EXPECT_CLOSE(glat, lat.to_dtype(DType::BF16).to_f32(), std::ldexp(1.0, -8));
      EXPECT_CLOSE(grstd, rstd, kF32Tol);
      EXPECT_CLOSE(gkr, kr, kF32Tol);
    }
  }
  Tensor cos_t, sin_t;
  std::tie(cos_t, sin_t) = random_rope_table(100, 64, rng_);
  Tensor glat = poisoned({2, 512}), grstd = poisoned({2}), gkr = poisoned({2, 64});
  expect_index_error(
      [&] {
        gpu().mla_kv_a_split(glat, grstd, gkr, dev(randn({2, 576})), dev(randn({512})), 1e-6f,
                             dev(cos_t), dev(sin_t), dev(i32_of({3, 100})));
      },
      glat, "mla_kv_a_split: position 100 at position 1 out of range [0, 100)");
}

TEST_F(CudaBackendTest, MlaCacheWriteEqualsCpu) {
  struct Case {
    int64_t r, dr, cap;
    std::vector<int32_t> positions;
  };
  // V2-Lite (one step; three tokens out of order, both ends of the cache), odd sizes, ranks past
  // the 512 values the kernel keeps in registers (its tail loop).
  const std::vector<Case> cases = {{512, 64, 1000, {517}},
                                   {512, 64, 1000, {999, 0, 3}},
                                   {37, 6, 50, {49, 12}},
                                   {1000, 64, 20, {5, 19, 0}},
                                   {2000, 2, 7, {6}}};
  for (const Case& c : cases) {
    const int64_t n = int64_t(c.positions.size());
    SCOPED_TRACE(testing::Message()
                 << "r " << c.r << " dr " << c.dr << " cap " << c.cap << " n " << n);
    Tensor cos_t, sin_t;
    std::tie(cos_t, sin_t) = random_rope_table(c.cap + 5, c.dr, rng_);
    Tensor lat = randn({c.cap, c.r}), kr = randn({c.cap, c.dr});
    const Tensor kv_a = randn({n, c.r + c.dr}, 2.0f), w = randn({c.r});
    const Tensor pos = i32_of(c.positions);
    Tensor glat = dev(lat), gkr = dev(kr);  // rows no token names must keep their values
    cpu().mla_cache_write(lat, kr, kv_a, w, 1e-6f, cos_t, sin_t, pos);
    gpu().mla_cache_write(glat, gkr, dev(kv_a), dev(w), 1e-6f, dev(cos_t), dev(sin_t), dev(pos));
    EXPECT_CLOSE(glat, lat, kF32Tol);
    EXPECT_CLOSE(gkr, kr, kF32Tol);
  }
  // A bad position is reported and written to row 0 in its place (as set_rows); the bound is
  // the smaller of the cache (1000 rows) and the rope table (here 1005).
  const int64_t r = 512, dr = 64, cap = 1000;
  Tensor cos_t, sin_t;
  std::tie(cos_t, sin_t) = random_rope_table(cap + 5, dr, rng_);
  Tensor glat = dev(randn({cap, r})), gkr = dev(randn({cap, dr}));
  const Tensor kv_a = dev(randn({2, r + dr})), w = dev(randn({r}));
  expect_index_error(
      [&] {
        gpu().mla_cache_write(glat, gkr, kv_a, w, 1e-6f, dev(cos_t), dev(sin_t),
                              dev(i32_of({3, int32_t(cap)})));
      },
      glat, "mla_cache_write: position 1000 at position 1 out of range [0, 1000)");
  Tensor cos_s, sin_s;
  std::tie(cos_s, sin_s) = random_rope_table(700, dr, rng_);  // a table shorter than the cache
  expect_index_error(
      [&] {
        gpu().mla_cache_write(glat, gkr, kv_a, w, 1e-6f, dev(cos_s), dev(sin_s),
                              dev(i32_of({-2, 700})));
      },
      glat, "mla_cache_write: position -2 at position 0 out of range [0, 700)");
  EXPECT_THROW(
      gpu().mla_cache_write(glat, gkr, kv_a, w, 1e-6f, dev(cos_t), dev(sin_t), i32_of({1, 2})),
      Error);  // host positions
}

TEST_F(CudaBackendTest, MlaAbsorbQueryAndValueHeadsEqualCpu) {
  const std::vector<MlaStepCase> cases = {
      {16, 512, 64, 128, 128, {700}},                 // V2-Lite, one step
      {16, 512, 64, 128, 128, {9, 0, 4, 999, 3}},     // 5 tokens: a group of 4 and one more
      {128, 512, 64, 128, 128, {77}},                 // V3's 128 heads
      {3, 37, 6, 5, 7, {2, 0}},                       // rows of 37: element-wise loads everywhere
      {5, 36, 4, 9, 3, {1, 8, 6, 0, 2, 7, 5, 3, 4}},  // F32 in chunks, BF16 element-wise
      {2, 16, 8, 16, 16, {11, 0, 5}},                 // the tiny test model's sizes
  };
  for (const DType wt : {DType::F32, DType::BF16})
    for (const MlaStepCase& c : cases) {
      const int64_t n = int64_t(c.positions.size()), H = c.heads, dqk = c.dn + c.dr;
      SCOPED_TRACE(testing::Message() << dtype_name(wt) << " H " << H << " r " << c.r << " dr "
                                      << c.dr << " dn " << c.dn << " dv " << c.dv << " n " << n);
      Tensor cos_t, sin_t;
      std::tie(cos_t, sin_t) = random_rope_table(1000, c.dr, rng_);
      // The weight as stored on the GPU, and the same values in F32 for the CPU.
      const Tensor w32 = randn({H * (c.dn + c.dv), c.r}, 0.05f);
      const Tensor w_dev = dev(wt == DType::BF16 ? w32.to_dtype(DType::BF16) : w32);
      const Tensor w_ref = wt == DType::BF16 ? w32.to_dtype(DType::BF16).to_f32() : w32;
      const Tensor q = randn({n, H * dqk}), pos = i32_of(c.positions), gq = dev(q);

      Tensor q_lat = Tensor::empty({n * H, c.r}), q_rope = Tensor::empty({n * H, c.dr});
      cpu().mla_absorb_query(q_lat, q_rope, q, w_ref, cos_t, sin_t, pos, H, c.dn, c.dr, c.dv);
      Tensor gq_lat = poisoned({n * H, c.r}), gq_rope = poisoned({n * H, c.dr});
      gpu().mla_absorb_query(gq_lat, gq_rope, gq, w_dev, dev(cos_t), dev(sin_t), dev(pos), H, c.dn,
                             c.dr, c.dv);
      EXPECT_CLOSE(gq_lat, q_lat, kF32Tol);
      EXPECT_CLOSE(gq_rope, q_rope, kF32Tol);
      EXPECT_CLOSE(gq, q, 0.0);  // q is only read
      Tensor again = poisoned({n * H, c.r});
      gpu().mla_absorb_query(again, gq_rope, gq, w_dev, dev(cos_t), dev(sin_t), dev(pos), H, c.dn,
                             c.dr, c.dv);
      EXPECT_TRUE(bit_equal(gq_lat, again)) << "mla_absorb_query is not deterministic";

      const Tensor ctx = randn({n * H, c.r});
      Tensor o = Tensor::empty({n, H * c.dv}), go = poisoned({n, H * c.dv});
      cpu().mla_value_heads(o, ctx, w_ref, H, c.dn, c.dv);
      gpu().mla_value_heads(go, dev(ctx), w_dev, H, c.dn, c.dv);
      EXPECT_CLOSE(go, o, kF32Tol);
      Tensor go2 = poisoned({n, H * c.dv});
      gpu().mla_value_heads(go2, dev(ctx), w_dev, H, c.dn, c.dv);
      EXPECT_TRUE(bit_equal(go, go2)) << "mla_value_heads is not deterministic";
    }
}

TEST_F(CudaBackendTest, MlaStepOpsMisalignedWeightAndErrors) {
  // A weight whose rows are whole 16-byte chunks but whose start is not 16-byte aligned (a view
  // one float into its buffer): the kernels must take the element-wise loads.
  const int64_t H = 4, r = 64, dr = 8, dn = 12, dv = 10, n = 2;
  const int64_t rows_w = H * (dn + dv);
  const Tensor flat = randn({rows_w * r + 1}, 0.1f);
  const Tensor w = dev(flat).slice(1, rows_w * r + 1).reshape({rows_w, r});
  const Tensor w_ref = flat.slice(1, rows_w * r + 1).reshape({rows_w, r}).clone();
  Tensor cos_t, sin_t;
  std::tie(cos_t, sin_t) = random_rope_table(30, dr, rng_);
  const Tensor q = randn({n, H * (dn + dr)}), pos = i32_of({29, 3});
  Tensor q_lat = Tensor::empty({n * H, r}), q_rope = Tensor::empty({n * H, dr});
  cpu().mla_absorb_query(q_lat, q_rope, q, w_ref, cos_t, sin_t, pos, H, dn, dr, dv);
  Tensor gq_lat = poisoned({n * H, r}), gq_rope = poisoned({n * H, dr});
  gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t), dev(pos), H, dn, dr,
                         dv);
  EXPECT_CLOSE(gq_lat, q_lat, kF32Tol);
  EXPECT_CLOSE(gq_rope, q_rope, kF32Tol);
  const Tensor ctx = randn({n * H, r});
  Tensor o = Tensor::empty({n, H * dv}), go = poisoned({n, H * dv});
  cpu().mla_value_heads(o, ctx, w_ref, H, dn, dv);
  gpu().mla_value_heads(go, dev(ctx), w, H, dn, dv);
  EXPECT_CLOSE(go, o, kF32Tol);

  // A position past the rope table: reported at the next read back, rotated by row 0's angle.
  expect_index_error(
      [&] {
        gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t),
                               dev(i32_of({4, 30})), H, dn, dr, dv);
      },
      gq_rope, "mla_absorb_query: position 30 at position 1 out of range [0, 30)");
  // Shapes and dtypes are checked on the host, before any launch.
  EXPECT_THROW(gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t), dev(pos),
                                      H, dn, dr, dv + 1),
               Error);
  EXPECT_THROW(gpu().mla_absorb_query(gq_lat, gq_rope, dev(q), w, dev(cos_t), dev(sin_t), pos, H,
                                      dn, dr, dv),
               Error);  // host positions
  EXPECT_THROW(gpu().mla_value_heads(go, dev(ctx), w, H + 1, dn, dv), Error);
  EXPECT_THROW(gpu().mla_value_heads(go, dev(ctx), w.to_host(), H, dn, dv), Error);  // host weight
  EXPECT_TRUE(gpu().supports(Op::MlaAbsorbQuery, DType::BF16));
  EXPECT_TRUE(gpu().supports(Op::MlaValueHeads, DType::BF16));
  EXPECT_FALSE(cpu().supports(Op::MlaAbsorbQuery, DType::BF16));
}

}  // namespace
}  // namespace moekit
