// libFuzzer target: arbitrary bytes as a config.json (parse, validate, write back, re-read).
#include <cstdint>
#include <string>

#include "core/error.h"
#include "model/config.h"
#include "model/summary.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;
  try {
    moekit::ModelConfig c = moekit::config_from_json(j, "fuzz/config.json");
    moekit::summarize(c);
    c.softmax_scale();
    c.rope_attention_factor();
    moekit::ModelConfig again = moekit::config_from_json(moekit::config_to_json(c), "round-trip");
    if (again.hidden_size != c.hidden_size || again.n_routed_experts != c.n_routed_experts)
      __builtin_trap();
  } catch (const moekit::Error&) {
  }
  return 0;
}
