// safetensors: round trips for every dtype and one clear error per malformed file.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "../temp_dir.h"
#include "core/error.h"
#include "model/safetensors.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

// A file with the given header JSON text and `data` bytes after it.
fs::path raw_file(const fs::path& p, const std::string& header, size_t data_bytes,
                  uint64_t claimed_len = 0) {
  std::ofstream out(p, std::ios::binary);
  uint64_t n = claimed_len ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) out.put(char((n >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\x01');
  return p;
}

std::string error_of(const fs::path& p) {
  try {
    SafetensorsFile::open(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Safetensors, RoundTripEveryDtypeAligned) {
  test::TempDir tmp;
  Tensor f = Tensor::empty({2, 3});
  for (int i = 0; i < 6; ++i) f.f32()[i] = float(i) * 0.5f - 1.0f;
  Tensor i32 = Tensor::empty({5}, DType::I32);
  for (int i = 0; i < 5; ++i) i32.i32()[i] = i * 1000 - 7;
  std::vector<std::pair<std::string, Tensor>> ts = {{"w.f32", f},
                                                    {"w.bf16", f.to_dtype(DType::BF16)},
                                                    {"w.f16", f.to_dtype(DType::F16)},
                                                    {"ids", i32}};
  save_safetensors(tmp.path() / "a.safetensors", ts, {{"format", "pt"}});
  auto file = SafetensorsFile::open(tmp.path() / "a.safetensors");
  EXPECT_EQ(file.metadata().at("format"), "pt");
  for (const auto& [name, t] : ts) {
    const Tensor& got = file.tensors().at(name).tensor;
    EXPECT_EQ(got.dtype(), t.dtype()) << name;
    EXPECT_EQ(got.shape(), t.shape()) << name;
    EXPECT_EQ(std::string(static_cast<const char*>(got.raw()), got.nbytes()),
              std::string(static_cast<const char*>(t.raw()), t.nbytes()))
        << name;
  }
  // The data buffer starts 8-byte aligned.
  std::ifstream in(tmp.path() / "a.safetensors", std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
}

TEST(Safetensors, MalformedFilesNameFileAndProblem) {
  test::TempDir tmp;
  const auto& d = tmp.path();
  struct Case {
    fs::path file;
    std::string expect;
  };
  std::ofstream(d / "short.safetensors") << "abc";
  const std::vector<Case> cases = {
      {d / "short.safetensors", "too short"},
      {raw_file(d / "len.safetensors", "{}", 0, 1000), "runs past the end"},
      {raw_file(d / "huge.safetensors", "{}", 0, 200ull << 20), "100 MB"},
      {raw_file(d / "notjson.safetensors", "{\"a\": ", 0), "not valid JSON"},
      {raw_file(d / "array.safetensors", "[1, 2]", 0), "not a JSON object"},
      {raw_file(d / "fields.safetensors", R"({"t": {"dtype": "F32"}})", 0),
       "tensor t: entry needs"},
      {raw_file(d / "f64.safetensors",
                R"({"t": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", 8),
       "tensor t: unsupported dtype F64"},
      {raw_file(d / "size.safetensors",
                R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
       "tensor t: 8 bytes in data_offsets but shape [3] of F32 needs 12"},
      {raw_file(d / "past.safetensors",
                R"({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8),
       "tensor t: data_offsets end 16 is past the end"},
      {raw_file(d / "order.safetensors",
                R"({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8),
       "begin 8 > end 4"},
      {raw_file(
           d / "overlap.safetensors",
           R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
           12),
       "overlap"},
      {raw_file(d / "meta.safetensors", R"({"__metadata__": {"k": 3}})", 0),
       "__metadata__ value \"k\" is not a string"},
      {raw_file(d / "neg.safetensors",
                R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4),
       "shape has a non-integer or negative size"},
  };
  for (const auto& c : cases) {
    std::string e = error_of(c.file);
    EXPECT_NE(e.find(c.file.string()), std::string::npos) << e;
    EXPECT_NE(e.find(c.expect), std::string::npos) << c.file << ": " << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  }
}

TEST(Safetensors, ShardedCheckpoints) {
  test::TempDir tmp;
  Tensor a = Tensor::zeros({2}), b = Tensor::zeros({3});
  save_safetensors(tmp.path() / "s1.safetensors", {{"a", a}});
  save_safetensors(tmp.path() / "s2.safetensors", {{"b", b}});
  std::ofstream(tmp.path() / "model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})";
  auto all = load_checkpoint_tensors(tmp.path());
  EXPECT_EQ(all.size(), 2u);
  EXPECT_EQ(all.at("b").tensor.shape(), (Shape{3}));
  // A tensor in two shards.
  save_safetensors(tmp.path() / "s2.safetensors", {{"b", b}, {"a", a}});
  try {
    load_checkpoint_tensors(tmp.path());
    ADD_FAILURE() << "duplicate accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor a is also in"), std::string::npos) << e.what();
  }
  // A missing shard.
  std::ofstream(tmp.path() / "model.safetensors.index.json")
      << R"({"weight_map": {"a": "gone.safetensors"}})";
  try {
    load_checkpoint_tensors(tmp.path());
    ADD_FAILURE() << "missing shard accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gone.safetensors"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moekit
