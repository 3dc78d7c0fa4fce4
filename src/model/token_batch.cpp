// Reading and validating the ids.json batch format.
#include "model/token_batch.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace moekit {

TokenBatch read_ids_json(const std::filesystem::path& file, int64_t vocab_size) {
  const std::string f = file.string();
  std::ifstream in(file);
  if (!in) fail("{}: cannot read file", f);
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) fail("{}: not valid JSON", f);
  if (!j.is_object() || !j.contains("ids")) fail("{}: missing field \"ids\"", f);
  const auto& rows = j["ids"];
  if (!rows.is_array() || rows.empty())
    fail("{}: field \"ids\" must be a non-empty list of lists", f);
  TokenBatch b;
  b.batch = int64_t(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    if (!rows[r].is_array() || rows[r].empty())
      fail("{}: ids[{}] must be a non-empty list of integers", f, r);
    if (r == 0) b.seq = int64_t(rows[0].size());
    if (int64_t(rows[r].size()) != b.seq)
      fail("{}: ids[{}] has {} tokens but ids[0] has {} (the batch must be rectangular)", f, r,
           rows[r].size(), b.seq);
  }
  b.ids = Tensor::empty({b.batch * b.seq}, DType::I32);
  for (size_t r = 0; r < rows.size(); ++r)
    for (size_t s = 0; s < rows[r].size(); ++s) {
      const auto& v = rows[r][s];
      if (!v.is_number_integer()) fail("{}: ids[{}][{}] is not an integer", f, r, s);
      int64_t id = v.get<int64_t>();
      if (id < 0 || id >= vocab_size)
        fail("{}: ids[{}][{}] = {} is out of range [0, {})", f, r, s, id, vocab_size);
      b.ids.i32()[int64_t(r) * b.seq + int64_t(s)] = int32_t(id);
    }
  return b;
}

}  // namespace moekit
