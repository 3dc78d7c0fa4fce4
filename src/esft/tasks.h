// Specialisation tasks for the ESFT experiment, built from the embedded corpus (docs/corpus.md):
//   translate   English word -> its French translation (FreeDict pairs), exact match against any
//               listed translation of the word;
//   arithmetic  "a + b", "a - b", "a * b" -> the exact result;
//   license     a 4-line passage of a file in /usr/share/common-licenses -> the file's name.
// Each task has disjoint train and eval items; files are `messages` JSONL rows (the ESFT format),
// eval rows also carry "answers" (every accepted answer).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moekit {

struct TaskItem {
  std::string user;
  std::vector<std::string> answers;  // answers[0] is the training target
};

struct Task {
  std::string name, description;
  std::vector<TaskItem> train, eval;
};

struct TaskOptions {
  int64_t max_train = 4000, max_eval = 200;
  uint64_t seed = 17;
};

// Builds the three tasks from CORPUS/{train,val}.jsonl and CORPUS/translation_pairs.tsv.
std::vector<Task> build_tasks(const std::filesystem::path& corpus, const TaskOptions& opt);
// Writes DIR/train.jsonl and DIR/eval.jsonl.
void write_task(const Task& task, const std::filesystem::path& dir);
// Reads eval rows: the first user message and "answers" (or the assistant message).
std::vector<TaskItem> read_eval_items(const std::filesystem::path& file);

}  // namespace moekit
