// Builds the ESFT experiment's tasks from the corpus files (see tasks.h for what each task is).
#include "esft/tasks.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "esft/chat_rows.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// FNV-1a: a split that depends only on the item, not on file order or the seed.
uint64_t stable_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

void cap(std::vector<TaskItem>& items, int64_t n, std::mt19937_64& rng) {
  std::shuffle(items.begin(), items.end(), rng);
  if (int64_t(items.size()) > n) items.resize(size_t(n));
}

bool plain_word(const std::string& w) {
  return !w.empty() && std::all_of(w.begin(), w.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || c == '-' || c == '\'';
  });
}

Task translate_task(const fs::path& corpus) {
  const fs::path file = corpus / "translation_pairs.tsv";
  std::ifstream in(file);
  if (!in) fail("{}: cannot read (build the corpus with scripts/corpus)", file.string());
  std::vector<std::string> order;  // English words in first-seen order: a deterministic split
  std::map<std::string, std::vector<std::string>> french;
  std::string line;
  while (std::getline(in, line)) {
    const auto tab = line.find('\t');
    if (tab == std::string::npos) continue;
    const std::string en = line.substr(0, tab);
    if (!plain_word(en)) continue;
    std::string rest = line.substr(tab + 1);
    for (char& c : rest)
      if (c == ';') c = ',';
    size_t start = 0;
    while (start <= rest.size()) {
      size_t end = rest.find(',', start);
      if (end == std::string::npos) end = rest.size();
      const std::string alt = trim(rest.substr(start, end - start));
      if (!alt.empty() && alt.size() <= 40 && alt.find("...") == std::string::npos) {
        if (!french.count(en)) order.push_back(en);
        french[en].push_back(alt);
      }
      start = end + 1;
    }
  }
  if (french.empty()) fail("{}: no English-French pairs", file.string());
  Task t{"translate", "English word -> French translation (FreeDict), exact match", {}, {}};
  for (const auto& en : order) {
    TaskItem item{"Translate to French: " + en, french[en]};
    (stable_hash(en) % 10 == 0 ? t.eval : t.train).push_back(std::move(item));
  }
  return t;
}

Task arithmetic_task(const TaskOptions& opt, std::mt19937_64& rng) {
  Task t{"arithmetic",
         "a + b, a - b (up to 3 digits), a * b (up to 2 digits) -> exact result",
         {},
         {}};
  std::set<std::string> seen;
  auto operand = [&](int max_digits) {
    static const int64_t limit[] = {1, 10, 100, 1000};
    std::uniform_int_distribution<int> digits(1, max_digits);
    std::uniform_int_distribution<int64_t> value(0, limit[digits(rng)] - 1);
    return value(rng);
  };
  const int64_t wanted = opt.max_train + opt.max_eval;
  for (int64_t tries = 0; int64_t(seen.size()) < wanted && tries < wanted * 20; ++tries) {
    const int op = int(rng() % 3);
    const int64_t a = operand(op == 2 ? 2 : 3), b = operand(op == 2 ? 2 : 3);
    const char sym = "+-*"[op];
    const int64_t r = op == 0 ? a + b : op == 1 ? a - b : a * b;
    std::string q = std::to_string(a) + " " + sym + " " + std::to_string(b);
    if (!seen.insert(q).second) continue;
    // The first max_eval distinct questions are the eval set; the rest never repeat them.
    (int64_t(t.eval.size()) < opt.max_eval ? t.eval : t.train).push_back({q, {std::to_string(r)}});
  }
  return t;
}

Task license_task(const fs::path& corpus) {
  static const std::string prefix = "/usr/share/common-licenses/";
  std::map<std::string, std::vector<std::string>> lines;  // license -> its non-empty lines
  for (const char* split : {"train.jsonl", "val.jsonl"}) {
    const fs::path file = corpus / split;
    std::ifstream in(file);
    if (!in) fail("{}: cannot read (build the corpus with scripts/corpus)", file.string());
    std::string row;
    int64_t n = 0;
    while (std::getline(in, row)) {
      ++n;
      json j = json::parse(row, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("source") || !j.contains("text") ||
          !j["source"].is_string() || !j["text"].is_string())
        fail("{}:{}: row needs string \"source\" and \"text\"", file.string(), n);
      const std::string src = j["source"];
      if (src.rfind(prefix, 0) != 0) continue;
      const std::string text = j["text"];
      size_t start = 0;
      while (start < text.size()) {
        size_t end = text.find('\n', start);
        if (end == std::string::npos) end = text.size();
        std::string l = trim(text.substr(start, end - start));
        if (!l.empty()) lines[src.substr(prefix.size())].push_back(l);
        start = end + 1;
      }
    }
  }
  if (lines.empty()) fail("{}: no /usr/share/common-licenses documents", corpus.string());
  Task t{"license", "4-line passage of a common license -> the license's file name", {}, {}};
  for (const auto& [name, ls] : lines)
    for (size_t w = 0; w + 4 <= ls.size(); w += 4) {
      TaskItem item{"Which license is this passage from?\n" + ls[w] + "\n" + ls[w + 1] + "\n" +
                        ls[w + 2] + "\n" + ls[w + 3],
                    {name}};
      // Every fifth window is held out: eval passages never overlap training passages.
      ((w / 4) % 5 == 4 ? t.eval : t.train).push_back(std::move(item));
    }
  return t;
}

}  // namespace

std::vector<Task> build_tasks(const fs::path& corpus, const TaskOptions& opt) {
  std::mt19937_64 rng(opt.seed);
  std::vector<Task> tasks = {translate_task(corpus), arithmetic_task(opt, rng),
                             license_task(corpus)};
  for (Task& t : tasks) {
    cap(t.train, opt.max_train, rng);
    cap(t.eval, opt.max_eval, rng);
  }
  return tasks;
}

void write_task(const Task& task, const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create ({})", dir.string(), ec.message());
  auto rows = [](const std::vector<TaskItem>& items, bool with_answers) {
    std::string out;
    for (const auto& it : items) {
      json row = {{"messages",
                   {{{"role", "user"}, {"content", it.user}},
                    {{"role", "assistant"}, {"content", it.answers.front()}}}}};
      if (with_answers) row["answers"] = it.answers;
      out += row.dump() + "\n";
    }
    return out;
  };
  write_file_atomic(dir / "train.jsonl", rows(task.train, false));
  write_file_atomic(dir / "eval.jsonl", rows(task.eval, true));
}

std::vector<TaskItem> read_eval_items(const fs::path& file) {
  std::vector<TaskItem> items;
  for (ChatRow& r : read_chat_rows(file, false)) {
    if (r.answers.empty() && r.has_assistant) r.answers.push_back(r.assistant);
    if (!r.has_user || r.answers.empty())
      fail("{}:{}: row needs a user message and an answer", file.string(), r.line);
    items.push_back({r.user, r.answers});
  }
  if (items.empty()) fail("{}: no eval rows", file.string());
  return items;
}

}  // namespace moekit
