// MoE forward/backward: route, permute, experts, combine.
#include "nn/moe.h"

#include <fmt/format.h>

namespace moekit {

DispatchPlan make_dispatch_plan(const Routing& r, int64_t n_experts) {
  Tensor idx = r.topk_idx.to_host(), w = r.topk_w.to_host();
  const int64_t N = idx.numel(), K = idx.dim(1);
  DispatchPlan plan;
  plan.expert_begin.assign(size_t(n_experts + 1), 0);
  for (int64_t i = 0; i < N; ++i) ++plan.expert_begin[size_t(idx.i32()[i] + 1)];
  for (int64_t e = 0; e < n_experts; ++e)
    plan.expert_begin[size_t(e + 1)] += plan.expert_begin[size_t(e)];
  std::vector<int64_t> cursor(plan.expert_begin.begin(), plan.expert_begin.end() - 1);
  Tensor slot_token = Tensor::empty({N}, DType::I32), slot_weight = Tensor::empty({N});
  plan.slot_pair.resize(size_t(N));
  for (int64_t i = 0; i < N; ++i) {  // counting sort: stable, so tokens stay in order per expert
    int64_t s = cursor[size_t(idx.i32()[i])]++;
    slot_token.i32()[s] = int32_t(i / K);
    slot_weight.f32()[s] = w.f32()[i];
    plan.slot_pair[size_t(s)] = int32_t(i);
  }
  plan.slot_token = slot_token.to_device(r.topk_idx.device());
  plan.slot_weight = slot_weight.to_device(r.topk_idx.device());
  return plan;
}

MoE MoE::create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                Device device) {
  MoE m;
  m.gate = Router::create(params, prefix + ".gate", c, device);
  for (int64_t e = 0; e < c.n_routed_experts; ++e)
    m.routed_experts.push_back(MLP::create(params, fmt::format("{}.experts.{}", prefix, e),
                                           c.hidden_size, c.moe_intermediate_size, device));
  m.has_shared = c.n_shared_experts > 0;
  if (m.has_shared)
    m.shared_experts = MLP::create(params, prefix + ".shared_experts", c.hidden_size,
                                   c.n_shared_experts * c.moe_intermediate_size, device);
  return m;
}

Tensor MoE::forward(Backend& be, const Tensor& x) {
  const int64_t T = x.dim(0), H = x.dim(1), E = int64_t(routed_experts.size());
  const Device dev = x.device();
  Routing r = gate.forward(be, x);        // route
  saved.plan = make_dispatch_plan(r, E);  // permute: plan
  const auto& begin = saved.plan.expert_begin;
  const int64_t N = begin.back();
  Tensor xs = Tensor::empty({N, H}, DType::F32, dev);
  be.gather_rows(xs, x, saved.plan.slot_token, nullptr);  // permute: move rows
  saved.x = x;
  saved.expert_out = Tensor::empty({N, H}, DType::F32, dev);
  expert_load.assign(size_t(E), 0);
  for (int64_t e = 0; e < E; ++e) {  // experts
    int64_t b = begin[size_t(e)], n = begin[size_t(e + 1)] - b;
    expert_load[size_t(e)] = n;
    if (n == 0) continue;
    Tensor ye = routed_experts[size_t(e)].forward(be, xs.slice(b, b + n));
    Tensor dst = saved.expert_out.slice(b, b + n);
    dst.copy_from(ye);
  }
  Tensor y = has_shared ? shared_experts.forward(be, x) : Tensor::zeros({T, H}, DType::F32, dev);
  be.scatter_add_rows(y, saved.expert_out, saved.plan.slot_token,
                      &saved.plan.slot_weight);  // combine
  return y;
}

void MoE::backward(Backend& be, Tensor& dx, const Tensor& dy, bool accumulate) {
  const int64_t T = dy.dim(0), H = dy.dim(1), E = int64_t(routed_experts.size());
  const int64_t K = gate.p.top_k;
  const Device dev = dy.device();
  const auto& plan = saved.plan;
  const int64_t N = plan.expert_begin.back();

  // Combine weights: dL/dw of slot s = dy[token(s)] . expert_out[s]; back to [T, K] order.
  Tensor dw_slot = Tensor::empty({N}, DType::F32, dev);
  be.row_dot(dw_slot, dy, plan.slot_token, saved.expert_out);
  Tensor dw_host = dw_slot.to_host(), dtopk = Tensor::empty({T, K});
  for (int64_t s = 0; s < N; ++s) dtopk.f32()[plan.slot_pair[size_t(s)]] = dw_host.f32()[s];

  // Unpermute's backward is a weighted gather; experts run backward on their row ranges.
  Tensor dys = Tensor::empty({N, H}, DType::F32, dev), dxs = Tensor::empty({N, H}, DType::F32, dev);
  be.gather_rows(dys, dy, plan.slot_token, &plan.slot_weight);
  for (int64_t e = 0; e < E; ++e) {
    int64_t b = plan.expert_begin[size_t(e)], n = plan.expert_begin[size_t(e + 1)] - b;
    if (n == 0) continue;
    Tensor dxe = dxs.slice(b, b + n);
    routed_experts[size_t(e)].backward(be, dxe, dys.slice(b, b + n), false);
  }
  if (has_shared) {
    shared_experts.backward(be, dx, dy, accumulate);
  } else if (!accumulate) {
    be.fill(dx, 0.0f);
  }
  be.scatter_add_rows(dx, dxs, plan.slot_token, nullptr);
  gate.backward(be, dx, dtopk.to_device(dev));
}

}  // namespace moekit
