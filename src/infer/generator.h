// Generator: autoregressive decoding over the MLA latent cache with greedy or
// temperature/top-k/top-p sampling, stopping at EOS or a token budget, with a callback per token
// (the CLI streams text from it).
#pragma once

#include <functional>
#include <random>
#include <vector>

#include "infer/kv_cache.h"
#include "model/deepseek.h"

namespace moekit {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int64_t top_k = 0;         // 0 = all
  float top_p = 1.0f;
  uint64_t seed = 0;
  int64_t max_tokens = 64;
  std::vector<int32_t> stop_ids;  // EOS and friends
  // Only ids below this are sampled (0 = the whole output layer): a checkpoint's vocabulary is
  // often padded beyond its tokenizer's, and an untrained model may pick a padding row.
  int64_t allowed_vocab = 0;
};

// Picks the next token from logits [vocab].
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p,
                     std::mt19937_64& rng);

class Generator {
 public:
  Generator(DeepSeekModel& model, int64_t max_context);

  // Runs `ids` (appended after what is cached) and returns the logits of the last one [vocab].
  Tensor feed(const std::vector<int32_t>& ids);
  // Prompt in, new tokens out; on_token may return false to stop early.
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const SamplingParams& p,
                                const std::function<bool(int32_t)>& on_token = nullptr);
  const KVCache& cache() const { return cache_; }
  void reset() { cache_.length = 0; }

 private:
  DeepSeekModel& model_;
  KVCache cache_;
  RopeTable rope_;
};

}  // namespace moekit
