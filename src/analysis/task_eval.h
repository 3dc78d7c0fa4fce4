// Evaluation harness for specialisation: exact-match accuracy of greedy answers to task prompts
// (in the ESFT prompt format) and general retention as loss on a corpus split.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "esft/tasks.h"
#include "model/deepseek.h"
#include "tokenizer/tokenizer.h"

namespace moekit {

struct TaskAccuracy {
  int64_t correct = 0, total = 0;
  double accuracy() const { return total ? double(correct) / double(total) : 0.0; }
  std::vector<std::pair<std::string, std::string>> samples;  // (prompt, answer) of the first few
};

// Greedy decoding of each item's answer after esft_prompt(user); an answer is correct when the
// generated text, trimmed, equals one of item.answers.
TaskAccuracy evaluate_task(DeepSeekModel& model, const Tokenizer& tok,
                           const std::vector<TaskItem>& items, int64_t max_new_tokens = 24);

// Mean next-token loss over the first `max_tokens` tokens of a corpus split (documents as in
// pretraining: bos + text + eos, windows of `seq` tokens).
double corpus_loss(DeepSeekModel& model, const Tokenizer& tok, const std::filesystem::path& jsonl,
                   int64_t seq, int64_t max_tokens);

}  // namespace moekit
