// route -> scores -> select on a small random model: the logs are in the official format, K and
// the layers come out of the data, and the token scores of each layer sum to 1.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "../cli/run_cli.h"
#include "../temp_dir.h"
#include "esft_fixture.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

TEST(EsftRoute, RouteScoresSelectChain) {
  test::TempDir tmp;
  const fs::path model_dir = test::make_task_and_base(tmp.path(), 20, 0.5f);

  auto r = test::run_moekit("esft route --model " + model_dir.string() + " --data " +
                            (tmp.path() / "task.jsonl").string() + " --tokens 150 --out " +
                            (tmp.path() / "logs").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("logged 150 tokens"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(tmp.path() / "logs/expert_weights_1.txt"));  // layer 0 is dense
  EXPECT_FALSE(fs::exists(tmp.path() / "logs/expert_weights_0.txt"));
  r = test::run_moekit("esft scores --routing " + (tmp.path() / "logs").string() + " --out " +
                       (tmp.path() / "summary.json").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("1 layers, 8 experts, K = 2"), std::string::npos) << r.out;
  auto s = nlohmann::json::parse(test::slurp(tmp.path() / "summary.json"));
  double sum = 0;
  for (auto& [e, v] : s["token_scores"]["1"].items()) sum += v.get<double>();
  EXPECT_NEAR(sum, 1.0, 1e-3);
  r = test::run_moekit("esft select --scores " + (tmp.path() / "summary.json").string() +
                       " --score gate --top-p 0.5 --out " + (tmp.path() / "cfg.json").string());
  ASSERT_EQ(r.rc, 0) << r.err;
  auto cfg = nlohmann::json::parse(test::slurp(tmp.path() / "cfg.json"));
  EXPECT_GE(cfg["experts"]["1"].size(), 1u);

  std::ofstream(tmp.path() / "bad.jsonl")
      << R"({"messages": [{"role": "user", "content": "no answer"}]})"
      << "\n";
  r = test::run_moekit("esft route --model " + model_dir.string() + " --data " +
                       (tmp.path() / "bad.jsonl").string() + " --out " +
                       (tmp.path() / "logs2").string());
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("bad.jsonl:1: row has no user and assistant message"), std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "logs2"));
}

}  // namespace
}  // namespace moekit
