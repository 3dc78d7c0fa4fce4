// ESFT scores and selection: the official summary.json, intent.json and law.json reproduced byte
// for byte from the official routing logs, selection rules on hand-made cases, bad input.
#include <gtest/gtest.h>

#include <cstdlib>

#include "../cli/run_cli.h"
#include "../temp_dir.h"
#include "core/error.h"
#include "esft/expert_config.h"
#include "esft/scores.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;
const fs::path kShared = fs::path(MOEKIT_SOURCE_DIR) / "../shared";

// Unpacks the official logs of `task`; skips (fails under CI) when ../shared is absent.
bool unpack(const std::string& task, const fs::path& into) {
  const fs::path tgz = kShared / "fixtures/esft/routing" / (task + ".tar.gz");
  if (!fs::exists(tgz)) {
    const char* ci = std::getenv("CI");
    if (ci && std::string(ci) == "true") ADD_FAILURE() << tgz << " is missing under CI";
    return false;
  }
  const std::string cmd = "tar -xzf '" + tgz.string() + "' -C '" + into.string() + "'";
  return std::system(cmd.c_str()) == 0;
}

class Official : public ::testing::TestWithParam<std::string> {};

TEST_P(Official, ScoresAndSelectionMatchByteForByte) {
  test::TempDir tmp;
  const std::string task = GetParam();
  if (!unpack(task, tmp.path())) GTEST_SKIP() << "../shared is absent";
  const fs::path logs = tmp.path() / task;
  auto r = test::run_moekit("esft scores --routing " + logs.string() + " --out " +
                            (tmp.path() / "s.json").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("26 layers, 64 experts, K = 6"), std::string::npos) << r.out;
  EXPECT_EQ(test::slurp(tmp.path() / "s.json"), test::slurp(logs / "summary.json"));
  const std::string official =
      test::slurp(kShared / "fixtures/esft/expert_configs" / (task + ".json"));
  r = test::run_moekit("esft select --routing " + logs.string() +
                       " --score token --top-p 0.2 --out " + (tmp.path() / "c1.json").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(test::slurp(tmp.path() / "c1.json"), official);
  r = test::run_moekit("esft select --scores " + (logs / "summary.json").string() +
                       " --score token --top-p 0.2 --out " + (tmp.path() / "c2.json").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(test::slurp(tmp.path() / "c2.json"), official);
}

INSTANTIATE_TEST_SUITE_P(Tasks, Official, ::testing::Values("intent", "law"));

std::map<int, std::vector<SequenceRouting>> tiny_logs() {
  // Layer 3, K = 2, experts 0..3: tokens (0,1) (0,2) (0,1) (3,1).
  return {{3, {{{0, 1, 0, 2}, {0.5, 0.25, 0.5, 0.125}}, {{0, 1, 3, 1}, {0.75, 0.125, 0.5, 0.25}}}}};
}

TEST(EsftScores, FormulasOnAHandMadeLog) {
  auto logs = tiny_logs();
  EXPECT_EQ(infer_top_k(logs, "tiny"), 2);
  ExpertScores s = compute_scores(logs, 2);
  // N = 4 tokens, K = 2: ratios 3/8, 3/8, 1/8, 1/8; gate sums / 4.
  EXPECT_EQ(s.token.at(3), (std::vector<double>{0.375, 0.375, 0.125, 0.125}));
  // Gate: 1.75/4, 0.625/4 = 0.15625 -> 0.1562 and 0.125/4 = 0.03125 -> 0.0312 (Python's round:
  // exact binary halves go to even), 0.5/4.
  EXPECT_EQ(s.gate.at(3), (std::vector<double>{0.4375, 0.1562, 0.0312, 0.125}));
  EXPECT_EQ(
      summary_json(s),
      "{\"token_scores\": {\"3\": {\"0\": 0.375, \"1\": 0.375, \"2\": 0.125, \"3\": 0.125}}, "
      "\"gate_scores\": {\"3\": {\"0\": 0.4375, \"1\": 0.1562, \"2\": 0.0312, \"3\": 0.125}}}");
}

TEST(EsftSelect, RulesTiesGateAndFullMass) {
  std::map<int, std::vector<double>> sc = {{1, {0.1, 0.3, 0.3, 0.2, 0.1}},
                                           {10, {0.05, 0.05, 0.9, 0.0, 0.0}}};
  // p = 0.5: layer 1 takes 1, 2 (tie at 0.3 -> lower id first; 0.6 >= 0.5 stops); layer 10 takes 2.
  EXPECT_EQ(select_experts(sc, 0.5).to_json_text(),
            "{\"experts\": {\"1\": [1, 2], \"10\": [2]}, \"shared_experts\": false, "
            "\"non_expert_modules\": false}");
  // A tiny p still takes one expert per layer.
  EXPECT_EQ(select_experts(sc, 1e-9).experts.at(1), (std::vector<int>{1}));
  // p = 1: until the sum reaches 1 or all are taken (ties 0.1/0.1 in id order).
  EXPECT_EQ(select_experts(sc, 1.0).experts.at(1), (std::vector<int>{1, 2, 3, 0, 4}));
  // Layer 10 reaches a mass of 1 after three experts (0.9 + 0.05 + 0.05): the zeros stay out.
  EXPECT_EQ(select_experts(sc, 1.0).experts.at(10), (std::vector<int>{2, 0, 1}));
  EXPECT_THROW(select_experts(sc, 0.0), Error);
  EXPECT_THROW(select_experts(sc, 1.5), Error);
  // Gate scores select from the gate table.
  ExpertScores s = compute_scores(tiny_logs(), 2);
  EXPECT_EQ(select_experts(s.gate, 0.4).experts.at(3), (std::vector<int>{0}));
  EXPECT_EQ(select_experts(s.gate, 0.5).experts.at(3), (std::vector<int>{0, 1}));
}

TEST(EsftCli, BadInputFailsCleanly) {
  test::TempDir tmp;
  auto write_log = [&](const std::string& dir, const std::string& text) {
    fs::create_directories(tmp.path() / dir);
    std::ofstream(tmp.path() / dir / "expert_weights_1.txt") << text;
    return tmp.path() / dir;
  };
  const std::string good = "0\t1\t0\t2\t\t0.5\t0.25\t0.5\t0.125\n";
  struct Case {
    std::string args, expect;
  };
  const fs::path out = tmp.path() / "out.json";
  std::vector<Case> cases = {
      {"esft scores --routing " +
           write_log("ragged", good + good + "0\t1\t2\t\t0.1\t0.2\t0.3\n").string(),
       "expert_weights_1.txt:3: 3 expert ids is not a multiple of K = 2"},
      {"esft scores --routing " + write_log("count", "0\t1\t\t0.5\n").string(),
       "expert_weights_1.txt:1: 2 expert ids but 1 weights"},
      {"esft scores --routing " + write_log("nonnum", "0\tx\t\t0.5\t0.5\n").string(),
       "expert_weights_1.txt:1: expert id \"x\""},
      {"esft scores --routing " + write_log("nonnumw", "0\t1\t\t0.5\tabc\n").string(),
       "gate weight \"abc\""},
      {"esft scores --routing " + write_log("empty", "").string(), "empty routing log"},
      {"esft scores --routing " + (tmp.path() / "absent").string(), "routing directory not found"},
      {"esft scores --routing " +
           (fs::create_directories(tmp.path() / "nofiles"), tmp.path() / "nofiles").string(),
       "no expert_weights_<layer>.txt files"},
      {"esft select --routing " + write_log("ok1", good).string() + " --top-p 0",
       "--top-p must be in (0, 1]"},
      {"esft select --routing " + write_log("ok2", good).string() + " --top-p 1.01",
       "--top-p must be in (0, 1]"},
      {"esft select --routing " + write_log("ok3", good).string() + " --top-p 0.2 --score weird",
       "--score must be token or gate"},
  };
  std::ofstream(tmp.path() / "bad_summary.json") << R"({"token_scores": {"1": [0.5]}})";
  cases.push_back(
      {"esft select --scores " + (tmp.path() / "bad_summary.json").string() + " --top-p 0.2",
       "bad_summary.json: token_scores[\"1\"]"});
  for (const auto& c : cases) {
    std::string args = c.args + " --out " + out.string();
    auto r = test::run_moekit(args);
    EXPECT_EQ(r.rc, 2) << args;
    EXPECT_EQ(test::count_lines(r.err), 1) << r.err;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << args << "\n" << r.err;
    EXPECT_FALSE(fs::exists(out)) << args;
  }
}

}  // namespace
}  // namespace moekit
