// The `messages` JSONL rows that ESFT data, routing and evaluation read (esft.md §4): one JSON
// object per line with a "messages" list of {"role", "content"}; the first user and the first
// assistant turn are used. Eval rows may add "answers" (every accepted answer).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moekit {

struct ChatRow {
  int64_t line = 0;
  std::string user, assistant;
  bool has_user = false, has_assistant = false;
  std::vector<std::string> answers;  // from "answers", when present
};

// Every non-empty line; errors (naming the file and line) for a line that is not an object with
// a "messages" list, a message without a role and a string content, or malformed "answers".
// With `need_assistant`, a row without both a user and an assistant turn is an error too.
std::vector<ChatRow> read_chat_rows(const std::filesystem::path& file, bool need_assistant);

}  // namespace moekit
