// Wall-clock time per named model step, for finding where a step's time goes on a device that
// queues work asynchronously (no hardware profiler on the lent GPU machines). Off unless
// MOEKIT_PROFILE=1: then each scope waits for the device on entry and exit (which costs speed;
// the figures are for proportions, not for throughput). One process-wide table: a diagnostic,
// read once at the end (`profile_report`).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moekit {

class Backend;

bool profiling();  // MOEKIT_PROFILE is set (read once)

// Consecutive steps of one function: next("b") ends step "a" and starts "b"; the destructor ends
// the last. Avoids wrapping each step's code in a block of its own. Ending a step waits for the
// device, which may report a deferred device error: so it may throw, except while another
// exception unwinds (then it records nothing).
class ProfileSteps {
 public:
  explicit ProfileSteps(Backend& be) : be_(&be) {}
  void next(const char* name);
  void end();
  ~ProfileSteps() noexcept(false) { end(); }
  ProfileSteps(const ProfileSteps&) = delete;
  ProfileSteps& operator=(const ProfileSteps&) = delete;

 private:
  Backend* be_;
  const char* name_ = nullptr;
  const char* outer_ = nullptr;  // the step open around this object's first one (rounding counts)
  bool opened_ = false;
  int unwinding_ = 0;
  std::chrono::steady_clock::time_point t0_;
};

// One named step for the lifetime of the scope.
class ProfileScope {
 public:
  ProfileScope(Backend& be, const char* name) : steps_(be) { steps_.next(name); }

 private:
  ProfileSteps steps_;
};

// Under MOEKIT_PROFILE: one F32 -> BF16 rounding pass of n elements (a backend's conversion of a
// GEMM operand), counted against the innermost open step, so the report says where they run.
void profile_count_rounding(int64_t n);

void profile_reset();  // forget what was recorded (e.g. warm-up steps)

// "name: total ms (calls)" per scope, largest first; empty when not profiling.
std::string profile_report();

}  // namespace moekit
