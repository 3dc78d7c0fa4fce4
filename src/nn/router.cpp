// Router forward/backward.
#include "nn/router.h"

#include "nn/linear.h"

namespace moekit {

Router Router::create(ParamTable& params, const std::string& prefix, const ModelConfig& c,
                      Device device) {
  Router r;
  r.p = c.gate_params();
  r.weight = params.add(prefix + ".weight", {c.n_routed_experts, c.hidden_size}, device);
  r.balance_bias = params.add(prefix + ".e_score_correction_bias", {c.n_routed_experts}, device,
                              /*buffer=*/true);
  return r;
}

Routing Router::forward(Backend& be, const Tensor& x) {
  const int64_t T = x.dim(0), E = p.n_experts, K = p.top_k;
  const Device dev = x.device();
  Tensor logits = Tensor::empty({T, E}, DType::F32, dev);
  // Under Bf16 the gating GEMM runs in bf16 like every other (logits and routing in fp32); x is
  // rounded once for it and the weight gradient, or comes rounded from the MoE layer, which shares
  // the copy with the shared experts (nn/linear.h).
  const Tensor xg = gemm_input(be, x);
  linear_forward(be, logits, xg, *weight);
  Routing r{Tensor::empty({T, K}, DType::I32, dev), Tensor::empty({T, K}, DType::F32, dev),
            Tensor::empty({T, E}, DType::F32, dev)};
  be.moe_gate_forward(r.topk_idx, r.topk_w, r.scores, logits, balance_bias->value, p);
  saved.x = xg;
  saved.routing = r;
  saved.daux_scores = Tensor();
  aux_loss = 0.0;
  if (aux_alpha > 0.0f) compute_aux_loss(T);
  return r;
}

void Router::compute_aux_loss(int64_t T) {
  // Host-side: E*T is small next to the GEMMs. f_i is a count, so it carries no gradient.
  // P_i averages the token's affinities over experts: softmax scores as they are (V2), sigmoid
  // scores normalised per token, s'_i = s_i / sum_j s_j (V3). Without that normalisation the
  // loss falls by lowering every sigmoid score at once, which does not move tokens between
  // experts at all.
  const int64_t E = p.n_experts, K = p.top_k;
  const Tensor idx = saved.routing.topk_idx.to_host(), scores = saved.routing.scores.to_host();
  const bool normalise = p.scoring == ScoringFunc::Sigmoid;
  std::vector<double> f(size_t(E), 0.0);
  for (int64_t i = 0; i < T * K; ++i) f[size_t(idx.i32()[i])] += double(E) / double(K * T);
  Tensor d = Tensor::empty({T, E});
  for (int64_t t = 0; t < T; ++t) {
    const float* s = scores.f32() + t * E;
    double sum = 0.0, fs = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      sum += s[e];
      fs += f[size_t(e)] * s[e];
    }
    const double z = normalise ? sum : 1.0;
    aux_loss += aux_alpha * fs / z / double(T);
    for (int64_t e = 0; e < E; ++e) {
      // d/ds_e of alpha/T * sum_i f_i s_i / z, with z = sum_j s_j when normalising.
      double g = f[size_t(e)] / z - (normalise ? fs / (z * z) : 0.0);
      d.f32()[t * E + e] = float(aux_alpha * g / double(T));
    }
  }
  saved.daux_scores = d.to_device(saved.x.device());
}

void Router::backward(Backend& be, Tensor& dx, const Tensor& dtopk_w) {
  const int64_t T = dtopk_w.dim(0);
  Tensor dlogits = Tensor::empty({T, p.n_experts}, DType::F32, dtopk_w.device());
  be.moe_gate_backward(dlogits, dtopk_w, saved.routing.topk_idx, saved.routing.scores,
                       saved.daux_scores, p);
  linear_backward(be, dx, *weight, dlogits, saved.x, true);
}

}  // namespace moekit
