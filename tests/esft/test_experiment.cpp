// The ESFT experiment's parts: tasks built from a corpus (disjoint splits, correct answers),
// exact-match evaluation, frozen tensors untouched by training, and the experiment end to end on
// a tiny model.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "../cli/run_cli.h"
#include "../temp_dir.h"
#include "analysis/task_eval.h"
#include "esft/finetune.h"
#include "esft/tasks.h"
#include "esft_fixture.h"
#include "model/checkpoint.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A corpus in the scripts/corpus layout: two licenses, some text, dictionary pairs.
void make_corpus(const fs::path& dir) {
  fs::create_directories(dir);
  std::ofstream train(dir / "train.jsonl"), val(dir / "val.jsonl"),
      pairs(dir / "translation_pairs.tsv");
  for (const char* lic : {"GPL-3", "MIT-ish"}) {
    std::string text;
    for (int i = 0; i < 40; ++i) text += std::string(lic) + " line " + std::to_string(i) + "\n";
    train << json{{"domain", "legal"},
                  {"source", std::string("/usr/share/common-licenses/") + lic},
                  {"text", text}}
                 .dump()
          << "\n";
  }
  for (int i = 0; i < 30; ++i)
    val << json{{"domain", "literature"},
                {"source", "x"},
                {"text", "In the beginning " + std::to_string(i)}}
               .dump()
        << "\n";
  for (int i = 0; i < 200; ++i)
    pairs << "word" << char('a' + i % 26) << char('a' + i / 26) << "\tmot" << i << ", terme" << i
          << "\n";
  pairs << "two words\tdeux mots\n... ago\til y a ...\n";
}

TEST(EsftTasks, SplitsAreDisjointAndAnswersRight) {
  test::TempDir tmp;
  make_corpus(tmp.path());
  TaskOptions o;
  o.max_train = 500;
  o.max_eval = 40;
  auto tasks = build_tasks(tmp.path(), o);
  ASSERT_EQ(tasks.size(), 3u);
  for (const Task& t : tasks) {
    std::set<std::string> train;
    for (const auto& it : t.train) train.insert(it.user);
    for (const auto& it : t.eval) EXPECT_EQ(train.count(it.user), 0u) << t.name << ": " << it.user;
    EXPECT_FALSE(t.train.empty()) << t.name;
    EXPECT_FALSE(t.eval.empty()) << t.name;
    EXPECT_LE(int64_t(t.eval.size()), o.max_eval);
  }
  // translate: only plain words; both alternatives accepted.
  for (const auto& it : tasks[0].train) {
    EXPECT_EQ(it.user.find(' ', 21), std::string::npos) << it.user;
    ASSERT_EQ(it.answers.size(), 2u);
    EXPECT_EQ(it.answers[0].substr(0, 3), "mot");
    EXPECT_EQ(it.answers[1].substr(0, 5), "terme");
  }
  EXPECT_EQ(tasks[0].train.size() + tasks[0].eval.size(), 200u);
  // arithmetic: every answer is the value of its question.
  EXPECT_EQ(int64_t(tasks[1].eval.size()), o.max_eval);
  for (const auto& it : tasks[1].train) {
    long a = 0, b = 0;
    char op = 0;
    ASSERT_EQ(std::sscanf(it.user.c_str(), "%ld %c %ld", &a, &op, &b), 3) << it.user;
    const long want = op == '+' ? a + b : op == '-' ? a - b : a * b;
    EXPECT_EQ(it.answers[0], std::to_string(want)) << it.user;
  }
  // license: 40 lines -> 10 windows each, every fifth held out; the label is the file name.
  EXPECT_EQ(tasks[2].train.size(), 16u);
  EXPECT_EQ(tasks[2].eval.size(), 4u);
  for (const auto& it : tasks[2].eval)
    EXPECT_NE(it.user.find(it.answers[0] + " line"), std::string::npos) << it.user;
}

TEST(EsftTasks, MissingCorpusIsAClearError) {
  test::TempDir tmp;
  try {
    build_tasks(tmp.path(), {});
    FAIL() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("translation_pairs.tsv"), std::string::npos) << e.what();
  }
}

TEST(TaskEval, ExactMatchCountsOnlyEqualAnswers) {
  test::TempDir tmp;
  const fs::path base = test::make_task_and_base(tmp.path(), 20, 0.2f);
  auto model = load_model(base);
  Tokenizer tok = Tokenizer::load(base / "tokenizer.json");
  // What the model says is, by definition, right for one item and wrong for the other.
  TaskAccuracy probe = evaluate_task(*model, tok, {{"What is 1 + 2?", {"?"}}}, 6);
  ASSERT_EQ(probe.samples.size(), 1u);
  const std::string said = probe.samples[0].second;
  TaskAccuracy acc = evaluate_task(
      *model, tok, {{"What is 1 + 2?", {"nope", said}}, {"What is 1 + 2?", {said + "x"}}}, 6);
  EXPECT_EQ(acc.total, 2);
  EXPECT_EQ(acc.correct, 1);
  EXPECT_DOUBLE_EQ(acc.accuracy(), 0.5);
}

TEST(EsftFinetune, FrozenTensorsAreBitIdenticalAfterTraining) {
  test::TempDir tmp;
  const fs::path base = test::make_task_and_base(tmp.path(), 60, 0.2f);
  auto model = load_model(base);
  Tokenizer tok = Tokenizer::load(base / "tokenizer.json");
  ExpertConfig cfg;
  cfg.experts[1] = {1, 3};
  apply_expert_config(*model, cfg, "cfg");
  std::map<std::string, std::vector<char>> before;
  for (const auto& p : model->params().all()) {
    const char* b = static_cast<const char*>(p->value.raw());
    before[p->name].assign(b, b + p->value.nbytes());
  }
  FinetuneOptions o;
  o.data = tmp.path() / "task.jsonl";
  o.steps = 4;
  o.seq = 64;
  o.accumulation = 1;
  o.lr = 1e-2;
  o.log_every = 100;
  finetune_model(*model, tok, o);
  int changed = 0, frozen = 0;
  for (const auto& p : model->params().all()) {
    const auto& b = before[p->name];
    const bool same = std::memcmp(b.data(), p->value.raw(), b.size()) == 0;
    if (p->trainable) {
      EXPECT_FALSE(same) << p->name << " trained but did not change";
      EXPECT_TRUE(p->grad.defined()) << p->name;
      ++changed;
    } else {
      EXPECT_TRUE(same) << p->name << " is frozen but changed";
      EXPECT_FALSE(p->grad.defined()) << p->name << " is frozen but has a gradient buffer";
      ++frozen;
    }
  }
  EXPECT_EQ(changed, 6);  // 2 experts x (gate, up, down)
  EXPECT_GT(frozen, 20);
}

TEST(EsftExperiment, RunsEndToEndAndWritesTheComparison) {
  test::TempDir tmp;
  const fs::path base = test::make_task_and_base(tmp.path(), 20, 0.2f);
  make_corpus(tmp.path() / "corpus");
  const fs::path out = tmp.path() / "exp";
  auto r = test::run_moekit("esft experiment --model " + base.string() + " --corpus " +
                            (tmp.path() / "corpus").string() + " --out " + out.string() +
                            " --steps 2 --seq 64 --batch 2 --max-train 60 --max-eval 4 "
                            "--route-tokens 2000 --tasks translate,license");
  ASSERT_EQ(r.rc, 0) << r.out << r.err;
  std::ifstream in(out / "results.json");
  json j = json::parse(in);
  ASSERT_EQ(j["tasks"].size(), 2u);
  for (const auto& t : j["tasks"]) {
    ASSERT_EQ(t["methods"].size(), 4u);
    EXPECT_EQ(t["methods"][0]["method"], "base");
    const auto& full = t["methods"][3];
    const auto& tok = t["methods"][1];
    EXPECT_EQ(full["method"], "full");
    EXPECT_GT(full["trainable_params"].get<int64_t>(), 10 * tok["trainable_params"].get<int64_t>());
    EXPECT_GT(full["adapter_mib"].get<double>(), tok["adapter_mib"].get<double>());
    EXPECT_GT(tok["peak_rss_mib"].get<double>(), 0.0);
    EXPECT_EQ(tok["total"].get<int64_t>(), t["eval_items"].get<int64_t>());
    // Fine-tuning changes the model, so retention differs from the base.
    EXPECT_NE(full["general_loss"].get<double>(), t["methods"][0]["general_loss"].get<double>());
    // The tiny model has MoE layers 1..: shares per layer sum to 1.
    for (const auto& l : t["dispersion"]) {
      double s = 0;
      for (double v : l["share"]) s += v;
      EXPECT_NEAR(s, 1.0, 1e-9);
      EXPECT_LE(l["experts_50"].get<int64_t>(), l["experts_80"].get<int64_t>());
    }
  }
  EXPECT_DOUBLE_EQ(j["overlap_50"][0][0].get<double>(), 1.0);
  const std::string html = test::slurp(out / "report.html");
  EXPECT_EQ(std::count(html.begin(), html.end(), '\0'), 0);
  size_t heatmaps = 0;
  for (size_t p = html.find("class=\"chart heatmap\""); p != std::string::npos;
       p = html.find("class=\"chart heatmap\"", p + 1))
    ++heatmaps;
  EXPECT_EQ(heatmaps, 2u);
  // Every row of the Markdown table has as many cells as its header.
  const std::string md = test::slurp(out / "results.md");
  EXPECT_NE(md.find("| esft-gate |"), std::string::npos);
  std::istringstream lines(md);
  std::string line;
  long cells = -1;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] != '|') continue;
    const long n = long(std::count(line.begin(), line.end(), '|'));
    if (cells < 0) cells = n;
    EXPECT_EQ(n, cells) << line;
  }
}

}  // namespace
}  // namespace moekit

namespace moekit {
namespace {

TEST(EsftExperiment, BadOptionsAreOneLineErrors) {
  test::TempDir tmp;
  const std::filesystem::path base = test::make_task_and_base(tmp.path(), 20, 0.2f);
  make_corpus(tmp.path() / "corpus");
  const std::string common = "esft experiment --model " + base.string() + " --corpus " +
                             (tmp.path() / "corpus").string() + " --out " +
                             (tmp.path() / "exp").string();
  struct Case {
    std::string args, message;
  };
  for (const Case& c : std::vector<Case>{
           {" --tasks poetry", "unknown task \"poetry\""},
           {" --token-p 0", "--token-p and --gate-p must be in (0, 1]"},
           {" --gate-p 1.5", "--token-p and --gate-p must be in (0, 1]"},
           {" --tasks license --methods lora --steps 1", "unknown method \"lora\""}}) {
    auto r = test::run_moekit(common + c.args);
    EXPECT_EQ(r.rc, 2) << c.args;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  auto r = test::run_moekit("esft eval --model " + base.string() + " --data " +
                            (tmp.path() / "missing.jsonl").string());
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("missing.jsonl: cannot read file"), std::string::npos) << r.err;
  // Eval rows: answers must be strings; a row needs a user turn and an answer.
  for (const Case& c :
       std::vector<Case>{{R"({"messages": [{"role": "user", "content": "q"}], "answers": [1]})",
                          "bad.jsonl:1: \"answers\" must be a non-empty list of strings"},
                         {R"({"messages": [{"role": "user", "content": "q"}]})",
                          "bad.jsonl:1: row needs a user message and an answer"},
                         {R"({"messages": [{"content": "q"}]})",
                          "bad.jsonl:1: every message needs a role and a string content"}}) {
    std::ofstream(tmp.path() / "bad.jsonl") << c.args << "\n";
    auto e = test::run_moekit("esft eval --model " + base.string() + " --data " +
                              (tmp.path() / "bad.jsonl").string());
    EXPECT_EQ(e.rc, 2) << c.args;
    EXPECT_NE(e.err.find(c.message), std::string::npos) << c.args << ": " << e.err;
  }
}

}  // namespace
}  // namespace moekit
