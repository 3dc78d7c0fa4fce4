// Reader of `messages` JSONL rows.
#include "esft/chat_rows.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moekit {

using json = nlohmann::json;

namespace {

ChatRow parse_row(const std::string& text, const std::string& where) {
  json row = json::parse(text, nullptr, false);
  if (row.is_discarded() || !row.is_object() || !row.contains("messages") ||
      !row["messages"].is_array())
    fail("{}: row has no \"messages\" list", where);
  ChatRow r;
  for (const auto& m : row["messages"]) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string())
      fail("{}: every message needs a role and a string content", where);
    if (m["role"] == "user" && !r.has_user) r.user = m["content"], r.has_user = true;
    if (m["role"] == "assistant" && !r.has_assistant)
      r.assistant = m["content"], r.has_assistant = true;
  }
  if (row.contains("answers")) {
    const json& a = row["answers"];
    if (!a.is_array() || a.empty())
      fail("{}: \"answers\" must be a non-empty list of strings", where);
    for (const auto& s : a) {
      if (!s.is_string()) fail("{}: \"answers\" must be a non-empty list of strings", where);
      r.answers.push_back(s);
    }
  }
  return r;
}

}  // namespace

std::vector<ChatRow> read_chat_rows(const std::filesystem::path& file, bool need_assistant) {
  std::ifstream in(file);
  if (!in) fail("{}: cannot read file", file.string());
  std::vector<ChatRow> rows;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    const std::string where = file.string() + ":" + std::to_string(n);
    ChatRow r = parse_row(line, where);
    if (need_assistant && (!r.has_user || !r.has_assistant))
      fail("{}: row has no user and assistant message", where);
    r.line = n;
    rows.push_back(std::move(r));
  }
  return rows;
}

}  // namespace moekit
