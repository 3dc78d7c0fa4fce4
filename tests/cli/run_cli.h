// Runs the built `moekit` binary for CLI contract tests and captures exit code and output.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

namespace moekit::test {

struct CliResult {
  int rc = -1;
  std::string out, err;
};

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A fresh temporary directory under the build tree's TMPDIR.
inline std::filesystem::path temp_dir(const std::string& tag) {
  std::random_device rd;
  auto d =
      std::filesystem::temp_directory_path() / ("moekit-test-" + tag + "-" + std::to_string(rd()));
  std::filesystem::create_directories(d);
  return d;
}

// `prefix` runs in the same shell first; `args` follow the binary path.
inline CliResult run_moekit_wrapped(const std::string& prefix, const std::string& args) {
  auto dir = temp_dir("cli");
  std::string cmd = prefix + std::string(MOEKIT_BINARY) + " " + args + " >" +
                    (dir / "out").string() + " 2>" + (dir / "err").string();
  int status = std::system(cmd.c_str());
  CliResult r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(dir / "out");
  r.err = slurp(dir / "err");
  std::filesystem::remove_all(dir);
  return r;
}

inline CliResult run_moekit(const std::string& args) {
  return run_moekit_wrapped("", args);
}

// As run_moekit, with the file-size limit set to `kib` KiB (SIGXFSZ ignored, so writes past it
// fail with EFBIG the way a full disk fails them with ENOSPC).
inline CliResult run_moekit_limited(const std::string& args, int kib) {
  return run_moekit_wrapped("ulimit -f " + std::to_string(kib) + "; trap '' XFSZ; ", args);
}

inline int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace moekit::test
