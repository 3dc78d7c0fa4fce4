// Tokenizer encode throughput (MB/s) on one thread and on all threads, printed as a JSON line;
// bench/run_tokenizer_bench.sh runs the JavaScript reference on the same text in the same run.
// Usage: moekit_tokenizer_bench TOKENIZER.json TEXT_FILE [THREADS]
#include <fmt/format.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "tokenizer/tokenizer.h"

using namespace moekit;

int main(int argc, char** argv) {
  if (argc < 3) {
    fmt::print(stderr, "usage: {} TOKENIZER.json TEXT_FILE [THREADS]\n", argv[0]);
    return 2;
  }
  try {
    std::ifstream in(argv[2], std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    // Documents of ~4 KB, as a corpus would be fed.
    std::vector<std::string_view> docs;
    for (size_t i = 0; i < text.size(); i += 4096)
      docs.push_back(std::string_view(text).substr(i, 4096));
    const int threads = argc > 3 ? std::atoi(argv[3]) : int(std::thread::hardware_concurrency());
    auto run = [&](int n_threads) {
      Tokenizer tok = Tokenizer::load(argv[1]);  // cold cache for every measurement
      auto t0 = std::chrono::steady_clock::now();
      std::vector<std::thread> pool;
      std::vector<size_t> ids(size_t(n_threads), 0);
      for (int t = 0; t < n_threads; ++t)
        pool.emplace_back([&, t] {
          for (size_t d = size_t(t); d < docs.size(); d += size_t(n_threads))
            ids[size_t(t)] += tok.encode(docs[d]).size();
        });
      for (auto& th : pool) th.join();
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      size_t total = 0;
      for (size_t v : ids) total += v;
      return std::pair{double(text.size()) / 1e6 / s, total};
    };
    auto [one, n1] = run(1);
    auto [all, n2] = run(threads);
    fmt::print(
        "{{\"engine\": \"moekit\", \"mb\": {:.2f}, \"tokens\": {}, \"mb_s_1thread\": {:.2f}, "
        "\"mb_s_all\": {:.2f}, \"threads\": {}}}\n",
        double(text.size()) / 1e6, n1, one, all, threads);
    return n1 == n2 ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }
}
