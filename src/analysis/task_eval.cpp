// Task accuracy by greedy decoding and corpus loss for retention.
#include "analysis/task_eval.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "infer/generator.h"
#include "ops/ops.h"
#include "tokenizer/templates.h"
#include "train/data.h"

namespace moekit {

namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\n"), e = s.find_last_not_of(" \t\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

}  // namespace

TaskAccuracy evaluate_task(DeepSeekModel& model, const Tokenizer& tok,
                           const std::vector<TaskItem>& items, int64_t max_new_tokens) {
  TaskAccuracy acc;
  Generator gen(model, model.config().max_position_embeddings);
  SamplingParams sp;  // greedy
  sp.max_tokens = max_new_tokens;
  sp.stop_ids = {tok.eos_id()};
  sp.allowed_vocab = tok.vocab_size();
  for (const auto& it : items) {
    std::vector<int32_t> prompt = tok.encode(esft_prompt(it.user), true);
    if (int64_t(prompt.size()) + max_new_tokens > model.config().max_position_embeddings) {
      ++acc.total;  // does not fit the model's context: counted, as wrong
      continue;
    }
    gen.reset();
    std::vector<int32_t> out = gen.generate(prompt, sp);  // stops at eos (not returned)
    const std::string answer = trim(tok.decode(out));
    const bool ok = std::find(it.answers.begin(), it.answers.end(), answer) != it.answers.end();
    acc.correct += ok;
    ++acc.total;
    if (acc.samples.size() < 5) acc.samples.emplace_back(it.user, answer);
  }
  return acc;
}

double corpus_loss(DeepSeekModel& model, const Tokenizer& tok, const std::filesystem::path& jsonl,
                   int64_t seq, int64_t max_tokens) {
  auto encode = [&](std::string_view s) { return tok.encode(std::string(s), false); };
  std::vector<int32_t> tokens = tokenize_jsonl(jsonl, encode, tok.bos_id(), tok.eos_id());
  if (int64_t(tokens.size()) > max_tokens + 1) tokens.resize(size_t(max_tokens + 1));
  WindowSampler windows(std::move(tokens), seq, 0);
  if (windows.windows() == 0) fail("{}: fewer than {} tokens", jsonl.string(), seq + 1);
  double total = 0;
  const int64_t per_batch = 4;
  for (int64_t w = 0; w < windows.windows(); w += per_batch) {
    std::vector<int64_t> which;
    for (int64_t i = w; i < std::min(windows.windows(), w + per_batch); ++i) which.push_back(i);
    Batch b = windows.windows_batch(which);
    Tensor logits = model.forward(b.ids, b.batch, b.seq, /*backward_follows=*/false);
    total += cross_entropy(backend(Device::CPU), logits, b.targets, nullptr) * double(b.batch);
  }
  return total / double(windows.windows());
}

}  // namespace moekit
