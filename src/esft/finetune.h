// Fine-tuning on chat data (messages rows) in the official ESFT recipe (esft.md §4): ESFT-format
// samples with loss on the assistant part only, packed to the sequence length (a random 0.2 of
// joins drop the next sample's bos), 98/2 train/validation split, AdamW at a constant LR.
// `esft` trains only the chosen routed experts (+ shared / non-expert modules when the config
// says so): every other parameter has no gradient buffer, no optimizer state and no
// weight-gradient GEMM. `full` trains everything. The ESFT output is an adapter: the expert
// config and the trained tensors under their checkpoint names.
#pragma once

#include <filesystem>
#include <string>

#include "esft/expert_config.h"
#include "model/deepseek.h"
#include "tokenizer/tokenizer.h"

namespace moekit {

struct FinetuneOptions {
  std::filesystem::path model, data, experts, out, tokenizer;
  std::string method = "esft";                                    // esft | full
  int64_t steps = 500, seq = 4096, batch = 1, accumulation = 16;  // base.yaml (per device)
  double lr = 1e-5, weight_decay = 0.1, grad_clip = 1.0, random_concat_ratio = 0.2;
  uint64_t seed = 5934875;  // base.yaml
  int64_t log_every = 10;
  Device device = Device::CPU;            // where the model, gradients and AdamW state live
  DType weights = DType::F32;             // BF16: frozen matrices in bf16 (CUDA; ParamTable)
  bool activation_checkpointing = false;  // recompute each layer in backward (DeepSeekModel)
  bool recompute_experts = false;         // recompute the MoE experts' gate/up in backward
};

struct FinetuneResult {
  int64_t trainable_params = 0, total_params = 0;
  size_t grad_bytes = 0, optimizer_bytes = 0;
  double first_loss = 0, last_loss = 0, val_loss = 0, step_seconds = 0;
};

// Which parameters train under an expert config; validates layers and experts against the model
// (errors name `source`).
void apply_expert_config(DeepSeekModel& model, const ExpertConfig& cfg, const std::string& source);

// Loads the base, applies the method, trains and writes the adapter (esft) or checkpoint (full)
// plus OUT/finetune.json with the run's figures.
FinetuneResult finetune(const FinetuneOptions& opt);

// The training loop alone, on a model whose trainable set is already chosen (tests use it to
// compare every tensor before and after).
FinetuneResult finetune_model(DeepSeekModel& model, const Tokenizer& tok,
                              const FinetuneOptions& opt);

}  // namespace moekit
