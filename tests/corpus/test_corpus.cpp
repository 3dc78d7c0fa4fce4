// scripts/corpus: builds the corpus twice into temp folders (about 2 s each on 2 cores, so the test
// always checks a fresh build rather than whatever corpus/ holds) and checks the JSONL rows, the
// domains, the split sizes, the arithmetic, the translation pairs, the manifest and determinism.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "../run_command.h"
#include "../temp_dir.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::set<std::string> kDomains = {"literature", "legal", "code", "dictionary", "arithmetic"};

struct SplitStats {
  std::map<std::string, int64_t> docs, bytes;
  int64_t total_docs = 0, total_bytes = 0;
};

// Parses one split, failing the test on any malformed row; returns per-domain counts.
SplitStats check_split(const fs::path& file) {
  SplitStats st;
  std::istringstream in(test::read_text(file));
  std::string line;
  int64_t n = 0;
  const std::regex equation(R"(^(\d+) ([-+*/]) (\d+)(?: \+ (\d+))? = (-?\d+)$)");
  while (std::getline(in, line)) {
    ++n;
    const json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || j.size() != 3) {
      ADD_FAILURE() << file << ":" << n << ": not an object with 3 fields";
      continue;
    }
    const auto& d = j["domain"];
    const auto& s = j["source"];
    const auto& t = j["text"];
    if (!d.is_string() || !s.is_string() || !t.is_string() ||
        !kDomains.count(d.get<std::string>()) || t.get<std::string>().empty() ||
        s.get<std::string>().empty()) {
      ADD_FAILURE() << file << ":" << n << ": bad domain/source/text";
      continue;
    }
    const std::string domain = d, text = t;
    // Chunks are cut at 4 KB unless a single source line is longer (none in these sources).
    EXPECT_LE(text.size(), 4096u) << file << ":" << n;
    if (domain == "arithmetic") {
      std::istringstream lines(text);
      std::string eq;
      while (std::getline(lines, eq)) {
        std::smatch m;
        if (!std::regex_match(eq, m, equation)) {
          ADD_FAILURE() << "not an equation: " << eq;
          continue;
        }
        const int64_t a = std::stoll(m[1]), b = std::stoll(m[3]), c = std::stoll(m[5]);
        const char op = m[2].str()[0];
        const int64_t want = op == '+'   ? a + b + (m[4].matched ? std::stoll(m[4]) : 0)
                             : op == '-' ? a - b
                             : op == '*' ? a * b
                                         : (b != 0 && a % b == 0 ? a / b : -999);
        EXPECT_EQ(c, want) << eq;
      }
    }
    st.docs[domain]++;
    st.bytes[domain] += int64_t(text.size());
    st.total_docs++;
    st.total_bytes += int64_t(text.size());
  }
  return st;
}

std::string sha256(const fs::path& file) {
  const auto r = test::run_command("sha256sum '" + file.string() + "'");
  return r.status == 0 ? r.output.substr(0, 64) : "sha256sum failed";
}

}  // namespace

TEST(Corpus, BuildIsValidBalancedAndDeterministic) {
  for (const char* need :
       {"/usr/bin/bible", "/usr/bin/jq", "/usr/share/dictd/freedict-eng-fra.index",
        "/usr/share/games/fortunes/wisdom.u8", "/usr/lib/python3.11/enum.py"})
    if (!fs::exists(need))
      GTEST_SKIP() << need << " missing: run scripts/setup (the test never installs packages)";
  test::TempDir dir;
  const std::string script = std::string(MOEKIT_SOURCE_DIR) + "/scripts/corpus";
  for (const char* out : {"a", "b"}) {
    const auto r = test::run_command("bash '" + script + "' '" + (dir / out).string() + "' 2>&1");
    ASSERT_EQ(r.status, 0) << r.output;
  }
  const fs::path a = dir / "a", b = dir / "b";
  for (const char* f : {"train.jsonl", "val.jsonl", "translation_pairs.tsv", "manifest.json"})
    EXPECT_EQ(sha256(a / f), sha256(b / f)) << f << " differs between two builds";

  const SplitStats train = check_split(a / "train.jsonl"), val = check_split(a / "val.jsonl");
  // 6-10 MB of training text, every domain at least 8% of it and present in validation.
  EXPECT_GE(train.total_bytes, 6'000'000);
  EXPECT_LE(train.total_bytes, 10'000'000);
  for (const auto& d : kDomains) {
    EXPECT_GE(train.bytes.count(d) ? train.bytes.at(d) : 0, train.total_bytes * 8 / 100) << d;
    EXPECT_GE(val.docs.count(d) ? val.docs.at(d) : 0, 5) << d;
  }
  // About 5% of documents are validation.
  const double val_share = double(val.total_docs) / double(val.total_docs + train.total_docs);
  EXPECT_GT(val_share, 0.03);
  EXPECT_LT(val_share, 0.08);

  const json manifest = json::parse(test::read_text(a / "manifest.json"));
  EXPECT_EQ(manifest["format"], "moekit-corpus-1");
  for (const auto& [name, st] : {std::pair{"train", &train}, std::pair{"val", &val}})
    for (const auto& d : kDomains) {
      EXPECT_EQ(manifest["splits"][name][d]["documents"], st->docs.at(d)) << name << " " << d;
      EXPECT_EQ(manifest["splits"][name][d]["text_bytes"], st->bytes.at(d)) << name << " " << d;
    }
  for (const char* f : {"train.jsonl", "val.jsonl", "translation_pairs.tsv"}) {
    EXPECT_EQ(manifest["files"][f]["sha256"], sha256(a / f)) << f;
    EXPECT_EQ(manifest["files"][f]["bytes"], fs::file_size(a / f)) << f;
  }

  // Translation pairs: english<TAB>french, both sides non-empty; a few well-known entries.
  std::istringstream pairs(test::read_text(a / "translation_pairs.tsv"));
  std::string line;
  std::set<std::string> seen;
  int64_t n = 0;
  while (std::getline(pairs, line)) {
    ++n;
    const size_t tab = line.find('\t');
    EXPECT_TRUE(tab != std::string::npos && tab > 0 && tab + 1 < line.size() &&
                line.find('\t', tab + 1) == std::string::npos)
        << "pair " << n << ": " << line;
    seen.insert(line);
  }
  EXPECT_EQ(manifest["translation_pairs"], n);
  EXPECT_GT(n, 10'000);
  for (const char* p : {"house\tmaison", "cat\tchat", "book\tlivre"})
    EXPECT_TRUE(seen.count(p)) << p;
}

}  // namespace moekit
