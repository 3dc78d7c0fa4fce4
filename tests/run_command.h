// Test helper: runs a shell command (usually the moekit binary) and returns its exit status and
// output, so CLI tests can assert on both. Header-only; shared by tests that drive the CLI.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace moekit::test {

struct CommandResult {
  int status = -1;     // exit status, -1 when the command did not exit normally
  std::string output;  // stdout, and stderr when the command redirects it (2>&1)
};

inline CommandResult run_command(const std::string& cmd) {
  CommandResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int raw = pclose(p);
  if (raw != -1 && WIFEXITED(raw)) r.status = WEXITSTATUS(raw);
  return r;
}

// The moekit binary with arguments; stderr is merged into output (run_cli.h keeps them apart).
inline CommandResult run_moekit_merged(const std::string& args) {
  return run_command(std::string("'") + MOEKIT_BINARY + "' " + args + " 2>&1");
}

}  // namespace moekit::test
