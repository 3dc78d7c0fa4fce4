// The pretraining loop. One step = `accumulation` micro-batches forward+backward, global-norm
// clipping, AdamW at the scheduled LR, then the Loss-Free Balancing bias update from the step's
// expert load. Everything a step depends on (weights, biases, AdamW moments, step, data
// position) is in the checkpoint, so a resumed run is bit-identical to an uninterrupted one.
#include "train/trainer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/progress.h"
#include "model/checkpoint.h"
#include "model/summary.h"
#include "ops/ops.h"
#include "tokenizer/bpe_trainer.h"
#include "train/adamw.h"
#include "train/data.h"
#include "train/run_state.h"
#include "train/scaling_law.h"
#include "train/text_encoder.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Parameters, gradients and two AdamW moments in fp32, plus a rough activation estimate; refuse
// before allocating when that exceeds the device's memory (the host: physical memory; a GPU: its
// free memory).
void check_fits_in_memory(const ModelConfig& cfg, const TrainOptions& opt) {
  const int64_t params = summarize(cfg).total;
  check_device_memory(estimate_memory(cfg, opt.batch * opt.seq, params, DType::F32,
                                      opt.activation_checkpointing, opt.recompute_experts),
                      opt.device,
                      fmt::format("{}: training this model (batch {} x seq {})",
                                  opt.config_file.string(), opt.batch, opt.seq));
}

std::vector<int32_t> cached_tokens(const fs::path& cache, const fs::path& jsonl,
                                   const TextEncoder& enc) {
  if (fs::exists(cache)) return load_tokens(cache);
  if (!fs::exists(jsonl))
    fail("{}: missing (the data directory needs train.jsonl and val.jsonl)", jsonl.string());
  auto t = tokenize_jsonl(jsonl, enc.encode, enc.bos, enc.eos);
  save_tokens(cache, t);
  return t;
}

struct Evaluation {
  double loss = 0.0, maxvio_global = 0.0, maxvio_batch = 0.0;
};

// Validation windows spread evenly over the whole split (the split is ordered by domain, so the
// first windows alone would measure one domain).
Evaluation evaluate(DeepSeekModel& model, const WindowSampler& val, int64_t batch, int64_t n) {
  Evaluation ev;
  ExpertLoad total = zero_load(model);
  n = std::min<int64_t>(n, std::max<int64_t>(1, val.windows() / batch));
  const int64_t rows = n * batch;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int64_t> windows;
    for (int64_t r = 0; r < batch; ++r) windows.push_back((i * batch + r) * val.windows() / rows);
    Batch b = val.windows_batch(windows);
    Tensor logits = model.forward(b.ids, b.batch, b.seq);
    ev.loss += cross_entropy(backend(model.device()), logits, b.targets) / double(n);
    ExpertLoad l = zero_load(model);
    accumulate_load(model, l);
    accumulate_load(model, total);
    ev.maxvio_batch += mean_max_violation(l) / double(n);
  }
  ev.maxvio_global = mean_max_violation(total);
  return ev;
}

}  // namespace

TrainResult train(const TrainOptions& opt) {
  backend(opt.device);  // no GPU (or a CPU-only build) fails here, before any tokenizer work
  if (!fs::is_directory(opt.data_dir))
    fail("{}: data directory not found (build one with scripts/corpus)", opt.data_dir.string());
  fs::path tok_path = opt.tokenizer.empty() ? opt.data_dir / "tokenizer.json" : opt.tokenizer;
  if (opt.tokenizer.empty() && !fs::exists(tok_path)) {
    // No tokenizer beside the data: learn one from the training split, kept in the run.
    tok_path = opt.out / "tokenizer.json";
    if (!fs::exists(tok_path)) {
      const fs::path train_file = opt.data_dir / "train.jsonl";
      if (!fs::exists(train_file))
        fail("{}: missing (the data directory needs train.jsonl and val.jsonl)",
             train_file.string());
      BpeTrainOptions bo;
      bo.vocab_size = std::clamp<int64_t>(load_config(opt.config_file).vocab_size, 512, 65536);
      fs::create_directories(opt.out);
      if (!opt.quiet)
        fmt::print("no {} given: training a {}-token tokenizer on {}\n", "--tokenizer",
                   bo.vocab_size, train_file.string());
      train_bpe(read_training_texts({train_file.string()}), bo, tok_path);
    }
  }
  TextEncoder enc = load_text_encoder(tok_path);
  ModelConfig cfg = load_config(opt.config_file);
  cfg.vocab_size = enc.vocab_size;  // the model's vocabulary is the tokenizer's
  cfg.bos_token_id = enc.bos;
  cfg.eos_token_id = enc.eos;
  validate(cfg, opt.config_file.string());
  const Schedule schedule = schedule_from_name(opt.schedule);
  check_fits_in_memory(cfg, opt);
  if (opt.steps < 1 || opt.batch < 1 || opt.seq < 2 || opt.accumulation < 1)
    fail("--steps, --batch, --accumulation must be >= 1 and --seq >= 2");

  RunDir run(opt.out);
  run.prepare(cfg, opt.resume);
  if (tok_path != opt.out / "tokenizer.json")
    fs::copy_file(tok_path, opt.out / "tokenizer.json", fs::copy_options::overwrite_existing);

  DeepSeekModel model(cfg, opt.device);
  model.set_activation_checkpointing(opt.activation_checkpointing);
  model.set_expert_recompute(opt.recompute_experts);
  model.init_random(opt.seed);
  // The aux loss of each micro-batch is averaged like the main loss.
  for (auto& l : model.layers())
    if (l.moe)
      l.moe->gate.aux_alpha =
          opt.balance == Balance::Aux ? float(opt.aux_alpha / double(opt.accumulation)) : 0.0f;
  model.params().allocate_grads();
  AdamW adam(AdamWConfig{0.9, 0.95, 1e-8, opt.weight_decay});

  WindowSampler train_data(
      cached_tokens(opt.out / "tokens-train.bin", opt.data_dir / "train.jsonl", enc), opt.seq,
      opt.seed);
  WindowSampler val_data(cached_tokens(opt.out / "tokens-val.bin", opt.data_dir / "val.jsonl", enc),
                         opt.seq, opt.seed);

  int64_t start_step = 0;
  if (opt.resume) {
    if (auto ck = run.latest_checkpoint()) {
      RunState st = run.load_checkpoint(*ck, model, adam);
      start_step = st.step;
      train_data.set_position(st.data_position);
      if (!opt.quiet) fmt::print("resuming from {} (step {})\n", ck->string(), start_step);
    }
  }
  run.truncate_metrics(start_step);

  const double tokens_per_step = double(opt.batch * opt.seq * opt.accumulation);
  Progress progress("train", opt.steps, "tok");
  progress.set_plain_every(opt.log_every);
  TrainResult result;
  ExpertLoad interval_load = zero_load(model);  // summed over the logging interval
  auto t_start = std::chrono::steady_clock::now();
  for (int64_t step = start_step + 1; step <= opt.steps; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    model.params().zero_grads();
    ExpertLoad load = zero_load(model);
    double loss = 0.0, aux = 0.0;
    for (int64_t micro = 0; micro < opt.accumulation; ++micro) {
      Batch b = train_data.next(opt.batch);
      loss += model.loss_and_backward(b.ids, b.targets, b.batch, b.seq,
                                      1.0f / float(opt.accumulation)) /
              double(opt.accumulation);
      for (auto& l : model.layers())
        if (l.moe) aux += l.moe->gate.aux_loss;
      accumulate_load(model, load);
      accumulate_load(model, interval_load);
    }
    if (!std::isfinite(loss)) {
      auto ck = run.latest_checkpoint();
      fail("step {}: loss is {}; stopping. Last good checkpoint: {}", step, loss,
           ck ? ck->string() : std::string("none"));
    }
    const double grad_norm = clip_grad_norm(model.params(), opt.grad_clip);
    if (!std::isfinite(grad_norm)) {  // stop before a non-finite update reaches the weights
      auto ck = run.latest_checkpoint();
      fail("step {}: gradient norm is {}; stopping. Last good checkpoint: {}", step, grad_norm,
           ck ? ck->string() : std::string("none"));
    }
    const double lr = lr_at(step - 1, opt.steps, opt.lr, opt.warmup, schedule);
    adam.step(model.params(), lr);
    if (opt.balance == Balance::LossFree) loss_free_update(model, load, opt.lfb_rate);

    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double maxvio = mean_max_violation(load);
    json row = {
        {"step", step},     {"loss", loss},           {"lr", lr},
        {"maxvio", maxvio}, {"grad_norm", grad_norm}, {"tokens_per_s", tokens_per_step / dt}};
    if (opt.balance == Balance::Aux) row["aux_loss"] = aux;
    const bool log = step % opt.log_every == 0 || step == opt.steps;
    if (log) {
      row["expert_load"] = interval_load;
      interval_load = zero_load(model);
    }
    if (step % opt.eval_every == 0 || step == opt.steps) {
      Evaluation ev = evaluate(model, val_data, opt.batch, opt.eval_batches);
      row["val_loss"] = ev.loss;
      row["val_ppl"] = std::exp(ev.loss);
      row["val_maxvio_global"] = ev.maxvio_global;
      row["val_maxvio_batch"] = ev.maxvio_batch;
      result.val_loss = ev.loss;
      result.val_maxvio_global = ev.maxvio_global;
      result.val_maxvio_batch = ev.maxvio_batch;
    }
    if (log || row.contains("val_loss")) run.append_metrics(row);
    result.final_loss = loss;
    if (!opt.quiet)
      progress.update(step,
                      fmt::format("loss {:.3f} maxvio {:.2f}{}", loss, maxvio,
                                  row.contains("val_loss")
                                      ? fmt::format(" val {:.3f}", row["val_loss"].get<double>())
                                      : ""),
                      tokens_per_step);
    if (step % opt.save_every == 0 || step == opt.steps)
      run.save_checkpoint(step, train_data.position(), model, adam, opt.keep_checkpoints);
  }
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  result.tokens_per_s = double(opt.steps - start_step) * tokens_per_step / std::max(total_s, 1e-9);
  if (!opt.quiet) progress.finish(fmt::format("({:.0f} tokens/s)", result.tokens_per_s));
  result.final_dir = opt.out / "final";
  save_model(model, result.final_dir, DType::F32);
  fs::copy_file(tok_path, result.final_dir / "tokenizer.json",
                fs::copy_options::overwrite_existing);
  return result;
}

}  // namespace moekit
