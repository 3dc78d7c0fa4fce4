// Progress: a one-line bar with rate and ETA when stdout is a terminal, plain log lines
// otherwise (so CI logs and pipes stay readable).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moekit {

class Progress {
 public:
  Progress(std::string label, int64_t total, std::string unit = "step");
  // Advances to `done` and shows `note` (e.g. "loss 3.21"); prints at most ~10 times a second on
  // a terminal, and every `plain_every` updates otherwise.
  void update(int64_t done, const std::string& note = "", double units_per_step = 1.0);
  void finish(const std::string& note = "");
  void set_plain_every(int64_t n) { plain_every_ = n; }

 private:
  std::string label_, unit_;
  int64_t total_, start_done_ = -1, plain_every_ = 10;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace moekit
