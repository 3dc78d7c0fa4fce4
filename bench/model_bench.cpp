// CPU model benchmark: forward and forward+backward tokens/s of a DeepSeekMoE config on random
// weights, printed as one JSON line (bench/run_cpu_model_bench.sh runs it beside the PyTorch peer).
// Usage: moekit_model_bench CONFIG.json BATCH SEQ ITERS THREADS
#include <fmt/format.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdlib>

#include "core/thread_pool.h"
#include "model/deepseek.h"

using namespace moekit;

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main(int argc, char** argv) {
  if (argc != 6) {
    fmt::print(stderr, "usage: {} CONFIG.json BATCH SEQ ITERS THREADS\n", argv[0]);
    return 2;
  }
  try {
    ModelConfig c = load_config(argv[1]);
    const int64_t B = std::atoll(argv[2]), S = std::atoll(argv[3]), iters = std::atoll(argv[4]);
    set_num_threads(std::atoi(argv[5]));
    DeepSeekModel model(c);
    model.init_random(1);
    model.params().allocate_grads();
    Tensor ids = Tensor::empty({B * S}, DType::I32);
    for (int64_t i = 0; i < B * S; ++i)
      ids.i32()[i] = int32_t((i * 2654435761u) % uint64_t(c.vocab_size));
    Tensor targets = shifted_targets(ids, B, S);
    Backend& be = backend(Device::CPU);
    auto fwd = [&] { return model.forward(ids, B, S); };
    auto train = [&] {
      Tensor logits = model.forward(ids, B, S);
      Tensor d = Tensor::empty(logits.shape());
      cross_entropy(be, logits, targets, &d);
      model.backward(d);
    };
    fwd();
    train();  // warm-up: allocations, thread start
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) fwd();
    double f = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) train();
    double t = seconds_since(t0);
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    fmt::print(
        "{{\"engine\": \"moekit\", \"forward_tok_s\": {:.1f}, \"train_tok_s\": {:.1f}, "
        "\"peak_rss_mib\": {:.1f}, \"threads\": {}}}\n",
        double(B * S * iters) / f, double(B * S * iters) / t, double(ru.ru_maxrss) / 1024.0,
        num_threads());
  } catch (const std::exception& e) {
    fmt::print(stderr, "moekit_model_bench: error: {}\n", e.what());
    return 2;
  }
  return 0;
}
