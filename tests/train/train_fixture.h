// A tiny training data directory for trainer tests: train.jsonl / val.jsonl of synthetic
// multi-domain text and a tokenizer.json.
#pragma once

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "tokenizer/bpe_trainer.h"

namespace moekit::test {

inline std::filesystem::path make_train_data(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  auto write_split = [&](const char* name, int docs, int salt) {
    std::ofstream out(dir / name);
    for (int d = 0; d < docs; ++d) {
      std::string text;
      for (int i = 0; i < 12; ++i) {
        int a = (d * 37 + i * 11 + salt) % 97, b = (d * 13 + i * 7) % 89;
        text +=
            std::to_string(a) + " + " + std::to_string(b) + " = " + std::to_string(a + b) + "\n";
        text += (i % 2 ? "the house is blue\n" : "la maison est bleue\n");
      }
      out << nlohmann::json{{"domain", "arithmetic"}, {"source", "test"}, {"text", text}}.dump()
          << "\n";
    }
  };
  write_split("train.jsonl", 40, 0);
  write_split("val.jsonl", 6, 5);
  BpeTrainOptions opt;
  opt.vocab_size = 300;
  train_bpe(read_training_texts({(dir / "train.jsonl").string()}), opt, dir / "tokenizer.json");
  return dir;
}

}  // namespace moekit::test
