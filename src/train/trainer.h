// Pretraining loop: AdamW + schedule, Loss-Free Balancing / aux-loss / no balancing, metrics,
// validation, atomic checkpoints and exact resume. Used by `moekit train` and `moekit demo`.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "model/config.h"
#include "train/balance.h"

namespace moekit {

struct TrainOptions {
  std::filesystem::path config_file;  // model config.json (vocab_size follows the tokenizer)
  std::filesystem::path data_dir;     // train.jsonl, val.jsonl (scripts/corpus layout)
  std::filesystem::path tokenizer;    // default: data_dir/tokenizer.json
  std::filesystem::path out;          // RUN directory
  int64_t steps = 100;
  uint64_t seed = 0;
  Balance balance = Balance::LossFree;
  double lfb_rate = 0.001;  // u in b_i += u * sign(e_i)
  double aux_alpha = 0.01;  // expert-level aux loss coefficient (--balance aux)
  int64_t batch = 8;        // sequences per micro-batch
  int64_t seq = 128;
  int64_t accumulation = 1;  // micro-batches per step
  double lr = 3e-3;
  int64_t warmup = 20;
  std::string schedule = "multistep";  // multistep | cosine | constant
  double weight_decay = 0.1;
  double grad_clip = 1.0;
  int64_t log_every = 10;
  int64_t eval_every = 50;
  int64_t eval_batches = 8;
  int64_t save_every = 50;
  int64_t keep_checkpoints = 3;
  bool resume = false;
  bool activation_checkpointing = false;  // recompute each layer in backward (DeepSeekModel)
  bool recompute_experts = false;         // recompute the MoE experts' gate/up in backward
  bool quiet = false;
  Device device = Device::CPU;  // where weights, gradients, AdamW state and activations live
};

struct TrainResult {
  double final_loss = 0.0, val_loss = 0.0, val_maxvio_global = 0.0, val_maxvio_batch = 0.0;
  double tokens_per_s = 0.0;
  std::filesystem::path final_dir;
};

TrainResult train(const TrainOptions& opt);

}  // namespace moekit
