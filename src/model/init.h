// Random-initialised Hugging Face checkpoints of any size (`moekit init`). The tensors are those of
// checkpoint_layout, generated and written one bounded chunk at a time, so memory stays small
// however large the model. Each value depends only on (seed, tensor name, element index): a
// counter-based generator, so chunking, threads and tensor order never change the bytes.
// Shards follow transformers' save_pretrained: greedy in model order up to the shard size,
// model-0000i-of-0000n.safetensors plus model.safetensors.index.json, or one model.safetensors.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "model/config.h"

namespace moekit {

inline constexpr uint64_t kDefaultShardBytes = 5'000'000'000;  // transformers' "5GB"

struct InitOptions {
  DType dtype = DType::BF16;  // BF16 or F32
  uint64_t seed = 0;
  uint64_t shard_bytes = kDefaultShardBytes;  // largest shard before starting another
  std::string tokenizer_json;                 // written as tokenizer.json when not empty
};

struct InitShard {
  std::string file;             // model.safetensors or model-0000i-of-0000n.safetensors
  std::vector<size_t> tensors;  // indices into InitPlan::tensors, in file order
  std::string header;           // safetensors length + JSON header
  uint64_t bytes = 0;           // size of the file
};

struct InitPlan {
  ModelConfig config;  // as written: torch_dtype follows options.dtype
  InitOptions options;
  std::vector<CheckpointTensor> tensors;
  std::vector<InitShard> shards;
  std::string index_json;    // empty unless sharded
  std::string config_json;   // config.json text
  int64_t params = 0;        // parameters, buffers excluded (as summarize counts)
  uint64_t data_bytes = 0;   // tensor bytes (the index's total_size)
  uint64_t total_bytes = 0;  // every file written
};

// Lays out the checkpoint; allocates no weights.
InitPlan plan_init(const ModelConfig& config, const InitOptions& options);

// Refuses (Error naming `dir`) a target that is not a directory, already holds a checkpoint, or
// lacks the free space the plan needs. Creates nothing.
void check_init_target(const InitPlan& plan, const std::filesystem::path& dir);

// Writes the plan into `dir` (created when absent): shards, each atomically, then the index,
// tokenizer.json and config.json last. On failure removes what it wrote and rethrows.
void write_init(const InitPlan& plan, const std::filesystem::path& dir, bool show_progress);

// Fills a model's parameters in place with the values `moekit init` would write for its config
// and `seed` (before the checkpoint dtype's rounding), in bounded chunks and in parallel: a large
// model (benchmarks of full-size configs) starts without a checkpoint on disk.
void init_weights(DeepSeekModel& model, uint64_t seed);

// The generator key of tensor `name` under `seed`.
uint64_t init_key(const std::string& name, uint64_t seed);
// out[k] = std * N(0,1) value number begin + k of the stream `key`, for k in [0, count).
void normal_fill(float* out, uint64_t key, int64_t begin, int64_t count, float std);

}  // namespace moekit
