// Pretraining: determinism, exact resume after SIGKILL, and every bad input the issue lists.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "../cli/run_cli.h"
#include "../temp_dir.h"
#include "train_fixture.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::run_moekit;

std::string train_args(const fs::path& data, const fs::path& out, int steps) {
  return "--threads 2 train --config " + std::string(MOEKIT_SOURCE_DIR) +
         "/tests/fixtures/train/tiny.json --data " + data.string() + " --out " + out.string() +
         " --steps " + std::to_string(steps) +
         " --batch 2 --seq 32 --log-every 1 --eval-every 4 --eval-batches 2 --save-every 2 --keep "
         "2";
}

// The loss curve without timings (tokens_per_s differs run to run).
std::vector<json> curve(const fs::path& run) {
  std::vector<json> rows;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line);
    j.erase("tokens_per_s");
    rows.push_back(j);
  }
  return rows;
}

TEST(Trainer, SameSeedSameBits) {
  test::TempDir tmp;
  fs::path data = test::make_train_data(tmp.path() / "data");
  auto a = run_moekit(train_args(data, tmp.path() / "a", 6));
  auto b = run_moekit(train_args(data, tmp.path() / "b", 6));
  ASSERT_EQ(a.rc, 0) << a.err;
  ASSERT_EQ(b.rc, 0) << b.err;
  EXPECT_EQ(test::slurp(tmp.path() / "a/final/model.safetensors"),
            test::slurp(tmp.path() / "b/final/model.safetensors"));
  EXPECT_EQ(curve(tmp.path() / "a"), curve(tmp.path() / "b"));
  // The metrics contract.
  auto rows = curve(tmp.path() / "a");
  ASSERT_EQ(rows.size(), 6u);
  for (const char* f : {"step", "loss", "lr", "maxvio"}) EXPECT_TRUE(rows[0].contains(f)) << f;
  EXPECT_TRUE(rows[3].contains("val_loss"));
  EXPECT_TRUE(fs::exists(tmp.path() / "a/final/config.json"));
  EXPECT_TRUE(fs::exists(tmp.path() / "a/final/tokenizer.json"));
}

// SIGKILL at a random moment after the first checkpoint, then --resume: final weights and loss
// curve are bit-identical to an uninterrupted run.
TEST(Trainer, ResumeAfterSigkillIsBitExact) {
  test::TempDir tmp;
  fs::path data = test::make_train_data(tmp.path() / "data");
  const int steps = 40;
  auto t0 = std::chrono::steady_clock::now();
  auto ref = run_moekit(train_args(data, tmp.path() / "ref", steps));
  ASSERT_EQ(ref.rc, 0) << ref.err;
  const auto run_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count();

  // Start a run, wait for its first checkpoint, then kill it somewhere in the first half of the
  // remaining time (mid-step, mid-checkpoint or between: whatever the clock gives). The
  // reference run's duration only estimates this run's (parallel tests share the cores): when the
  // run finishes before the kill, try again with half the delay bound.
  fs::path run;
  int delay_ms = 0;
  bool killed = false;
  int64_t bound_ms = std::max<int64_t>(1, run_ms / 2);
  for (int attempt = 0; attempt < 6 && !killed;
       ++attempt, bound_ms = std::max<int64_t>(1, bound_ms / 2)) {
    run = tmp.path() / ("killed-" + std::to_string(attempt));
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      std::string cmd =
          std::string(MOEKIT_BINARY) + " " + train_args(data, run, steps) + " >/dev/null 2>&1";
      execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), nullptr);
      _exit(127);
    }
    while (!fs::exists(run / "checkpoints/step-00000002") && waitpid(pid, nullptr, WNOHANG) == 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::random_device rd;
    delay_ms = int(rd() % uint32_t(bound_ms));
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    killed = WIFSIGNALED(status);
  }
  ASSERT_TRUE(killed) << "every run ended before its kill (last delay " << delay_ms << " ms)";
  ASSERT_FALSE(fs::exists(run / "final/model.safetensors"));
  auto resumed = run_moekit(train_args(data, run, steps) + " --resume");
  ASSERT_EQ(resumed.rc, 0) << resumed.err << " (killed after " << delay_ms << " ms)";
  EXPECT_NE(resumed.out.find("resuming from"), std::string::npos) << resumed.out;
  EXPECT_EQ(test::slurp(tmp.path() / "ref/final/model.safetensors"),
            test::slurp(run / "final/model.safetensors"))
      << "killed after " << delay_ms << " ms";
  EXPECT_EQ(curve(tmp.path() / "ref"), curve(run));
}

void expect_error(const test::CliResult& r, const std::string& what) {
  EXPECT_EQ(r.rc, 2) << r.err;
  EXPECT_EQ(test::count_lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << r.err;
}

TEST(Trainer, BadInputs) {
  test::TempDir tmp;
  fs::path data = test::make_train_data(tmp.path() / "data");
  // Missing and empty data directories.
  expect_error(run_moekit(train_args(tmp.path() / "nope", tmp.path() / "r0", 2)), "nope");
  fs::create_directories(tmp.path() / "empty");
  fs::copy_file(data / "tokenizer.json", tmp.path() / "empty/tokenizer.json");
  expect_error(run_moekit(train_args(tmp.path() / "empty", tmp.path() / "r1", 2)), "train.jsonl");
  // Invalid model config.
  std::ofstream(tmp.path() / "bad.json") << R"({"model_type": "deepseek_v3", "hidden_size": -4})";
  auto r = run_moekit("train --config " + (tmp.path() / "bad.json").string() + " --data " +
                      data.string() + " --out " + (tmp.path() / "r2").string() + " --steps 2");
  expect_error(r, "bad.json");
  // A config that cannot fit in memory says how much it needs.
  auto huge =
      json::parse(test::slurp(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json"));
  huge["hidden_size"] = 65536;
  huge["num_hidden_layers"] = 200;
  std::ofstream(tmp.path() / "huge.json") << huge.dump();
  r = run_moekit("train --config " + (tmp.path() / "huge.json").string() + " --data " +
                 data.string() + " --out " + (tmp.path() / "r3").string() + " --steps 2");
  expect_error(r, "needs");
  // Resume with another config.
  ASSERT_EQ(run_moekit(train_args(data, tmp.path() / "r4", 2)).rc, 0);
  auto other =
      json::parse(test::slurp(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json"));
  other["num_hidden_layers"] = 3;
  std::ofstream(tmp.path() / "other.json") << other.dump();
  r = run_moekit("train --config " + (tmp.path() / "other.json").string() + " --data " +
                 data.string() + " --out " + (tmp.path() / "r4").string() + " --steps 4 --resume");
  expect_error(r, "num_hidden_layers");
  // A corrupt checkpoint is named.
  fs::path ck = tmp.path() / "r4/checkpoints/step-00000002/model.safetensors";
  fs::resize_file(ck, fs::file_size(ck) / 3);
  r = run_moekit(train_args(data, tmp.path() / "r4", 4) + " --resume");
  expect_error(r, "step-00000002");
  // NaN/Inf loss stops with the step number and keeps the last good checkpoint.
  r = run_moekit(train_args(data, tmp.path() / "r5", 6) + " --lr 1e30 --grad-clip 0");
  expect_error(r, "stopping. Last good checkpoint:");
  EXPECT_NE(r.err.find("step "), std::string::npos) << r.err;
}

// Disk full while saving: the previous checkpoint stays intact and the error is one line.
TEST(Trainer, DiskFullKeepsOldCheckpoint) {
  test::TempDir tmp;
  fs::path data = test::make_train_data(tmp.path() / "data");
  ASSERT_EQ(run_moekit(train_args(data, tmp.path() / "run", 2)).rc, 0);
  const fs::path ck = tmp.path() / "run/checkpoints/step-00000002/model.safetensors";
  const std::string before = test::slurp(ck);
  // RLIMIT_FSIZE makes large writes fail with EFBIG, as a full disk fails them with ENOSPC.
  auto r = test::run_moekit_limited(train_args(data, tmp.path() / "run", 4) + " --resume", 64);
  EXPECT_EQ(r.rc, 2) << r.err;
  EXPECT_EQ(test::count_lines(r.err), 1) << r.err;
  EXPECT_EQ(test::slurp(ck), before);
  EXPECT_FALSE(fs::exists(tmp.path() / "run/checkpoints/step-00000004"));
}

}  // namespace
}  // namespace moekit
