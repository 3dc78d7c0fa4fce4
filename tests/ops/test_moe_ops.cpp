// The MoE ops of the CPU backend (the oracle the CUDA backend is checked against) against
// references written here: the permute plan against a stable sort of the (token, k) pairs by
// expert, the grouped GEMM and the experts' weight gradients against one plain matmul per expert on
// its row block, the few-token experts (with and without the shared experts folded in) against the
// SwiGLU formula in double.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../tensor_testing.h"
#include "core/error.h"
#include "ops/ops.h"

namespace moekit {
namespace {

using test::bit_equal;
using test::randn;

Backend& cpu() {
  return backend(Device::CPU);
}

struct Plan {
  Tensor slot_token, slot_pair, slot_weight, token_slots, expert_begin, expert_rows;
};

Plan run_plan(const Tensor& idx, const Tensor& w, int64_t E, int64_t align = 1) {
  const int64_t S = dispatch_slots(idx.numel(), E, align);
  Plan p{Tensor::empty({S}, DType::I32),
         Tensor::empty({S}, DType::I32),
         Tensor::empty({S}),
         Tensor::empty(idx.shape(), DType::I32),
         Tensor::empty({E + 1}, DType::I32),
         Tensor::empty({E}, DType::I32)};
  std::fill_n(p.slot_token.i32(), S, -7);  // poison: an unwritten slot shows
  std::fill_n(p.slot_pair.i32(), S, -7);
  std::fill_n(p.slot_weight.f32(), S, 7.0f);
  std::fill_n(p.token_slots.i32(), idx.numel(), -7);
  cpu().moe_dispatch_plan(p.slot_token, p.slot_pair, p.slot_weight, p.token_slots, p.expert_begin,
                          p.expert_rows, idx, w, E, align);
  return p;
}

// token_slots from its definition: the slots whose token is t, in increasing order.
void expect_token_slots(const Plan& p, int64_t T, int64_t K) {
  std::vector<std::vector<int32_t>> slots(static_cast<size_t>(T));
  for (int64_t s = 0; s < p.slot_token.numel(); ++s)
    if (p.slot_token.i32()[s] >= 0) slots[size_t(p.slot_token.i32()[s])].push_back(int32_t(s));
  for (int64_t t = 0; t < T; ++t) {
    ASSERT_EQ(int64_t(slots[size_t(t)].size()), K) << "token " << t;
    for (int64_t j = 0; j < K; ++j)
      ASSERT_EQ(p.token_slots.i32()[t * K + j], slots[size_t(t)][size_t(j)])
          << "token " << t << " slot " << j;
  }
}

// The plan from its definition: pairs stably sorted by expert, each expert's block padded to a
// multiple of align with empty slots (-1, -1, 0), the slots past the last block empty too.
void expect_plan(const Plan& p, const Tensor& idx, const Tensor& w, int64_t E, int64_t align) {
  const int64_t N = idx.numel(), K = idx.dim(1);
  std::vector<int32_t> order(static_cast<size_t>(N));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return idx.i32()[a] < idx.i32()[b]; });
  int64_t slot = 0, sorted = 0;
  for (int64_t e = 0; e < E; ++e) {
    const auto rows = std::count(idx.i32(), idx.i32() + N, int32_t(e));
    EXPECT_EQ(p.expert_rows.i32()[e], rows) << "expert " << e;
    ASSERT_EQ(p.expert_begin.i32()[e], slot) << "expert " << e;
    const int64_t end = slot + (rows + align - 1) / align * align;
    for (; slot < end; ++slot) {
      if (slot - p.expert_begin.i32()[e] < rows) {
        const int32_t pair = order[size_t(sorted++)];
        ASSERT_EQ(p.slot_pair.i32()[slot], pair) << "slot " << slot;
        ASSERT_EQ(p.slot_token.i32()[slot], pair / K) << "slot " << slot;
        ASSERT_EQ(p.slot_weight.f32()[slot], w.f32()[pair]) << "slot " << slot;
      } else {
        ASSERT_EQ(p.slot_pair.i32()[slot], -1) << "padding slot " << slot;
        ASSERT_EQ(p.slot_token.i32()[slot], -1) << "padding slot " << slot;
        ASSERT_EQ(p.slot_weight.f32()[slot], 0.0f) << "padding slot " << slot;
      }
    }
  }
  EXPECT_EQ(sorted, N);
  EXPECT_EQ(p.expert_begin.i32()[E], slot);
  for (; slot < p.slot_token.numel(); ++slot) {
    ASSERT_EQ(p.slot_token.i32()[slot], -1) << "unused slot " << slot;
    ASSERT_EQ(p.slot_pair.i32()[slot], -1) << "unused slot " << slot;
  }
}

TEST(MoeOps, DispatchPlanIsAStableSortByExpert) {
  std::mt19937_64 rng(7);
  // Every expert used; many empty experts (only every third drawn); a single expert; one token;
  // each without padding and with blocks padded to 4 and to 16 rows.
  struct Case {
    int64_t T, K, E, stride;
  };
  for (const Case& c :
       {Case{53, 4, 9, 1}, Case{101, 6, 31, 3}, Case{17, 1, 1, 1}, Case{1, 3, 5, 1}})
    for (int64_t align : {1, 4, 16}) {
      SCOPED_TRACE(testing::Message() << "T " << c.T << " E " << c.E << " align " << align);
      Tensor idx = Tensor::empty({c.T, c.K}, DType::I32), w = randn({c.T, c.K}, rng);
      std::uniform_int_distribution<int32_t> u(0, int32_t((c.E - 1) / c.stride));
      for (int64_t i = 0; i < idx.numel(); ++i) idx.i32()[i] = u(rng) * int32_t(c.stride);
      const Plan p = run_plan(idx, w, c.E, align);
      expect_plan(p, idx, w, c.E, align);
      expect_token_slots(p, c.T, c.K);
    }
}

// combine_slots is scatter_add_rows over the plan's slot tokens: the same sums in the same order,
// whatever token_slots holds (the default ignores it); token_slots of the wrong shape is refused.
TEST(MoeOps, CombineSlotsIsTheScatterAddOfSlotTokens) {
  std::mt19937_64 rng(11);
  const int64_t T = 29, K = 3, E = 7, H = 5, align = 4;
  Tensor idx = Tensor::empty({T, K}, DType::I32), w = randn({T, K}, rng);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) idx.i32()[t * K + k] = int32_t((t + 2 * k) % E);
  const Plan p = run_plan(idx, w, E, align);
  const int64_t S = p.slot_token.numel();
  Tensor x = randn({S, H}, rng), base = randn({T, H}, rng);
  Tensor a = base.clone(), b = base.clone();
  cpu().scatter_add_rows(a, x, p.slot_token, &p.slot_weight);
  cpu().combine_slots(b, x, p.slot_token, p.token_slots, &p.slot_weight);
  EXPECT_TRUE(bit_equal(a, b));
  Tensor flat = p.token_slots.reshape({T * K});
  EXPECT_THROW(cpu().combine_slots(b, x, p.slot_token, flat, nullptr), Error);
}

// Padding slots (row -1) are no rows: gather writes zeros, the combine skips them; the real slots
// are unchanged by their presence.
TEST(MoeOps, NegativeRowsAreNoRows) {
  std::mt19937_64 rng(5);
  const int64_t R = 4, C = 6;
  Tensor x = randn({R, C}, rng), rows = Tensor::empty({5}, DType::I32), w = randn({5}, rng);
  const int32_t r[] = {2, -1, 0, -1, 2};
  std::copy(r, r + 5, rows.i32());
  Tensor out = Tensor::empty({5, C});
  std::fill_n(out.f32(), out.numel(), 9.0f);  // poison
  cpu().gather_rows(out, x, rows, &w);
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t c = 0; c < C; ++c)
      EXPECT_EQ(out.f32()[i * C + c], r[i] < 0 ? 0.0f : w.f32()[i] * x.f32()[r[i] * C + c]);
  Tensor src = randn({5, C}, rng), acc = x.clone();
  cpu().scatter_add_rows(acc, src, rows, &w);
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_FLOAT_EQ(acc.f32()[2 * C + c], x.f32()[2 * C + c] + w.f32()[0] * src.f32()[c] +
                                              w.f32()[4] * src.f32()[4 * C + c]);
    EXPECT_EQ(acc.f32()[1 * C + c], x.f32()[1 * C + c]);  // untouched
    EXPECT_EQ(acc.f32()[3 * C + c], x.f32()[3 * C + c]);
  }
  // Past the end is still an error.
  rows.i32()[4] = int32_t(R);
  EXPECT_THROW(cpu().gather_rows(out, x, rows, nullptr), Error);
  EXPECT_THROW(cpu().scatter_add_rows(acc, src, rows, nullptr), Error);
}

// I32 rows (index tensors: the MoE backward's slot tokens compacted to the trainable experts'
// slots) against the definition: out[i] = x[rows[i]] bit for bit, 0 for a padding row, whatever
// the bits would mean as floats (NaN, infinity, denormal); 1-wide rows (a 1-D index as a column)
// and wider ones. Weights and mixed dtypes are refused.
TEST(MoeOps, GatherRowsCopiesI32Rows) {
  EXPECT_TRUE(cpu().supports(Op::GatherRows, DType::I32));
  const int32_t values[] = {INT32_MIN, INT32_MAX, 0x7fc00001, 0x7f800001, 0x7f800000, 1,
                            -2,        0,         42,         -123456789, 0x00400000, 7};
  const int32_t r[] = {4, -1, 0, 2, 4, 1, -1, 3, 5};
  const int64_t N = int64_t(std::size(r));
  Tensor rows = Tensor::empty({N}, DType::I32);
  std::copy(r, r + N, rows.i32());
  for (const int64_t C : {1, 2}) {
    SCOPED_TRACE(C);
    const int64_t R = int64_t(std::size(values)) / C;
    Tensor x = Tensor::empty({R, C}, DType::I32);
    std::copy(values, values + R * C, x.i32());
    Tensor out = Tensor::empty({N, C}, DType::I32);
    std::fill_n(out.i32(), out.numel(), 0x5a5a5a5a);  // poison
    cpu().gather_rows(out, x, rows, nullptr);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < C; ++c)
        EXPECT_EQ(out.i32()[i * C + c], r[i] < 0 ? 0 : x.i32()[r[i] * C + c]) << i << "," << c;
  }
  Tensor x = Tensor::zeros({6, 1}, DType::I32), out = Tensor::empty({N, 1}, DType::I32);
  Tensor w = Tensor::zeros({N}), xf = Tensor::zeros({6, 1}), outf = Tensor::empty({N, 1});
  EXPECT_THROW(cpu().gather_rows(out, x, rows, &w), Error);
  EXPECT_THROW(cpu().gather_rows(outf, x, rows, nullptr), Error);
  EXPECT_THROW(cpu().gather_rows(out, xf, rows, nullptr), Error);
}

TEST(MoeOps, DispatchPlanRejectsAnOutOfRangeExpert) {
  Tensor idx = Tensor::zeros({3, 2}, DType::I32), w = Tensor::zeros({3, 2});
  idx.i32()[4] = 5;
  EXPECT_THROW(run_plan(idx, w, 5), Error);
}

// Row offsets of `sizes` groups.
std::vector<int64_t> offsets(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> begin{0};
  for (int64_t n : sizes) begin.push_back(begin.back() + n);
  return begin;
}

TEST(MoeOps, GroupedMatmulEqualsOneMatmulPerGroup) {
  std::mt19937_64 rng(11);
  const int64_t K = 13, N = 9;
  const std::vector<int64_t> sizes{5, 0, 1, 12, 0, 3};  // empty groups in the middle
  const std::vector<int64_t> begin = offsets(sizes);
  const int64_t R = begin.back(), G = int64_t(sizes.size());
  Tensor a = randn({R, K}, rng);
  for (bool trans_b : {false, true})
    for (float beta : {0.0f, 1.0f, 0.5f}) {
      std::vector<Tensor> w;
      std::vector<const Tensor*> wp;
      for (int64_t g = 0; g < G; ++g) w.push_back(randn(trans_b ? Shape{N, K} : Shape{K, N}, rng));
      for (const Tensor& t : w) wp.push_back(&t);
      wp[1] = nullptr;  // an empty group needs no weight
      Tensor c0 = randn({R, N}, rng), c = c0.clone(), ref = c0.clone();
      cpu().grouped_matmul(c, a, wp, begin, trans_b, beta);
      for (int64_t g = 0; g < G; ++g) {
        if (sizes[size_t(g)] == 0) continue;
        Tensor rg = ref.slice(begin[size_t(g)], begin[size_t(g) + 1]);
        cpu().matmul(rg, a.slice(begin[size_t(g)], begin[size_t(g) + 1]), w[size_t(g)], false,
                     trans_b, 1.0f, beta);
      }
      EXPECT_TRUE(bit_equal(c, ref)) << "trans_b " << trans_b << " beta " << beta;
      // And against a scalar loop, so the reference is not only the same calls.
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = begin[size_t(g)]; r < begin[size_t(g) + 1]; ++r)
          for (int64_t j = 0; j < N; ++j) {
            double s = beta * double(c0.f32()[r * N + j]);
            for (int64_t k = 0; k < K; ++k)
              s += double(a.f32()[r * K + k]) *
                   double(trans_b ? w[size_t(g)].f32()[j * K + k] : w[size_t(g)].f32()[k * N + j]);
            ASSERT_NEAR(c.f32()[r * N + j], s, 1e-4) << "group " << g << " row " << r;
          }
    }
}

TEST(MoeOps, GroupedMatmulChecksShapes) {
  Tensor a = Tensor::zeros({4, 3}), c = Tensor::zeros({4, 2}), w = Tensor::zeros({2, 3});
  const Tensor* wp[] = {&w, &w};
  const std::vector<int64_t> ok{0, 1, 4}, short_rows{0, 1, 3}, decreasing{0, 3, 2};
  EXPECT_NO_THROW(cpu().grouped_matmul(c, a, wp, ok, true, 0.0f));
  EXPECT_THROW(cpu().grouped_matmul(c, a, wp, ok, false, 0.0f), Error);  // w is [N, K]
  EXPECT_THROW(cpu().grouped_matmul(c, a, wp, short_rows, true, 0.0f), Error);
  EXPECT_THROW(cpu().grouped_matmul(c, a, wp, decreasing, true, 0.0f), Error);
  const Tensor* missing[] = {&w, nullptr};
  EXPECT_THROW(cpu().grouped_matmul(c, a, missing, ok, true, 0.0f), Error);
}

// grouped_matmul_sum (the experts' dx = dgate W_gate + dup W_up) on the CPU: the default, one
// grouped GEMM per term with beta for the first and 1 after, bit for bit.
TEST(MoeOps, GroupedMatmulSumIsTheTermsInOrder) {
  std::mt19937_64 rng(13);
  const int64_t K = 7, N = 11;
  const std::vector<int64_t> begin = offsets({4, 0, 9, 2});
  const int64_t R = begin.back();
  Tensor a1 = randn({R, K}, rng), a2 = randn({R, K}, rng);
  std::vector<Tensor> w;
  for (int i = 0; i < 8; ++i) w.push_back(randn({N, K}, rng));
  const std::vector<const Tensor*> w1{&w[0], &w[1], &w[2], &w[3]}, w2{&w[4], &w[5], &w[6], &w[7]};
  const GroupedTerm terms[] = {{&a1, w1}, {&a2, w2}};
  for (float beta : {0.0f, 0.5f}) {
    Tensor c = randn({R, N}, rng), ref = c.clone();
    cpu().grouped_matmul_sum(c, terms, begin, true, beta);
    cpu().grouped_matmul(ref, a1, w1, begin, true, beta);
    cpu().grouped_matmul(ref, a2, w2, begin, true, 1.0f);
    EXPECT_TRUE(bit_equal(c, ref)) << "beta " << beta;
  }
}

// grouped_swiglu (the routed experts' gate and up products with SwiGLU) on the CPU: the default,
// two grouped GEMMs and swiglu_forward, bit for bit, with the products kept or not; and within
// 1e-5 of silu(g) * u in double from one matmul per group (so the reference is not only the same
// calls). A kept product of another shape is refused.
TEST(MoeOps, GroupedSwigluIsTheTwoProductsThenSwiglu) {
  std::mt19937_64 rng(17);
  const int64_t K = 9, I = 6;
  const std::vector<int64_t> begin = offsets({3, 0, 5, 1});
  const int64_t R = begin.back();
  const Tensor x = randn({R, K}, rng);
  std::vector<Tensor> w;
  for (int i = 0; i < 8; ++i) w.push_back(randn({I, K}, rng));
  const std::vector<const Tensor*> gw{&w[0], &w[1], &w[2], &w[3]}, uw{&w[4], &w[5], &w[6], &w[7]};
  Tensor h = Tensor::empty({R, I}), gate = Tensor::empty({R, I}), up = Tensor::empty({R, I});
  cpu().grouped_swiglu(h, &gate, &up, x, gw, uw, begin);
  Tensor g_ref = Tensor::empty({R, I}), u_ref = Tensor::empty({R, I}),
         h_ref = Tensor::empty({R, I});
  cpu().grouped_matmul(g_ref, x, gw, begin, true, 0.0f);
  cpu().grouped_matmul(u_ref, x, uw, begin, true, 0.0f);
  cpu().swiglu_forward(h_ref, g_ref, u_ref);
  EXPECT_TRUE(bit_equal(gate, g_ref));
  EXPECT_TRUE(bit_equal(up, u_ref));
  EXPECT_TRUE(bit_equal(h, h_ref));
  Tensor h_alone = Tensor::empty({R, I});
  cpu().grouped_swiglu(h_alone, nullptr, nullptr, x, gw, uw, begin);
  EXPECT_TRUE(bit_equal(h_alone, h_ref));
  double worst = 0;
  for (size_t e = 0; e + 1 < begin.size(); ++e)
    for (int64_t r = begin[e]; r < begin[e + 1]; ++r)
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t k = 0; k < K; ++k) {
          g += double(x.f32()[r * K + k]) * w[e].f32()[i * K + k];
          u += double(x.f32()[r * K + k]) * w[4 + e].f32()[i * K + k];
        }
        const double want = g / (1.0 + std::exp(-g)) * u;
        worst = std::max(worst, std::abs(want - h.f32()[r * I + i]) / (1.0 + std::abs(want)));
      }
  EXPECT_LT(worst, 1e-5);
  Tensor wrong = Tensor::empty({R, I + 1});
  EXPECT_THROW(cpu().grouped_swiglu(h, &wrong, nullptr, x, gw, uw, begin), Error);
}

// grouped_weight_grad (the routed experts' dW += dy_g^T x_g) on the CPU: the base class's loop,
// bit for bit one matmul(dw[g], dy_g, x_g, true, false, 1, 1) per group with a gradient and rows,
// and within 1e-4 of a scalar double loop (so the reference is not only the same calls). dw starts
// from random values (the op adds). A null dw (a frozen expert) is skipped even with rows; an
// empty group's dw is left bit for bit; empty groups lead, sit in the middle and trail.
TEST(MoeOps, GroupedWeightGradEqualsOneMatmulPerGroup) {
  std::mt19937_64 rng(17);
  const int64_t N = 9, K = 13;
  const std::vector<int64_t> sizes{0, 5, 0, 1, 12, 7, 0, 3, 0};
  const std::vector<int64_t> begin = offsets(sizes);
  const int64_t R = begin.back(), G = int64_t(sizes.size());
  const Tensor dy = randn({R, N}, rng), x = randn({R, K}, rng);
  std::vector<Tensor> dw0, dw, ref;
  for (int64_t g = 0; g < G; ++g) {
    dw0.push_back(randn({N, K}, rng));
    dw.push_back(dw0.back().clone());
    ref.push_back(dw0.back().clone());
  }
  std::vector<Tensor*> dwp;
  for (Tensor& t : dw) dwp.push_back(&t);
  dwp[5] = nullptr;  // frozen, with rows
  dwp[6] = nullptr;  // frozen, empty
  cpu().grouped_weight_grad(dwp, dy, x, begin);
  for (int64_t g = 0; g < G; ++g) {
    const size_t i = size_t(g);
    if (!dwp[i]) continue;  // not passed to the op
    if (sizes[i] > 0)
      cpu().matmul(ref[i], dy.slice(begin[i], begin[i + 1]), x.slice(begin[i], begin[i + 1]), true,
                   false, 1.0f, 1.0f);
    EXPECT_TRUE(bit_equal(dw[i], ref[i])) << "group " << g;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        double s = dw0[i].f32()[n * K + k];
        for (int64_t r = begin[i]; r < begin[i + 1]; ++r)
          s += double(dy.f32()[r * N + n]) * double(x.f32()[r * K + k]);
        ASSERT_NEAR(dw[i].f32()[n * K + k], s, 1e-4)
            << "group " << g << " (" << n << ", " << k << ")";
      }
  }
}

// Shape checks, alike on every backend: offsets must tile dy's rows (one more than the groups, no
// decrease), x must have dy's rows, and every gradient given (rows or not) must be F32 [N, K].
// The CPU takes no BF16 operand.
TEST(MoeOps, GroupedWeightGradChecksArguments) {
  const Tensor dy = Tensor::zeros({4, 2}), x = Tensor::zeros({4, 3});
  Tensor w = Tensor::zeros({2, 3}), w2 = Tensor::zeros({2, 3}), wt = Tensor::zeros({3, 2});
  Tensor w16 = Tensor::zeros({2, 3}, DType::BF16);
  Tensor* ok[] = {&w, &w2};
  const std::vector<int64_t> fine{0, 1, 4}, idle{0, 0, 4}, short_rows{0, 1, 3}, decreasing{0, 3, 2},
      too_few{0, 4};
  EXPECT_NO_THROW(cpu().grouped_weight_grad(ok, dy, x, fine));
  EXPECT_THROW(cpu().grouped_weight_grad(ok, dy, x, short_rows), Error);
  EXPECT_THROW(cpu().grouped_weight_grad(ok, dy, x, decreasing), Error);
  EXPECT_THROW(cpu().grouped_weight_grad(ok, dy, x, too_few), Error);
  EXPECT_THROW(cpu().grouped_weight_grad(ok, dy, Tensor::zeros({3, 3}), fine), Error);
  Tensor* transposed[] = {&w, &wt};
  EXPECT_THROW(cpu().grouped_weight_grad(transposed, dy, x, fine), Error);
  Tensor* idle_transposed[] = {&wt, &w};  // group 0 has no rows, but its gradient is wrong
  EXPECT_THROW(cpu().grouped_weight_grad(idle_transposed, dy, x, idle), Error);
  Tensor* bf16_grad[] = {&w16, nullptr};
  EXPECT_THROW(cpu().grouped_weight_grad(bf16_grad, dy, x, fine), Error);
  Tensor* none[] = {nullptr, nullptr};
  EXPECT_NO_THROW(cpu().grouped_weight_grad(none, dy, x, fine));
  EXPECT_THROW(cpu().grouped_weight_grad(ok, Tensor::zeros({4, 2}, DType::BF16), x, fine), Error);
}

// The CPU backend computes in fp32 only (supports() says no to BF16): every op with a bf16
// activation variant on CUDA refuses a BF16 operand in one line that names the op, rather than
// reading bf16 bits as floats.
TEST(MoeOps, CpuRefusesBf16Activations) {
  auto expect_refused = [](const char* op, const std::function<void()>& f) {
    try {
      f();
      ADD_FAILURE() << op << " accepted a BF16 operand";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::string("CPU ") + op), std::string::npos) << msg;
      EXPECT_NE(msg.find("BF16"), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  };
  for (Op op : {Op::GatherRows, Op::GroupedMatmul, Op::SwiGLU, Op::Matmul, Op::ScatterAddRows})
    EXPECT_FALSE(cpu().supports(op, DType::BF16));
  const Tensor x = Tensor::zeros({4, 3}), x16 = Tensor::zeros({4, 3}, DType::BF16);
  const Tensor rows = Tensor::zeros({4}, DType::I32);
  Tensor out16 = Tensor::zeros({4, 3}, DType::BF16), out = Tensor::zeros({4, 3});
  expect_refused("gather_rows", [&] { cpu().gather_rows(out16, x, rows, nullptr); });
  expect_refused("scatter_add_rows", [&] { cpu().scatter_add_rows(out, x16, rows, nullptr); });
  expect_refused("gather_rows", [&] { cpu().gather_rows(out, x16, rows, nullptr); });
  expect_refused("swiglu_forward", [&] { cpu().swiglu_forward(out16, x16, x16); });
  Tensor d16 = Tensor::zeros({4, 3}, DType::BF16);
  expect_refused("swiglu_backward", [&] { cpu().swiglu_backward(d16, out16, x, x16, x16); });
  const Tensor w = Tensor::zeros({3, 3});
  const Tensor* wp[] = {&w};
  const std::vector<int64_t> begin{0, 4};
  expect_refused("grouped_matmul", [&] { cpu().grouped_matmul(out, x16, wp, begin, true, 0.0f); });
  Tensor g = Tensor::zeros({3, 3});
  expect_refused("matmul", [&] { cpu().matmul(g, x16, x16, true, false, 1.0f, 1.0f); });
}

// One SwiGLU expert applied to the token row xt (H values), in double: down(silu(gate xt) * up xt).
std::vector<double> swiglu_reference(const ExpertWeights& e, const float* xt, int64_t H) {
  const int64_t I = e.gate_proj->dim(0);
  std::vector<double> h(static_cast<size_t>(I)), out(static_cast<size_t>(H), 0.0);
  for (int64_t i = 0; i < I; ++i) {
    double g = 0.0, u = 0.0;
    for (int64_t c = 0; c < H; ++c) {
      g += double(e.gate_proj->f32()[i * H + c]) * double(xt[c]);
      u += double(e.up_proj->f32()[i * H + c]) * double(xt[c]);
    }
    h[size_t(i)] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int64_t j = 0; j < H; ++j)
    for (int64_t i = 0; i < I; ++i)
      out[size_t(j)] += double(e.down_proj->f32()[j * I + i]) * h[size_t(i)];
  return out;
}

// The routed experts of T tokens (y[t] = sum_k w[t,k] down_e(silu(gate_e x_t) * up_e x_t)), plus
// the shared experts' SwiGLU with weight 1 when given, in double, from the definition.
Tensor experts_reference(const Tensor& x, const Tensor& idx, const Tensor& w,
                         const std::vector<ExpertWeights>& experts,
                         const ExpertWeights* shared = nullptr) {
  const int64_t T = x.dim(0), H = x.dim(1), K = idx.dim(1);
  Tensor y = Tensor::zeros({T, H});
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> acc(static_cast<size_t>(H), 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const std::vector<double> d =
          swiglu_reference(experts[size_t(idx.i32()[t * K + k])], x.f32() + t * H, H);
      for (int64_t j = 0; j < H; ++j) acc[size_t(j)] += double(w.f32()[t * K + k]) * d[size_t(j)];
    }
    if (shared) {
      const std::vector<double> d = swiglu_reference(*shared, x.f32() + t * H, H);
      for (int64_t j = 0; j < H; ++j) acc[size_t(j)] += d[size_t(j)];
    }
    for (int64_t j = 0; j < H; ++j) y.f32()[t * H + j] = float(acc[size_t(j)]);
  }
  return y;
}

// max |y - (ref + y0 when accumulating)| / max |that|.
double rel_diff_to(const Tensor& y, const Tensor& ref, const Tensor& y0, bool accumulate) {
  double diff = 0.0, scale = 0.0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double r = double(ref.f32()[i]) + (accumulate ? double(y0.f32()[i]) : 0.0);
    diff = std::max(diff, std::abs(double(y.f32()[i]) - r));
    scale = std::max(scale, std::abs(r));
  }
  return diff / scale;
}

// E experts' gate [I, H], up [I, H] and down [H, I] weights, N(0, 1), kept in `store` (reserved
// up front, so the returned pointers stay valid).
std::vector<ExpertWeights> random_experts(std::vector<Tensor>& store, int64_t E, int64_t H,
                                          int64_t I, std::mt19937_64& rng) {
  store.reserve(size_t(3 * E));
  for (int64_t e = 0; e < E; ++e) {
    store.push_back(randn({I, H}, rng));
    store.push_back(randn({I, H}, rng));
    store.push_back(randn({H, I}, rng));
  }
  std::vector<ExpertWeights> experts;
  for (int64_t e = 0; e < E; ++e)
    experts.push_back(
        {&store[size_t(3 * e)], &store[size_t(3 * e + 1)], &store[size_t(3 * e + 2)]});
  return experts;
}

// One token (decode) and three tokens that share experts, K = 6 of 9 experts, odd H and I; with
// and without accumulation into y. Tolerance: fp32 dot products of <= 37 terms against double,
// ~1e-6 of the largest value; 1e-5 normwise leaves a margin, a wrong expert or weight is O(1).
// swiglu_scaled_backward against its definition in double: dgate and dup are SwiGLU's gradients
// of dh = scale[r] * dout (as swiglu_backward gives them), dscale[r] = sum_i dout * silu(g) * u.
TEST(MoeOps, SwigluScaledBackwardIsTheScaledSwigluBackward) {
  std::mt19937_64 rng(41);
  const int64_t R = 9, I = 13;
  const Tensor gate = randn({R, I}, rng), up = randn({R, I}, rng), dout = randn({R, I}, rng);
  const Tensor scale = randn({R}, rng);
  Tensor dgate = Tensor::empty({R, I}), dup = Tensor::empty({R, I}), dscale = Tensor::empty({R});
  cpu().swiglu_scaled_backward(dgate, dup, dscale, dout, gate, up, scale);
  Tensor dh = Tensor::empty({R, I}), eg = Tensor::empty({R, I}), eu = Tensor::empty({R, I});
  for (int64_t i = 0; i < dh.numel(); ++i) dh.f32()[i] = scale.f32()[i / I] * dout.f32()[i];
  cpu().swiglu_backward(eg, eu, dh, gate, up);
  EXPECT_TRUE(bit_equal(dgate, eg));
  EXPECT_TRUE(bit_equal(dup, eu));
  for (int64_t r = 0; r < R; ++r) {
    double want = 0.0;
    for (int64_t i = r * I; i < (r + 1) * I; ++i) {
      const double g = gate.f32()[i];
      want += double(dout.f32()[i]) * g / (1.0 + std::exp(-g)) * double(up.f32()[i]);
    }
    EXPECT_NEAR(dscale.f32()[r], want, 1e-5 * (1.0 + std::abs(want))) << "row " << r;
  }
  Tensor bad = Tensor::empty({R + 1});
  EXPECT_THROW(cpu().swiglu_scaled_backward(dgate, dup, bad, dout, gate, up, scale), Error);
}

TEST(MoeOps, ExpertsSmallEqualsTheSwigluFormula) {
  std::mt19937_64 rng(13);
  const int64_t E = 9, K = 6, H = 37, I = 23;
  std::vector<Tensor> store;
  const std::vector<ExpertWeights> experts = random_experts(store, E, H, I, rng);
  for (int64_t T : {1, 3})
    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(testing::Message() << "T " << T << " accumulate " << accumulate);
      Tensor x = randn({T, H}, rng), w = randn({T, K}, rng);
      Tensor idx = Tensor::empty({T, K}, DType::I32);
      for (int64_t t = 0; t < T; ++t)  // distinct within a token, shifted by 2 per token: shared
        for (int64_t k = 0; k < K; ++k) idx.i32()[t * K + k] = int32_t((2 * t + 5 * k) % E);
      Tensor y0 = randn({T, H}, rng), y = y0.clone();
      cpu().moe_experts_small(y, x, idx, w, experts, accumulate);
      EXPECT_LE(rel_diff_to(y, experts_reference(x, idx, w, experts), y0, accumulate), 1e-5);
    }
}

// The shared experts folded in (y[t] (+)= routed sum + shared SwiGLU at weight 1), with their own
// width Is = 31 != I = 23 (and Is = 8, narrower than I), odd H; one token and four; K = 6 and
// K = 1; accumulate on and off. Same tolerance as above: fp32 dot products of <= 37 terms against
// double. Then the op without shared experts must be the routed part alone (the shared term is
// only added when asked for), and the two must differ by exactly the shared SwiGLU's order of
// magnitude (a shared term dropped or doubled is O(1)).
TEST(MoeOps, ExpertsSmallWithSharedExpertsEqualsTheFormula) {
  std::mt19937_64 rng(29);
  const int64_t E = 9, H = 37, I = 23;
  std::vector<Tensor> store;
  const std::vector<ExpertWeights> experts = random_experts(store, E, H, I, rng);
  for (int64_t Is : {31, 8}) {
    const Tensor sg = randn({Is, H}, rng), su = randn({Is, H}, rng), sd = randn({H, Is}, rng);
    const ExpertWeights shared{&sg, &su, &sd};
    for (int64_t K : {6, 1})
      for (int64_t T : {1, 4})
        for (bool accumulate : {false, true}) {
          SCOPED_TRACE(testing::Message()
                       << "Is " << Is << " K " << K << " T " << T << " accumulate " << accumulate);
          Tensor x = randn({T, H}, rng), w = randn({T, K}, rng);
          Tensor idx = Tensor::empty({T, K}, DType::I32);
          for (int64_t t = 0; t < T; ++t)
            for (int64_t k = 0; k < K; ++k) idx.i32()[t * K + k] = int32_t((3 * t + 5 * k) % E);
          const Tensor y0 = randn({T, H}, rng);
          Tensor y = y0.clone();
          cpu().moe_experts_small(y, x, idx, w, experts, accumulate, &shared);
          const Tensor ref = experts_reference(x, idx, w, experts, &shared);
          EXPECT_LE(rel_diff_to(y, ref, y0, accumulate), 1e-5);
          Tensor routed = y0.clone();
          cpu().moe_experts_small(routed, x, idx, w, experts, accumulate);
          EXPECT_LE(rel_diff_to(routed, experts_reference(x, idx, w, experts), y0, accumulate),
                    1e-5);
          EXPECT_GT(rel_diff_to(routed, ref, y0, accumulate), 1e-2) << "shared term missing";
        }
  }
}

TEST(MoeOps, ExpertsSmallChecksArguments) {
  Tensor g = Tensor::zeros({4, 3}), u = Tensor::zeros({4, 3}), d = Tensor::zeros({3, 4});
  Tensor bad_down = Tensor::zeros({4, 3});
  const std::vector<ExpertWeights> ok{{&g, &u, &d}, {&g, &u, &d}};
  const std::vector<ExpertWeights> wrong{{&g, &u, &d}, {&g, &u, &bad_down}};
  Tensor x = Tensor::zeros({2, 3}), y = Tensor::zeros({2, 3}), w = Tensor::zeros({2, 2});
  Tensor idx = Tensor::zeros({2, 2}, DType::I32);
  EXPECT_NO_THROW(cpu().moe_experts_small(y, x, idx, w, ok, false));
  EXPECT_THROW(cpu().moe_experts_small(y, x, idx, w, wrong, false), Error);
  idx.i32()[3] = 2;  // only experts 0 and 1 exist
  EXPECT_THROW(cpu().moe_experts_small(y, x, idx, w, ok, false), Error);
}

// The shared experts' shapes: gate and up [Is, H], down [H, Is] with one Is (any Is, not the
// routed I) and the routed experts' dtype; a mismatch or a missing weight is a one-line error
// naming the shared experts.
TEST(MoeOps, ExpertsSmallChecksTheSharedExperts) {
  Tensor g = Tensor::zeros({4, 3}), u = Tensor::zeros({4, 3}), d = Tensor::zeros({3, 4});
  const std::vector<ExpertWeights> routed{{&g, &u, &d}, {&g, &u, &d}};
  Tensor x = Tensor::zeros({2, 3}), y = Tensor::zeros({2, 3}), w = Tensor::zeros({2, 2});
  Tensor idx = Tensor::zeros({2, 2}, DType::I32);
  Tensor sg = Tensor::zeros({5, 3}), su = Tensor::zeros({5, 3}), sd = Tensor::zeros({3, 5});
  Tensor su_bad = Tensor::zeros({4, 3}), sd_bad = Tensor::zeros({5, 3});
  const ExpertWeights ok{&sg, &su, &sd};
  EXPECT_NO_THROW(cpu().moe_experts_small(y, x, idx, w, routed, false, &ok));
  auto expect_error = [&](const ExpertWeights& shared, const std::string& what) {
    try {
      cpu().moe_experts_small(y, x, idx, w, routed, false, &shared);
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("shared experts"), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << "not one line: " << m;
    }
  };
  expect_error({&sg, &su_bad, &sd}, "up [4, 3] next to gate [5, 3]");
  expect_error({&sg, &su, &sd_bad}, "down [5, 3]");
  expect_error({&sg, &su, nullptr}, "a missing down");
  const Tensor sd16 = sd.to_dtype(DType::BF16);
  expect_error({&sg, &su, &sd16}, "a bf16 down next to fp32 routed experts");
}

}  // namespace
}  // namespace moekit
