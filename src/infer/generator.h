// Generator: autoregressive decoding over the MLA latent cache with greedy or
// temperature/top-k/top-p sampling, stopping at EOS or a token budget, with a callback per token
// (the CLI streams text from it). A prompt runs as one batch (GEMMs over the known length); each
// later token is a decode step that reads its position from device memory, so on a GPU the step
// is recorded once as a CUDA graph and replayed (one launch per token instead of hundreds).
#pragma once

#include <functional>
#include <memory>
#include <random>
#include <string>
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

// Picks the next token from host logits [vocab]: the largest at temperature 0, else sample_row's
// rule (Backend::sample, ops/ops.h) with one uniform draw from rng, the draw generate makes.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p,
                     std::mt19937_64& rng);

// The model's weights must stay where they are while a Generator lives: its recorded decode step
// holds their addresses.
class Generator {
 public:
  Generator(DeepSeekModel& model, int64_t max_context);

  // Runs `ids` (appended after what is cached) and returns the logits of the last one [1, vocab].
  Tensor feed(const std::vector<int32_t>& ids);
  // Prompt in, new tokens out; on_token may return false to stop early.
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const SamplingParams& p,
                                const std::function<bool(int32_t)>& on_token = nullptr);
  const KVCache& cache() const { return cache_; }
  void reset() { cache_.length = 0; }
  // Whether decode steps replay a recorded graph (false on the CPU, with MOEKIT_CUDA_GRAPHS=0 or
  // while profiling); known after the first step.
  bool replays_steps() const { return step_graph_ != nullptr; }
  // Why the decode step could not be recorded (the recording's error), when it was tried and
  // failed: the steps then run op by op (slower, same result). Empty otherwise.
  const std::string& unrecorded_reason() const { return unrecorded_reason_; }

 private:
  // The decoder layers over x [n, hidden] with `attend(layer, normed x, x)` as attention, which
  // adds its output to x in place (the step path's o_proj GEMM accumulates into it), then the
  // final norm and LM head of the last row into logits [1, vocab]. x must be the caller's fresh
  // tensor: it is overwritten.
  void decode(Tensor x, const std::function<void(size_t, const Tensor&, Tensor&)>& attend,
              Tensor& logits);
  // Many tokens at known positions (a prompt): GEMMs over the cached length.
  Tensor feed_batch(const std::vector<int32_t>& ids);
  // One token: the step's logits (the same tensor every step, overwritten by the next one).
  const Tensor& step(int32_t id);
  void step_body();

  DeepSeekModel& model_;
  KVCache cache_;
  RopeTable rope_;
  Tensor step_input_;   // device I32 [2]: the step's token id and position
  Tensor step_logits_;  // [1, vocab]
  std::unique_ptr<CapturedWork> step_graph_;
  std::string unrecorded_reason_;
  bool step_recorded_ = false;  // a record was attempted (null graph: run steps eagerly)
};

}  // namespace moekit
