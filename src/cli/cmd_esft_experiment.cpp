// `moekit esft tasks | eval | experiment`: the specialisation tasks built from the corpus, task
// evaluation of a model (+ adapter), and the full ESFT-vs-full-fine-tuning experiment.
#include <fmt/format.h>

#include <memory>

#include "analysis/task_eval.h"
#include "cli/commands.h"
#include "core/error.h"
#include "esft/adapter.h"
#include "esft/experiment.h"
#include "esft/tasks.h"
#include "model/checkpoint.h"

namespace moekit::cli {

namespace fs = std::filesystem;

namespace {

void add_tasks(CLI::App* esft) {
  struct Args {
    std::string corpus = "corpus", out = "tasks";
    TaskOptions opt;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = esft->add_subcommand(
      "tasks", "Build the translate / arithmetic / license tasks from the corpus");
  cmd->add_option("--corpus", a->corpus, "corpus directory (scripts/corpus)")
      ->capture_default_str();
  cmd->add_option("--out", a->out, "writes OUT/TASK/{train,eval}.jsonl")->capture_default_str();
  cmd->add_option("--max-train", a->opt.max_train)->capture_default_str();
  cmd->add_option("--max-eval", a->opt.max_eval)->capture_default_str();
  cmd->add_option("--seed", a->opt.seed)->capture_default_str();
  cmd->callback([a] {
    for (const Task& t : build_tasks(a->corpus, a->opt)) {
      write_task(t, fs::path(a->out) / t.name);
      fmt::print("{:<10} {:>5} train {:>4} eval  {}\n", t.name, t.train.size(), t.eval.size(),
                 t.description);
    }
  });
}

void add_eval(CLI::App* esft) {
  struct Args {
    std::string model, adapter, data, tokenizer;
    int64_t max_new = 24;
  };
  auto a = std::make_shared<Args>();
  auto* cmd = esft->add_subcommand("eval", "Exact-match accuracy of greedy answers on EVAL.jsonl");
  cmd->add_option("--model", a->model, "checkpoint directory")->required();
  cmd->add_option("--adapter", a->adapter, "ESFT adapter directory applied at load");
  cmd->add_option("--data", a->data, "eval JSONL (messages + optional \"answers\")")->required();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.json (default MODEL/tokenizer.json)");
  cmd->add_option("--max-new-tokens", a->max_new)->capture_default_str();
  cmd->callback([a] {
    auto model = load_model(a->model);
    if (!a->adapter.empty()) apply_adapter(*model, a->adapter);
    Tokenizer tok =
        Tokenizer::load(a->tokenizer.empty() ? a->model + "/tokenizer.json" : a->tokenizer);
    TaskAccuracy acc = evaluate_task(*model, tok, read_eval_items(a->data), a->max_new);
    for (const auto& [q, ans] : acc.samples) fmt::print("  {:?} -> {:?}\n", q, ans);
    fmt::print("exact match {:.2f}% ({}/{})\n", 100 * acc.accuracy(), acc.correct, acc.total);
  });
}

void add_experiment(CLI::App* esft) {
  auto o = std::make_shared<ExperimentOptions>();
  auto paths = std::make_shared<std::array<std::string, 3>>();
  (*paths)[1] = "corpus";
  (*paths)[2] = "runs/esft-experiment";
  auto* cmd = esft->add_subcommand(
      "experiment", "Base vs ESFT-token vs ESFT-gate vs full fine-tuning on the corpus tasks");
  cmd->add_option("--model", (*paths)[0], "base checkpoint (with tokenizer.json)")->required();
  cmd->add_option("--corpus", (*paths)[1])->capture_default_str();
  cmd->add_option("--out", (*paths)[2])->capture_default_str();
  cmd->add_option("--tasks", o->tasks, "translate, arithmetic, license")->delimiter(',');
  cmd->add_option("--methods", o->methods, "esft-token, esft-gate, full")->delimiter(',');
  cmd->add_option("--steps", o->steps)->capture_default_str();
  cmd->add_option("--seq", o->seq)->capture_default_str();
  cmd->add_option("--batch", o->batch)->capture_default_str();
  cmd->add_option("--lr", o->lr)->capture_default_str();
  cmd->add_option("--token-p", o->token_p, "ESFT-token score mass")->capture_default_str();
  cmd->add_option("--gate-p", o->gate_p, "ESFT-gate score mass")->capture_default_str();
  cmd->add_option("--route-tokens", o->route_tokens)->capture_default_str();
  cmd->add_option("--max-train", o->max_train)->capture_default_str();
  cmd->add_option("--max-eval", o->max_eval)->capture_default_str();
  cmd->add_option("--seed", o->seed)->capture_default_str();
  cmd->callback([o, paths] {
    o->model = (*paths)[0];
    o->corpus = (*paths)[1];
    o->out = (*paths)[2];
    ExperimentResult r = run_esft_experiment(*o);
    for (const auto& t : r.tasks) fmt::print("\n{}:\n{}", t.task, comparison_table(t));
    fmt::print("\nresults: {0}/results.md, {0}/results.json, {0}/report.html\n", o->out.string());
  });
}

}  // namespace

void add_esft_experiment_commands(CLI::App* esft) {
  add_tasks(esft);
  add_eval(esft);
  add_experiment(esft);
}

}  // namespace moekit::cli
