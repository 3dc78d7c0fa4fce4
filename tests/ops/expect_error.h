// One assertion shared by the op tests: this call fails with an Error whose message contains
// `want` (every bad input gets a one-line error naming the op and the problem).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "core/error.h"

namespace moekit::test {

inline void expect_error_containing(const std::function<void()>& f, const std::string& want) {
  try {
    f();
    ADD_FAILURE() << "no error (expected \"" << want << "\")";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
  }
}

}  // namespace moekit::test
