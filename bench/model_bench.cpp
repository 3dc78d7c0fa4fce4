// Model benchmark: forward and training-step tokens/s of a DeepSeekMoE config on random weights,
// printed as one JSON line (bench/run_cpu_model_bench.sh runs it beside the PyTorch peer on CPU,
// tools/gpu_bench.sh beside transformers on the GPU).
// Usage: moekit_model_bench CONFIG.json BATCH SEQ ITERS THREADS [cpu|cuda]
//        [grad|all|esft10|decode|prefill] [fp32|bf16]
//   prefill forward only, as inference (every weight frozen, nothing kept for a backward): the
//           mode to trace a prefill's kernels on their own (train_tok_s is then 0)
//   grad    forward + backward, no optimizer (the default; the CPU peer does the same)
//   all     + AdamW over every parameter
//   esft10  + AdamW, only every tenth routed expert of each MoE layer trains (ESFT-like)
//   decode  batch-1 greedy generation with the latent KV cache: a SEQ-token prompt, then ITERS
//           new tokens (BATCH must be 1); decode_tok_s = ITERS / time of the whole generate call
//           (prefill included, as the transformers peer's generate)
//   bf16    (cuda) frozen GEMM weights in bf16, GEMMs and attention on the bf16 tensor cores
// MOEKIT_BENCH_CHECKPOINT=1 turns on activation checkpointing, MOEKIT_BENCH_RECOMPUTE_EXPERTS=1 the
// recomputation of the MoE experts' gate/up in backward; MOEKIT_PROFILE=1 prints the time
// per model step to stderr (each step waits for the device: slower, for proportions only).
// Weights: the values `moekit init` writes for the config (seed 1), generated in memory.
#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <regex>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/profile.h"
#include "core/thread_pool.h"
#include "infer/generator.h"
#include "model/deepseek.h"
#include "model/init.h"
#include "train/adamw.h"

using namespace moekit;

static std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    o += (ch == '\n' ? ' ' : ch);
  }
  return o;
}

// The median of `iters` timed runs of fn after two untimed ones: the peer's method
// (tools/bench_gpu_peer.py's timed()), so that both sides warm up alike (allocations, cuBLAS's
// first heuristics and lazily loaded kernels for each new expert block size) and a step that
// meets a new shape does not weigh on one side only.
template <typename F>
static double median_seconds(F fn, int64_t iters) {
  fn();
  fn();
  std::vector<double> t;
  for (int64_t i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  return n == 0 ? 0.0 : n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A non-negative number of the environment, `unset` where unset or empty. Anything else fails, so
// a typo does not run the bench quietly without the setting.
static double env_number(const char* name, double unset) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return unset;
  char* end = nullptr;
  const double x = std::strtod(v, &end);
  if (end == v || *end != '\0' || !std::isfinite(x) || x < 0)
    fail("{} must be a non-negative number, got \"{}\"", name, v);
  return x;
}

// A positive integer argument (BATCH, SEQ, ITERS, THREADS), else a one-line error naming it.
static int64_t positive_arg(const char* name, const char* text) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || errno != 0 || x < 1)
    fail("{} must be a positive integer, got \"{}\"", name, text);
  return int64_t(x);
}

// One of `allowed`, else a one-line error naming the argument.
static std::string choice_arg(const char* name, const char* text,
                              std::initializer_list<const char*> allowed) {
  for (const char* a : allowed)
    if (std::string(text) == a) return text;
  std::string list;
  for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
  fail("{} must be one of {}, got \"{}\"", name, list, text);
}

// Greedy decoding: one warm-up generation (allocator, cuBLAS heuristics), then the timed one.
// Greedy (and sampled) decoding reads the chosen id back every token, so the clock covers the
// device's work.
static int decode_bench(DeepSeekModel& model, int64_t batch, int64_t prompt_len, int64_t new_tokens,
                        const std::string& dev_name, const std::string& dtype) {
  if (batch != 1) fail("decode: BATCH must be 1 (batch-1 decoding), got {}", batch);
  const ModelConfig& c = model.config();
  std::vector<int32_t> prompt(static_cast<size_t>(prompt_len));
  for (int64_t i = 0; i < prompt_len; ++i)
    prompt[size_t(i)] = int32_t((uint64_t(i) * 2654435761u) % uint64_t(c.vocab_size));
  Generator gen(model, prompt_len + new_tokens + 1);
  SamplingParams p;  // greedy, no stop tokens: exactly new_tokens tokens
  // MOEKIT_BENCH_TEMPERATURE / MOEKIT_BENCH_TOP_P: sampled decoding instead (Backend::sample).
  p.temperature = float(env_number("MOEKIT_BENCH_TEMPERATURE", p.temperature));
  p.top_p = float(env_number("MOEKIT_BENCH_TOP_P", p.top_p));
  p.max_tokens = std::min<int64_t>(new_tokens, 16);
  (void)gen.generate(prompt, p);
  gen.reset();
  p.max_tokens = new_tokens;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> out = gen.generate(prompt, p);
  const double t = seconds_since(t0);
  if (int64_t(out.size()) != new_tokens)
    fail("decode: generated {} tokens, expected {}", out.size(), new_tokens);
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  fmt::print(
      "{{\"engine\": \"moekit\", \"device\": \"{}\", \"dtype\": \"{}\", \"mode\": \"decode\", "
      "\"decode_tok_s\": "
      "{:.1f}, \"prompt\": {}, \"new_tokens\": {}, \"seconds\": {:.3f}, \"peak_rss_mib\": {:.1f}, "
      "\"threads\": {}, \"layers\": {}, \"temperature\": {}, \"top_p\": {}}}\n",
      dev_name, dtype, double(new_tokens) / t, prompt_len, new_tokens, t,
      double(ru.ru_maxrss) / 1024.0, num_threads(), c.num_hidden_layers, p.temperature, p.top_p);
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 6 || argc > 9) {
    fmt::print(stderr,
               "usage: {} CONFIG.json BATCH SEQ ITERS THREADS [cpu|cuda] "
               "[grad|all|esft10|decode|prefill] [fp32|bf16]\n",
               argv[0]);
    return 2;
  }
  try {
    ModelConfig c = load_config(argv[1]);
    const int64_t B = positive_arg("BATCH", argv[2]), S = positive_arg("SEQ", argv[3]);
    const int64_t iters = positive_arg("ITERS", argv[4]);
    set_num_threads(int(positive_arg("THREADS", argv[5])));
    const std::string dev_name = choice_arg("device", argc > 6 ? argv[6] : "cpu", {"cpu", "cuda"});
    const std::string mode = choice_arg("mode", argc > 7 ? argv[7] : "grad",
                                        {"grad", "all", "esft10", "decode", "prefill"});
    const std::string dtype = choice_arg("dtype", argc > 8 ? argv[8] : "fp32", {"fp32", "bf16"});
    const Device dev = dev_name == "cuda" ? Device::CUDA : Device::CPU;
    const DType weights = dtype == "bf16" ? DType::BF16 : DType::F32;
    if (weights == DType::BF16) backend(dev).set_precision(Precision::Bf16);
    // A switch of the environment: set, non-empty and not "0".
    auto env_on = [](const char* name) {
      const char* v = std::getenv(name);
      return v && *v && std::string(v) != "0";
    };
    // MOEKIT_BENCH_RESERVE_GIB=G (cuda): G GiB of device memory held from the start, so the run
    // sees a smaller card (an 80 GB H100 on the 141 GB H200: the difference of their totals,
    // 140.4 - 79.6 GiB). The peaks printed leave the reserve out. Checked on either device.
    const double reserve_gib = env_number("MOEKIT_BENCH_RESERVE_GIB", 0.0);
    const Tensor reserve =
        reserve_gib > 0 && dev == Device::CUDA
            ? Tensor::empty({int64_t(reserve_gib * 268435456.0)}, DType::F32, dev)
            : Tensor();
    const size_t reserved = reserve.defined() ? reserve.nbytes() : 0;
    const auto t_init = std::chrono::steady_clock::now();
    DeepSeekModel model(c, dev, true, weights);
    init_weights(model, 1);
    model.set_activation_checkpointing(env_on("MOEKIT_BENCH_CHECKPOINT"));
    const bool recompute_experts = env_on("MOEKIT_BENCH_RECOMPUTE_EXPERTS");
    model.set_expert_recompute(recompute_experts);
    const double init_s = seconds_since(t_init);
    const bool inference = mode == "decode" || mode == "prefill";
    if (inference)  // every weight frozen (bf16 ones stay bf16)
      model.params().set_trainable([](const Param&) { return false; });
    if (mode == "decode") return decode_bench(model, B, S, iters, dev_name, dtype);
    if (mode == "esft10") {
      static const std::regex expert(R"(\.mlp\.experts\.(\d+)\.)");
      model.params().set_trainable([](const Param& p) {
        std::smatch m;
        return std::regex_search(p.name, m, expert) && std::stoi(m[1]) % 10 == 0;
      });
    } else if (!inference) {  // grad, all: everything trains (bf16 matrices get fp32 masters)
      model.params().set_trainable([](const Param&) { return true; });
    }
    model.params().allocate_grads();
    Tensor ids_host = Tensor::empty({B * S}, DType::I32);
    for (int64_t i = 0; i < B * S; ++i)
      ids_host.i32()[i] = int32_t((i * 2654435761u) % uint64_t(c.vocab_size));
    Tensor ids = ids_host.to_device(dev), targets = shifted_targets(ids_host, B, S).to_device(dev);
    Backend& be = backend(dev);
    AdamW adam(AdamWConfig{0.9, 0.95, 1e-8, 0.1});
    // Reading one value back waits for the device, so the clock covers the queued work.
    auto sync = [](const Tensor& t) { (void)t.reshape({t.numel()}).slice(0, 1).to_host(); };
    // Prefill as inference (the peer's runs under torch.no_grad): nothing kept for a backward, and
    // a bf16 model's logits in bf16 (as transformers' bf16 model returns them).
    auto fwd = [&] {
      sync(model.forward(ids, B, S, /*backward_follows=*/false,
                         weights == DType::BF16 && be.supports(Op::Matmul, DType::BF16)
                             ? DType::BF16
                             : DType::F32));
    };
    double first_loss = -1;  // precision check across GEMM modes: same weights, same batch
    auto train = [&] {       // as the trainer: chunked LM head + loss, then backward
      const double loss = model.loss_and_backward(ids, targets, B, S);  // reads the loss back
      if (first_loss < 0) first_loss = loss;
      if (mode != "grad") {
        adam.step(model.params(), 1e-5);
        model.params().zero_grads();
      }
      be.synchronize();  // the clock covers the queued optimizer work
    };
    if (profiling()) {  // steady state only: warm-ups of both, then forget them
      fwd();
      if (mode != "prefill") train();
      profile_reset();
    }
    const double f = median_seconds(fwd, iters);  // per prefill
    // Training may not fit where prefill does (a full-size model): report prefill regardless.
    double t = 0;
    std::string train_error;
    // Training's own high-water mark (the peer's is reset before its training too): the prefill
    // above materialises the whole [tokens, vocab] logits, which training never does.
    be.open_memory_window();
    try {
      if (mode != "prefill") t = median_seconds(train, iters);  // per step
    } catch (const Error& e) {
      train_error = e.what();
    }
    const size_t train_peak = be.close_memory_window();
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    fmt::print(
        "{{\"engine\": \"moekit\", \"device\": \"{}\", \"mode\": \"{}\", \"forward_tok_s\": "
        "{:.1f}, "
        "\"train_tok_s\": {:.1f}, \"trainable\": {}, \"first_loss\": {:.6f}, "
        "\"peak_rss_mib\": {:.1f}, \"threads\": {}, \"dtype\": \"{}\", \"weights_gib\": {:.2f}, "
        "\"peak_device_gib\": {:.2f}, \"train_peak_device_gib\": {:.2f}, \"layers\": {}, "
        "\"init_s\": {:.1f}, \"checkpointing\": {}, \"recompute_experts\": {}, "
        "\"reserved_gib\": {:.2f}, \"train_error\": \"{}\"}}\n",
        dev_name, mode, double(B * S) / f, t > 0 ? double(B * S) / t : 0.0,
        model.params().trainable_numel(), first_loss, double(ru.ru_maxrss) / 1024.0, num_threads(),
        dtype, double(model.params().value_bytes()) / 1073741824.0,
        double(be.peak_bytes() - reserved) / 1073741824.0,
        double(train_peak - reserved) / 1073741824.0, c.num_hidden_layers, init_s,
        model.activation_checkpointing(), recompute_experts, double(reserved) / 1073741824.0,
        json_escape(train_error));
    if (profiling())
      fmt::print(stderr, "profile (MOEKIT_PROFILE, all iterations):\n{}", profile_report());
  } catch (const std::exception& e) {
    fmt::print(stderr, "moekit_model_bench: error: {}\n", e.what());
    return 2;
  }
  return 0;
}
