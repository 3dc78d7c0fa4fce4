// The ESFT experiment: tasks -> routing -> scores -> selection -> fine-tuning runs -> evaluation,
// dispersion analysis and the written results (see experiment.h).
#include "esft/experiment.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "analysis/task_eval.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "esft/adapter.h"
#include "esft/expert_config.h"
#include "esft/route_logger.h"
#include "esft/scores.h"
#include "model/checkpoint.h"
#include "report/html_report.h"

extern char** environ;

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Runs `binary args...` with stdout+stderr into `log`; returns its exit status. (Its peak memory
// comes from the child itself: wait4's ru_maxrss would carry the parent's high-water mark across
// posix_spawn + exec.)
int run_child(const fs::path& binary, const std::vector<std::string>& args, const fs::path& log) {
  std::vector<std::string> all = {binary.string()};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = 0;
  const int err = posix_spawn(&pid, binary.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (err != 0) fail("{}: cannot start ({})", binary.string(), std::strerror(err));
  int status = 0;
  if (waitpid(pid, &status, 0) < 0) fail("{}: wait failed", binary.string());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  json j = json::parse(in, nullptr, false);
  if (!in || j.is_discarded()) fail("{}: cannot read JSON", p.string());
  return j;
}

double file_mib(const fs::path& p) {
  return double(fs::file_size(p)) / 1048576.0;
}

int64_t count_experts(const ExpertConfig& cfg) {
  int64_t n = 0;
  for (const auto& [l, v] : cfg.experts) n += int64_t(v.size());
  return n;
}

// Task accuracy and general loss of `model` as it stands.
void evaluate_into(MethodResult& m, DeepSeekModel& model, const Tokenizer& tok,
                   const std::vector<TaskItem>& eval, const ExperimentOptions& opt) {
  TaskAccuracy acc = evaluate_task(model, tok, eval);
  m.correct = acc.correct;
  m.total = acc.total;
  m.accuracy = acc.accuracy();
  m.samples = acc.samples;
  m.general_loss = corpus_loss(model, tok, opt.corpus / "val.jsonl", 128, opt.retention_tokens);
}

MethodResult run_method(const std::string& method, const fs::path& task_dir,
                        const fs::path& run_dir, const fs::path& base,
                        const std::vector<TaskItem>& eval, const ExpertConfig* cfg,
                        const fs::path& cfg_file, const ExperimentOptions& opt) {
  MethodResult m;
  m.method = method;
  const fs::path out = run_dir / method;
  std::vector<std::string> args = {"finetune",
                                   "--model",
                                   base.string(),
                                   "--data",
                                   (task_dir / "train.jsonl").string(),
                                   "--out",
                                   out.string(),
                                   "--steps",
                                   std::to_string(opt.steps),
                                   "--seq",
                                   std::to_string(opt.seq),
                                   "--batch",
                                   std::to_string(opt.batch),
                                   "--accumulation",
                                   "1",
                                   "--lr",
                                   fmt::format("{}", opt.lr),
                                   "--seed",
                                   std::to_string(opt.seed)};
  if (cfg) {
    args.insert(args.end(), {"--method", "esft", "--experts", cfg_file.string()});
    m.experts = count_experts(*cfg);
  } else {
    args.insert(args.end(), {"--method", "full"});
  }
  fmt::print("      {:<11} fine-tuning {} steps ...\n", method, opt.steps);
  std::fflush(stdout);
  fs::create_directories(run_dir);
  const fs::path log = run_dir / (method + ".log");
  const int rc = run_child(opt.moekit_binary, args, log);
  if (rc != 0) fail("fine-tuning {} failed (exit {}); see {}", method, rc, log.string());
  json fj = read_json(out / "finetune.json");
  m.trainable_params = fj["trainable_params"];
  m.step_seconds = fj["step_seconds"];
  m.tokens_per_s = double(fj["tokens_per_step"].get<int64_t>()) / m.step_seconds;
  m.train_loss = fj["last_loss"];
  m.peak_rss_mib = fj["peak_rss_mib"];
  m.state_mib =
      double(fj["grad_bytes"].get<int64_t>() + fj["optimizer_bytes"].get<int64_t>()) / 1048576.0;

  auto model = load_model(cfg ? base : out);
  if (cfg) {
    apply_adapter(*model, out);
    m.adapter_mib = file_mib(out / "adapter.safetensors");
  } else {
    m.adapter_mib = file_mib(out / "model.safetensors");
  }
  Tokenizer tok = Tokenizer::load(base / "tokenizer.json");
  evaluate_into(m, *model, tok, eval, opt);
  return m;
}

TaskResult run_task(const Task& task, const fs::path& base, const MethodResult& base_general,
                    const ExperimentOptions& opt) {
  TaskResult tr{
      task.name, task.description, int64_t(task.train.size()), int64_t(task.eval.size()), {}, {}};
  const fs::path task_dir = opt.out / "tasks" / task.name, run_dir = opt.out / task.name;
  write_task(task, task_dir);
  fmt::print("  task {}: {} train / {} eval items ({})\n", task.name, task.train.size(),
             task.eval.size(), task.description);

  auto model = load_model(base);
  Tokenizer tok = Tokenizer::load(base / "tokenizer.json");
  const fs::path routing = run_dir / "routing";
  log_routing(*model, tok, task_dir / "train.jsonl", opt.route_tokens, routing);
  auto logs = read_routing_dir(routing);
  const int64_t top_k = model->config().num_experts_per_tok;
  ExpertScores scores = compute_scores(logs, top_k, model->config().n_routed_experts);
  write_file_atomic(run_dir / "summary.json", summary_json(scores));
  ExpertConfig token_cfg = select_experts(scores.token, opt.token_p),
               gate_cfg = select_experts(scores.gate, opt.gate_p);
  write_file_atomic(run_dir / "token.json", token_cfg.to_json_text());
  write_file_atomic(run_dir / "gate.json", gate_cfg.to_json_text());
  tr.dispersion = routing_dispersion(task.name, logs, model->config().n_routed_experts);

  MethodResult b = base_general;
  b.method = "base";
  TaskAccuracy acc = evaluate_task(*model, tok, task.eval);
  b.correct = acc.correct, b.total = acc.total, b.accuracy = acc.accuracy(),
  b.samples = acc.samples;
  model.reset();
  tr.methods.push_back(b);
  for (const auto& method : opt.methods) {
    if (method == "esft-token")
      tr.methods.push_back(run_method(method, task_dir, run_dir, base, task.eval, &token_cfg,
                                      run_dir / "token.json", opt));
    else if (method == "esft-gate")
      tr.methods.push_back(run_method(method, task_dir, run_dir, base, task.eval, &gate_cfg,
                                      run_dir / "gate.json", opt));
    else if (method == "full")
      tr.methods.push_back(
          run_method(method, task_dir, run_dir, base, task.eval, nullptr, {}, opt));
    else
      fail("--methods: unknown method \"{}\" (esft-token, esft-gate, full)", method);
  }
  return tr;
}

json to_json(const ExperimentResult& r) {
  json tasks = json::array();
  for (const auto& t : r.tasks) {
    json methods = json::array();
    for (const auto& m : t.methods)
      methods.push_back({{"method", m.method},
                         {"accuracy", m.accuracy},
                         {"correct", m.correct},
                         {"total", m.total},
                         {"general_loss", m.general_loss},
                         {"general_ppl", std::exp(m.general_loss)},
                         {"trainable_params", m.trainable_params},
                         {"experts", m.experts},
                         {"step_seconds", m.step_seconds},
                         {"tokens_per_s", m.tokens_per_s},
                         {"peak_rss_mib", m.peak_rss_mib},
                         {"grad_adamw_mib", m.state_mib},
                         {"adapter_mib", m.adapter_mib},
                         {"train_loss", m.train_loss}});
    json layers = json::array();
    for (const auto& l : t.dispersion.layers)
      layers.push_back({{"layer", l.layer},
                        {"experts_50", l.experts_50},
                        {"experts_80", l.experts_80},
                        {"share", l.share}});
    tasks.push_back({{"task", t.task},
                     {"description", t.description},
                     {"train_items", t.train_items},
                     {"eval_items", t.eval_items},
                     {"methods", methods},
                     {"dispersion", layers}});
  }
  return {{"tasks", tasks}, {"overlap_50", r.overlap_50}};
}

std::string fmt_params(int64_t n) {
  return n >= 1000000 ? fmt::format("{:.2f}M", double(n) / 1e6)
                      : fmt::format("{:.1f}k", double(n) / 1e3);
}

std::vector<std::vector<std::string>> table_rows(const TaskResult& t) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& m : t.methods) {
    const bool base = m.method == "base";
    rows.push_back({m.method, fmt::format("{:.1f}% ({}/{})", 100 * m.accuracy, m.correct, m.total),
                    fmt::format("{:.2f}", std::exp(m.general_loss)),
                    base ? "-"
                         : fmt_params(m.trainable_params) +
                               (m.experts ? fmt::format(" ({} experts)", m.experts) : ""),
                    base ? "-" : fmt::format("{:.0f} ms", 1000 * m.step_seconds),
                    base ? "-" : fmt::format("{:.2f}", m.state_mib),
                    base ? "-" : fmt::format("{:.0f}", m.peak_rss_mib),
                    base ? "-" : fmt::format("{:.2f}", m.adapter_mib)});
  }
  return rows;
}

const std::vector<std::string> kHeader = {"method",           "task exact match", "general val ppl",
                                          "trainable params", "step time",        "grad+AdamW MiB",
                                          "peak RSS MiB",     "adapter MiB"};

void write_report(const ExperimentResult& r, const ExperimentOptions& opt) {
  HtmlReport rep("moekit ESFT experiment");
  rep.add_paragraph(fmt::format(
      "Base model {}; {} fine-tuning steps of {} x {} tokens, lr {}, ESFT-token p = {}, "
      "ESFT-gate p = {}.",
      opt.model.string(), opt.steps, opt.batch, opt.seq, opt.lr, opt.token_p, opt.gate_p));
  for (const auto& t : r.tasks)
    rep.add_table("Task " + t.task + ": " + t.description, kHeader, table_rows(t));
  std::vector<std::string> disp_header = {"task"};
  for (const auto& l : r.tasks.front().dispersion.layers)
    disp_header.push_back(fmt::format("layer {} (50% / 80%)", l.layer));
  std::vector<std::vector<std::string>> disp_rows;
  for (const auto& t : r.tasks) {
    std::vector<std::string> row = {t.task};
    for (const auto& l : t.dispersion.layers)
      row.push_back(fmt::format("{} / {}", l.experts_50, l.experts_80));
    disp_rows.push_back(row);
  }
  rep.add_table("Experts covering 50% / 80% of the routing per task and MoE layer", disp_header,
                disp_rows);
  std::vector<std::string> ov_header = {""};
  for (const auto& t : r.tasks) ov_header.push_back(t.task);
  std::vector<std::vector<std::string>> ov_rows;
  for (size_t i = 0; i < r.tasks.size(); ++i) {
    std::vector<std::string> row = {r.tasks[i].task};
    for (size_t j = 0; j < r.tasks.size(); ++j)
      row.push_back(fmt::format("{:.2f}", r.overlap_50[i][j]));
    ov_rows.push_back(row);
  }
  rep.add_table("Overlap between tasks (mean Jaccard of the 50%-mass expert sets)", ov_header,
                ov_rows);
  for (const auto& t : r.tasks) {
    std::vector<std::string> rows, cols;
    std::vector<std::vector<double>> values;
    for (const auto& l : t.dispersion.layers) {
      rows.push_back(fmt::format("layer {}", l.layer));
      std::vector<double> v;
      for (double s : l.share) v.push_back(s * double(l.share.size()));  // 1 = uniform
      values.push_back(v);
    }
    for (size_t e = 0; e < t.dispersion.layers.front().share.size(); ++e)
      cols.push_back(std::to_string(e));
    HeatmapOptions ho;
    ho.value_label = "routing share / uniform share";
    ho.diverging = true;
    ho.center = 1.0;
    ho.row_title = "MoE layer";
    ho.col_title = "routed expert";
    rep.add_heatmap("Routing of task " + t.task, rows, cols, values, ho);
  }
  rep.write(opt.out / "report.html");
}

}  // namespace

std::string comparison_table(const TaskResult& t) {
  std::string s = "|";
  for (const auto& h : kHeader) s += " " + h + " |";
  s += "\n|";
  for (size_t i = 0; i < kHeader.size(); ++i) s += "---|";
  s += "\n";
  for (const auto& row : table_rows(t)) {
    s += "|";
    for (const auto& c : row) s += " " + c + " |";
    s += "\n";
  }
  return s;
}

ExperimentResult run_esft_experiment(const ExperimentOptions& opt) {
  if (!(opt.token_p > 0 && opt.token_p <= 1) || !(opt.gate_p > 0 && opt.gate_p <= 1))
    fail("--token-p and --gate-p must be in (0, 1]");
  TaskOptions to;
  to.max_train = opt.max_train;
  to.max_eval = opt.max_eval;
  to.seed = opt.seed;
  std::vector<Task> all = build_tasks(opt.corpus, to);
  std::vector<Task> tasks;
  for (const auto& name : opt.tasks) {
    auto it = std::find_if(all.begin(), all.end(), [&](const Task& t) { return t.name == name; });
    if (it == all.end())
      fail("--tasks: unknown task \"{}\" (translate, arithmetic, license)", name);
    tasks.push_back(*it);
  }
  for (const auto& m : opt.methods)
    if (m != "esft-token" && m != "esft-gate" && m != "full")
      fail("--methods: unknown method \"{}\" (esft-token, esft-gate, full)", m);
  fs::create_directories(opt.out);
  const fs::path base = fs::absolute(opt.model);
  MethodResult base_general;
  {
    auto model = load_model(base);
    Tokenizer tok = Tokenizer::load(base / "tokenizer.json");
    base_general.general_loss =
        corpus_loss(*model, tok, opt.corpus / "val.jsonl", 128, opt.retention_tokens);
  }
  ExperimentResult r;
  for (const auto& t : tasks) r.tasks.push_back(run_task(t, base, base_general, opt));
  for (const auto& a : r.tasks) {
    std::vector<double> row;
    for (const auto& b : r.tasks)
      row.push_back(dispersion_overlap(a.dispersion, b.dispersion, 0.5));
    r.overlap_50.push_back(row);
  }
  write_file_atomic(opt.out / "results.json", to_json(r).dump(2) + "\n");
  std::string md;
  for (const auto& t : r.tasks) md += "### " + t.task + "\n\n" + comparison_table(t) + "\n";
  write_file_atomic(opt.out / "results.md", md);
  write_report(r, opt);
  return r;
}

}  // namespace moekit
