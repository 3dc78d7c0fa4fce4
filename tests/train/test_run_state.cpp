// RunDir::prepare's resume check: the same config resumes, another is refused naming the field,
// and a field an older moekit did not write counts as its default.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "../temp_dir.h"
#include "model/config.h"
#include "train/run_state.h"

namespace moekit {
namespace {

ModelConfig tiny() {
  return load_config(std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/train/tiny.json");
}

TEST(RunDir, ResumeComparesParsedConfigs) {
  test::TempDir tmp;
  RunDir run(tmp.path() / "run");
  run.prepare(tiny(), false);
  // An older run's config.json: without a field that has a default now.
  const auto file = tmp.path() / "run/config.json";
  nlohmann::json j = nlohmann::json::parse(std::ifstream(file));
  ASSERT_TRUE(j.contains("initializer_range"));
  j.erase("initializer_range");
  std::ofstream(file) << j.dump(2);
  EXPECT_NO_THROW(run.prepare(tiny(), true));

  ModelConfig other = tiny();
  other.hidden_size *= 2;
  try {
    run.prepare(other, true);
    FAIL() << "a different config resumed";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("field \"hidden_size\""), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moekit
