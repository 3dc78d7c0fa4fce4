// `moekit esft ...`: expert relevance scores from routing logs and expert selection, in the
// official ESFT file formats (esft.md).
#include <fmt/format.h>

#include <array>
#include <memory>

#include "cli/commands.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "esft/adapter.h"
#include "esft/expert_config.h"
#include "esft/finetune.h"
#include "esft/route_logger.h"
#include "esft/scores.h"
#include "model/checkpoint.h"

namespace moekit::cli {

namespace {

ExpertScores scores_from_logs(const std::string& dir, int64_t top_k) {
  auto logs = read_routing_dir(dir);
  if (top_k <= 0) top_k = infer_top_k(logs, dir);
  validate_top_k(logs, top_k, dir);
  return compute_scores(logs, top_k);
}

}  // namespace

void add_esft_commands(CLI::App& app) {
  auto fo = std::make_shared<FinetuneOptions>();
  auto fs_args =
      std::make_shared<std::array<std::string, 5>>();  // model, data, experts, out, tokenizer
  auto device = std::make_shared<DeviceArgs>();
  auto* ft =
      app.add_subcommand("finetune", "Fine-tune on chat data: ESFT (chosen experts only) or full");
  ft->add_option("--model", (*fs_args)[0], "base checkpoint directory")->required();
  ft->add_option("--data", (*fs_args)[1], "TRAIN.jsonl with \"messages\" rows")->required();
  ft->add_option("--method", fo->method, "esft | full")->capture_default_str();
  ft->add_option("--experts", (*fs_args)[2],
                 "expert config (from `esft select`) for --method esft");
  ft->add_option("--out", (*fs_args)[3],
                 "adapter (esft) or checkpoint (full) directory; default runs/finetune-METHOD");
  ft->add_option("--tokenizer", (*fs_args)[4], "tokenizer.json (default MODEL/tokenizer.json)");
  ft->add_option("--steps", fo->steps)->capture_default_str();
  ft->add_option("--seq", fo->seq, "packed sequence length")->capture_default_str();
  ft->add_option("--batch", fo->batch, "sequences per micro-batch")->capture_default_str();
  ft->add_option("--accumulation", fo->accumulation)->capture_default_str();
  ft->add_option("--lr", fo->lr)->capture_default_str();
  ft->add_option("--seed", fo->seed)->capture_default_str();
  add_device_options(ft, *device);
  ft->add_flag("--checkpoint-activations", fo->activation_checkpointing,
               "keep only each layer's input and recompute the layer in backward (less memory, "
               "one more forward)");
  ft->add_flag("--recompute-experts", fo->recompute_experts,
               "recompute the MoE experts' gate and up projections in backward instead of keeping "
               "them (less memory, two more grouped GEMMs per MoE layer)");
  ft->callback([fo, fs_args, device] {
    fo->model = (*fs_args)[0];
    fo->data = (*fs_args)[1];
    fo->experts = (*fs_args)[2];
    fo->out = (*fs_args)[3].empty() ? "runs/finetune-" + fo->method : (*fs_args)[3];
    fo->tokenizer = (*fs_args)[4];
    fo->device = parse_device(*device);
    fo->weights = weight_dtype(*device);
    FinetuneResult r = finetune(*fo);
    fmt::print(
        "done: loss {:.4f} -> {:.4f}, validation {:.4f}; {:.3f} s/step; gradients {:.2f} MiB, "
        "AdamW {:.2f} MiB -> {}\n",
        r.first_loss, r.last_loss, r.val_loss, r.step_seconds, double(r.grad_bytes) / 1048576.0,
        double(r.optimizer_bytes) / 1048576.0, fo->out.string());
  });

  auto* esft = app.add_subcommand("esft", "Expert-Specialized Fine-Tuning tools");
  esft->require_subcommand(1);
  add_esft_experiment_commands(esft);

  struct MergeArgs {
    std::string model, adapter, out;
  };
  auto ma = std::make_shared<MergeArgs>();
  auto* merge = esft->add_subcommand("merge", "Write base + ESFT adapter as one full checkpoint");
  merge->add_option("--model", ma->model, "base checkpoint directory")->required();
  merge
      ->add_option("--adapter", ma->adapter,
                   "adapter directory from `moekit finetune --method esft`")
      ->required();
  merge->add_option("--out", ma->out, "checkpoint directory to write")->required();
  merge->callback([ma] {
    auto model = load_model(ma->model);
    apply_adapter(*model, ma->adapter);
    save_model(*model, ma->out);
    const std::filesystem::path tok = std::filesystem::path(ma->model) / "tokenizer.json";
    if (std::filesystem::exists(tok))
      std::filesystem::copy_file(tok, std::filesystem::path(ma->out) / "tokenizer.json",
                                 std::filesystem::copy_options::overwrite_existing);
    fmt::print("merged {} + {} -> {}\n", ma->model, ma->adapter, ma->out);
  });

  struct RouteArgs {
    std::string model, data, tokenizer, out;
    int64_t tokens = 131072;  // the official run's budget
  };
  auto ra = std::make_shared<RouteArgs>();
  auto* route =
      esft->add_subcommand("route", "Log the routing of task samples (expert_weights_<layer>.txt)");
  route->add_option("--model", ra->model, "checkpoint directory")->required();
  route->add_option("--data", ra->data, "TASK.jsonl with \"messages\" rows")->required();
  route->add_option("--tokens", ra->tokens, "tokens to log")->capture_default_str();
  route->add_option("--tokenizer", ra->tokenizer, "tokenizer.json (default MODEL/tokenizer.json)");
  route->add_option("--out", ra->out, "directory for the logs")->required();
  route->callback([ra] {
    auto model = load_model(ra->model);
    Tokenizer tok =
        Tokenizer::load(ra->tokenizer.empty() ? ra->model + "/tokenizer.json" : ra->tokenizer);
    RouteLogStats st = log_routing(*model, tok, ra->data, ra->tokens, ra->out);
    fmt::print("logged {} tokens in {} sequences over {} MoE layers -> {}\n", st.tokens,
               st.sequences, st.layers, ra->out);
  });

  struct ScoreArgs {
    std::string routing, out;
    int64_t top_k = 0;
  };
  auto sa = std::make_shared<ScoreArgs>();
  auto* scores = esft->add_subcommand("scores", "Expert scores from routing logs (summary.json)");
  scores->add_option("--routing", sa->routing, "directory of expert_weights_<layer>.txt")
      ->required();
  scores->add_option("--out", sa->out, "SUMMARY.json to write")->required();
  scores->add_option("--top-k", sa->top_k, "experts per token (default: inferred from the logs)");
  scores->callback([sa] {
    ExpertScores s = scores_from_logs(sa->routing, sa->top_k);
    write_file_atomic(sa->out, summary_json(s));
    fmt::print("{} layers, {} experts, K = {} -> {}\n", s.token.size(), s.n_experts, s.top_k,
               sa->out);
  });

  struct SelectArgs {
    std::string routing, scores, score = "token", out;
    double top_p = 0.2;
    int64_t top_k = 0;
    bool shared = false, non_expert = false;
  };
  auto se = std::make_shared<SelectArgs>();
  auto* select = esft->add_subcommand("select", "Choose experts per layer up to a score mass p");
  auto* g1 =
      select->add_option("--routing", se->routing, "directory of expert_weights_<layer>.txt");
  auto* g2 = select->add_option("--scores", se->scores, "SUMMARY.json from `esft scores`");
  g1->excludes(g2);
  select->add_option("--score", se->score, "token | gate")->capture_default_str();
  select->add_option("--top-p", se->top_p, "score mass to cover per layer, in (0, 1]")->required();
  select->add_option("--top-k", se->top_k, "experts per token for --routing (default: inferred)");
  select->add_flag("--shared-experts", se->shared, "shared experts train too");
  select->add_flag("--non-expert-modules", se->non_expert, "all non-expert modules train too");
  select->add_option("--out", se->out, "CONFIG.json to write")->required();
  select->callback([se] {
    if (se->routing.empty() == se->scores.empty())
      fail("esft select: give exactly one of --routing or --scores");
    if (se->score != "token" && se->score != "gate")
      fail("esft select: --score must be token or gate, got \"{}\"", se->score);
    if (!(se->top_p > 0.0 && se->top_p <= 1.0))
      fail("esft select: --top-p must be in (0, 1], got {}", se->top_p);
    ExpertScores s =
        se->routing.empty() ? read_summary(se->scores) : scores_from_logs(se->routing, se->top_k);
    ExpertConfig cfg = select_experts(se->score == "token" ? s.token : s.gate, se->top_p);
    cfg.shared_experts = se->shared;
    cfg.non_expert_modules = se->non_expert;
    write_file_atomic(se->out, cfg.to_json_text());
    size_t n = 0;
    for (const auto& [l, v] : cfg.experts) n += v.size();
    fmt::print("{} experts over {} layers ({} score, p = {}) -> {}\n", n, cfg.experts.size(),
               se->score, se->top_p, se->out);
  });
}

}  // namespace moekit::cli
