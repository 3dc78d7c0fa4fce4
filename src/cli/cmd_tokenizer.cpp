// `moekit tokenize`, `moekit detokenize`, `moekit tokenizer train`.
// JSONL in, JSONL out, rows in order; output written atomically, so bad input leaves nothing.
#include <fmt/format.h>

#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/tokenizer.h"

namespace moekit::cli {

using json = nlohmann::json;

namespace {

// Calls fn(row, lineno) for every non-empty line of a JSONL file.
template <typename Fn>
void each_row(const std::string& file, Fn&& fn) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("{}: cannot read file", file);
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    json row = json::parse(line, nullptr, false);
    if (row.is_discarded() || !row.is_object()) fail("{}:{}: not a JSON object", file, lineno);
    fn(row, lineno);
  }
}

// JSON strings must be valid UTF-8; bytes that are not pass through as U+FFFD in output rows.
std::string dump_row(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace

void add_tokenizer_commands(CLI::App& app) {
  struct Args {
    std::string tokenizer, input, out;
    bool add_special = false, skip_special = false;
    std::vector<std::string> files;
    int64_t vocab_size = 8192, min_frequency = 2;
  };
  auto a = std::make_shared<Args>();

  auto* tok =
      app.add_subcommand("tokenize", "Text to token ids: rows {\"text\"} -> rows {\"ids\"}");
  tok->add_option("--tokenizer", a->tokenizer, "tokenizer.json")->required();
  tok->add_option("--input", a->input, "IN.jsonl with a \"text\" field per row")->required();
  tok->add_option("--out", a->out, "OUT.jsonl with an \"ids\" field per row")->required();
  tok->add_flag("--add-special", a->add_special, "prepend the beginning-of-sentence token");
  tok->callback([a] {
    Tokenizer t = Tokenizer::load(a->tokenizer);
    std::string out;
    each_row(a->input, [&](const json& row, int64_t n) {
      if (!row.contains("text") || !row["text"].is_string())
        fail("{}:{}: row has no string field \"text\"", a->input, n);
      out +=
          dump_row(json{{"ids", t.encode(row["text"].get<std::string>(), a->add_special)}}) + "\n";
    });
    write_file_atomic(a->out, out);
  });

  auto* detok =
      app.add_subcommand("detokenize", "Token ids to text: rows {\"ids\"} -> rows {\"text\"}");
  detok->add_option("--tokenizer", a->tokenizer, "tokenizer.json")->required();
  detok->add_option("--input", a->input, "IN.jsonl with an \"ids\" field per row")->required();
  detok->add_option("--out", a->out, "OUT.jsonl with a \"text\" field per row")->required();
  detok->add_flag("--skip-special", a->skip_special, "leave special tokens out of the text");
  detok->callback([a] {
    Tokenizer t = Tokenizer::load(a->tokenizer);
    std::string out;
    each_row(a->input, [&](const json& row, int64_t n) {
      if (!row.contains("ids") || !row["ids"].is_array())
        fail("{}:{}: row has no list field \"ids\"", a->input, n);
      std::vector<int32_t> ids;
      for (const auto& v : row["ids"]) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= t.vocab_size())
          fail("{}:{}: ids holds {}, not a token id below {}", a->input, n, v.dump(),
               t.vocab_size());
        ids.push_back(v.get<int32_t>());
      }
      out += dump_row(json{{"text", t.decode(ids, a->skip_special)}}) + "\n";
    });
    write_file_atomic(a->out, out);
  });

  auto* group = app.add_subcommand("tokenizer", "Tokenizer tools");
  group->require_subcommand(1);
  auto* train = group->add_subcommand("train", "Learn a byte-level BPE tokenizer.json");
  train->add_option("--input", a->files, "text files, or .jsonl files with a \"text\" field")
      ->required()
      ->expected(1, -1);
  train->add_option("--vocab-size", a->vocab_size, "vocabulary size (specials included)")
      ->capture_default_str();
  train->add_option("--min-frequency", a->min_frequency, "stop when the best pair is rarer")
      ->capture_default_str();
  train->add_option("--out", a->out, "tokenizer.json to write")->required();
  train->callback([a] {
    std::vector<std::string> texts = read_training_texts(a->files);
    BpeTrainOptions o;
    o.vocab_size = a->vocab_size;
    o.min_frequency = a->min_frequency;
    auto stats = train_bpe(texts, o, a->out);
    fmt::print("wrote {}: {} tokens ({} merges) from {} pre-tokenized words\n", a->out,
               stats.vocab_size, stats.merges, stats.unique_words);
  });
}

}  // namespace moekit::cli
