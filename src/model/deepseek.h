// DeepSeekModel: the DeepSeek-V2/V3 decoder (embedding -> DecoderLayers -> norm -> lm_head),
// forward and backward over one ParamTable. A layer's FFN is a dense SwiGLU MLP for the first
// `first_k_dense_replace` layers and a DeepSeekMoE layer after (architecture.md).
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "model/config.h"
#include "nn/mla.h"
#include "nn/mlp.h"
#include "nn/moe.h"
#include "nn/params.h"
#include "nn/rmsnorm.h"
#include "nn/rope.h"

namespace moekit {

struct DecoderLayer {
  RMSNorm input_layernorm;
  MLA self_attn;
  RMSNorm post_attention_layernorm;
  std::optional<MLP> mlp;  // dense FFN
  std::optional<MoE> moe;  // DeepSeekMoE FFN

  // x [T,H] -> x + attn(norm(x)) -> h + ffn(norm(h)). backward_follows false (inference): an MoE
  // layer keeps nothing for backward (MoE::forward), and the output is written over x's storage
  // (x is consumed: the caller must not read it after).
  Tensor forward(Backend& be, const Tensor& x, const Tensor& positions, const RopeTable& rope,
                 int64_t batch, int64_t seq, bool backward_follows = true);
  // dx from dy (assigns). need_dx false (nothing below the layer trains): only what this layer's
  // weight gradients need runs, and the result is undefined.
  Tensor backward(Backend& be, const Tensor& dy, const RopeTable& rope, bool need_dx = true);
  bool trains() const;
  // Drops every tensor the sublayers saved for backward (activation checkpointing).
  void release_saved();
};

class DeepSeekModel {
 public:
  // `allocate` false builds the layout only (params() names and shapes, no weights; forward and
  // backward must not be called): the one enumeration of checkpoint tensors (checkpoint_layout).
  // `matrix_dtype` BF16 keeps frozen GEMM weights, the embedding and the LM head in bf16
  // (ParamTable; CUDA only).
  DeepSeekModel(const ModelConfig& config, Device device = Device::CPU, bool allocate = true,
                DType matrix_dtype = DType::F32);

  const ModelConfig& config() const { return config_; }
  ParamTable& params() { return params_; }
  const ParamTable& params() const { return params_; }
  std::vector<DecoderLayer>& layers() { return layers_; }
  Device device() const { return device_; }

  // ids I32 [batch*seq] (host or model device) -> logits [batch*seq, vocab] on the model's
  // device. On Device::CUDA every op runs on the GPU; each MoE layer reads its E+1 expert
  // offsets back to size the grouped expert GEMMs. backward_follows false (inference: evaluation,
  // route logging, a prefill): the MoE layers keep nothing for a backward, which then refuses to
  // run, and skip writing what only it would read. logits_dtype BF16 (a backend with bf16 GEMM
  // outputs): the LM head writes the logits rounded, half the bytes (as a bf16 transformers model
  // returns them); backward then takes F32 ones only.
  Tensor forward(const Tensor& ids, int64_t batch, int64_t seq, bool backward_follows = true,
                 DType logits_dtype = DType::F32);
  // Backward from dlogits [batch*seq, vocab]; parameter grads accumulate for trainable params.
  void backward(const Tensor& dlogits);

  // One training micro-step: forward, mean cross-entropy over targets >= 0 (I32 [batch*seq], any
  // device), backward of grad_scale * that mean. The LM head and the loss run over chunks of
  // `chunk_rows` tokens, so the [tokens, vocab] logits (a step's largest tensor) never exist at
  // once. Returns the mean loss (0, with no backward, when no target is valid).
  float loss_and_backward(const Tensor& ids, const Tensor& targets, int64_t batch, int64_t seq,
                          float grad_scale = 1.0f, int64_t chunk_rows = 1024);

  // Activation checkpointing: forward keeps only each layer's input and backward recomputes the
  // layer's forward before its backward (one extra forward per layer, for activation memory of
  // one layer instead of all). The recomputation is exact: routing and every op are
  // deterministic, and nothing (balance bias, weights) changes between forward and backward.
  void set_activation_checkpointing(bool on) { checkpointing_ = on; }
  bool activation_checkpointing() const { return checkpointing_; }
  // Selective recomputation of the MoE layers' routed experts (MoE::recompute_experts): their
  // gate and up projections, the largest per-layer activations left, are recomputed in backward
  // instead of kept (one more gather and two grouped GEMMs per MoE layer). Exact, as above.
  void set_expert_recompute(bool on) {
    for (DecoderLayer& l : layers_)
      if (l.moe) l.moe->recompute_experts = on;
  }

  // Fills parameters with N(0, std) (norm weights 1, biases 0), deterministic in `seed`.
  void init_random(uint64_t seed, float std = 0.02f);

 private:
  ModelConfig config_;
  Device device_;
  ParamTable params_;
  Param* embed_tokens = nullptr;
  std::vector<DecoderLayer> layers_;
  RMSNorm norm_;
  Param* lm_head = nullptr;
  RopeTable rope_;
  // The decoder without the LM head: final-norm hidden states [batch*seq, hidden] (saved) of
  // out_dtype (BF16 only where the LM head's GEMMs alone read them, as rounded: see
  // RMSNorm::gemm_output_dtype), and the backward from their gradient.
  Tensor hidden(const Tensor& ids, int64_t batch, int64_t seq, DType out_dtype,
                bool backward_follows = true);
  void backward_from_hidden(const Tensor& dhidden);
  // The lowest layer with a parameter that trains (layers_.size() when none has one).
  size_t lowest_trained_layer() const;
  // Whether anything below the LM head trains (the final norm, a layer, the embedding): else the
  // LM head's backward computes no input gradient.
  bool decoder_trains() const;

  bool checkpointing_ = false;
  struct Saved {
    Tensor ids, final_hidden, positions;
    std::vector<Tensor> layer_inputs;  // with activation checkpointing
    int64_t batch = 0, seq = 0;
    bool backward_ok = false;  // the last forward was one that a backward may follow
  } saved_;
};

// Next-token targets for ids [batch, seq]: targets[b, s] = ids[b, s+1], -100 at each sequence's
// end (transformers' loss with labels = input_ids).
Tensor shifted_targets(const Tensor& ids, int64_t batch, int64_t seq);

// Mean cross-entropy over targets >= 0; when dlogits is given, fills it with the gradient of that
// mean. targets may be in host memory (copied to the logits' device). *dlogits may share the
// logits' storage (in place: the loss is taken first, and each row's gradient is written after
// that row is read), which saves a [tokens, vocab] buffer, the largest of a training step.
float cross_entropy(Backend& be, const Tensor& logits, const Tensor& targets,
                    Tensor* dlogits = nullptr);

}  // namespace moekit
