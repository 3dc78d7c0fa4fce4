// Corpus tokenization, token caches and the window sampler.
#include "train/data.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "core/error.h"
#include "model/checkpoint.h"

namespace moekit {

std::vector<int32_t> tokenize_jsonl(const std::filesystem::path& file, const EncodeFn& encode,
                                    int32_t bos, int32_t eos) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot read file", file.string());
  std::vector<int32_t> out;
  std::string line;
  int64_t lineno = 0, docs = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) fail("{}:{}: not valid JSON", file.string(), lineno);
    if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
      fail("{}:{}: row has no string field \"text\"", file.string(), lineno);
    auto ids = encode(j["text"].get<std::string>());
    out.push_back(bos);
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(eos);
    ++docs;
  }
  if (docs == 0) fail("{}: no documents", file.string());
  return out;
}

void save_tokens(const std::filesystem::path& file, const std::vector<int32_t>& tokens) {
  write_file_atomic(file, std::string(reinterpret_cast<const char*>(tokens.data()),
                                      tokens.size() * sizeof(int32_t)));
}

std::vector<int32_t> load_tokens(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary | std::ios::ate);
  if (!in) fail("{}: cannot read token cache", file.string());
  auto size = in.tellg();
  if (size % 4 != 0) fail("{}: token cache is truncated", file.string());
  std::vector<int32_t> t(size_t(size) / 4);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(t.data()), size);
  return t;
}

WindowSampler::WindowSampler(std::vector<int32_t> tokens, int64_t seq, uint64_t seed)
    : tokens_(std::move(tokens)), seq_(seq), seed_(seed) {
  n_windows_ = (int64_t(tokens_.size()) - 1) / seq_;
  if (n_windows_ < 1)
    fail("data has {} tokens, fewer than one window of {} + 1", tokens_.size(), seq_);
}

int64_t WindowSampler::window_of(int64_t counter) {
  int64_t epoch = counter / n_windows_;
  if (epoch != epoch_cached_) {
    order_.resize(size_t(n_windows_));
    std::iota(order_.begin(), order_.end(), 0);
    // Our own Fisher-Yates over mt19937_64: std::shuffle's algorithm is unspecified, so this
    // keeps the data order identical across standard libraries.
    std::mt19937_64 rng(seed_ * 1000003ull + uint64_t(epoch));
    for (int64_t i = n_windows_ - 1; i > 0; --i) {
      int64_t j = int64_t(rng() % uint64_t(i + 1));
      std::swap(order_[size_t(i)], order_[size_t(j)]);
    }
    epoch_cached_ = epoch;
  }
  return order_[size_t(counter % n_windows_)];
}

void WindowSampler::fill(Batch& b, int64_t row, int64_t window) const {
  const int32_t* src = tokens_.data() + window * seq_;
  for (int64_t s = 0; s < seq_; ++s) {
    b.ids.i32()[row * seq_ + s] = src[s];
    b.targets.i32()[row * seq_ + s] = src[s + 1];
  }
}

Batch WindowSampler::next(int64_t batch) {
  Batch b{Tensor::empty({batch * seq_}, DType::I32), Tensor::empty({batch * seq_}, DType::I32),
          batch, seq_};
  for (int64_t r = 0; r < batch; ++r) fill(b, r, window_of(position_++));
  return b;
}

Batch WindowSampler::windows_batch(const std::vector<int64_t>& windows) const {
  const int64_t batch = int64_t(windows.size());
  Batch b{Tensor::empty({batch * seq_}, DType::I32), Tensor::empty({batch * seq_}, DType::I32),
          batch, seq_};
  for (int64_t r = 0; r < batch; ++r) fill(b, r, windows[size_t(r)] % n_windows_);
  return b;
}

}  // namespace moekit
