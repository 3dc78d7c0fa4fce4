// A small task (arithmetic Q&A in `messages` rows) and a random base model with a tokenizer
// trained on it, for the ESFT tests.
#pragma once

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "model/checkpoint.h"
#include "tokenizer/bpe_trainer.h"

namespace moekit::test {

// Writes root/task.jsonl (`rows` rows) and root/base/ (config, weights, tokenizer); returns the
// base directory.
inline std::filesystem::path make_task_and_base(const std::filesystem::path& root, int rows,
                                                float init_std) {
  std::vector<std::string> texts;
  std::ofstream task(root / "task.jsonl");
  for (int i = 0; i < rows; ++i) {
    std::string q = "What is " + std::to_string(i) + " + " + std::to_string(2 * i) + "?";
    std::string a = std::to_string(3 * i);
    task << nlohmann::json{{"messages",
                            {{{"role", "user"}, {"content", q}},
                             {{"role", "assistant"}, {"content", a}}}}}
                .dump()
         << "\n";
    texts.push_back("User: " + q + "\n\nAssistant: " + a);
  }
  const std::filesystem::path model_dir = root / "base";
  std::filesystem::create_directories(model_dir);
  train_bpe(texts, BpeTrainOptions{300}, model_dir / "tokenizer.json");
  ModelConfig c = load_config(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json");
  c.vocab_size = 300;
  DeepSeekModel m(c);
  m.init_random(3, init_std);
  save_model(m, model_dir);
  return model_dir;
}

}  // namespace moekit::test
