// safetensors: validated zero-copy reading (mmap) and atomic writing.
#include "model/safetensors.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxHeader = 100ull << 20;  // the format's own limit is 100 MB

struct Mapping {
  void* ptr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (ptr && size) ::munmap(ptr, size);
  }
};

bool parse_dtype(const std::string& s, DType& out) {
  if (s == "F32")
    out = DType::F32;
  else if (s == "BF16")
    out = DType::BF16;
  else if (s == "F16")
    out = DType::F16;
  else if (s == "I32")
    out = DType::I32;
  else
    return false;
  return true;
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const fs::path& path) {
  const std::string f = path.string();
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail("{}: cannot open ({})", f, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("{}: cannot stat", f);
  }
  auto map = std::make_shared<Mapping>();
  map->size = size_t(st.st_size);
  if (map->size < 8) {
    ::close(fd);
    fail("{}: too short for a safetensors file ({} bytes)", f, map->size);
  }
  map->ptr = ::mmap(nullptr, map->size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map->ptr == MAP_FAILED) {
    map->ptr = nullptr;
    fail("{}: mmap failed ({})", f, std::strerror(errno));
  }
  const auto* bytes = static_cast<const unsigned char*>(map->ptr);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > kMaxHeader) fail("{}: header length {} is larger than the 100 MB limit", f, n);
  if (n > map->size - 8)
    fail("{}: header length {} runs past the end of the file ({} bytes)", f, n, map->size);
  json h = json::parse(reinterpret_cast<const char*>(bytes + 8),
                       reinterpret_cast<const char*>(bytes + 8 + n), nullptr, false);
  if (h.is_discarded()) fail("{}: header is not valid JSON", f);
  if (!h.is_object()) fail("{}: header is not a JSON object", f);
  const size_t data_begin = 8 + size_t(n), data_size = map->size - data_begin;

  SafetensorsFile file;
  file.path_ = f;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it.value().is_object()) fail("{}: __metadata__ is not an object", f);
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string())
          fail("{}: __metadata__ value \"{}\" is not a string", f, m.key());
        file.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const json& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
        !e.contains("data_offsets"))
      fail("{}: tensor {}: entry needs dtype, shape and data_offsets", f, name);
    if (!e["dtype"].is_string()) fail("{}: tensor {}: dtype is not a string", f, name);
    DType dt;
    if (!parse_dtype(e["dtype"].get<std::string>(), dt))
      fail("{}: tensor {}: unsupported dtype {} (moekit reads F32, BF16, F16, I32)", f, name,
           e["dtype"].get<std::string>());
    const json& shp = e["shape"];
    if (!shp.is_array() || shp.size() > 4)
      fail("{}: tensor {}: shape must be a list of at most 4 sizes", f, name);
    int64_t dims[4] = {0, 0, 0, 0};
    uint64_t numel = 1;
    for (size_t i = 0; i < shp.size(); ++i) {
      if (!shp[i].is_number_unsigned())
        fail("{}: tensor {}: shape has a non-integer or negative size", f, name);
      uint64_t d = shp[i].get<uint64_t>();
      if (d > (1ull << 40) || (d && numel > (1ull << 50) / d))
        fail("{}: tensor {}: shape is too large", f, name);
      dims[i] = int64_t(d);
      numel *= d;
    }
    const json& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      fail("{}: tensor {}: data_offsets must be two non-negative integers", f, name);
    uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    if (b > en) fail("{}: tensor {}: data_offsets begin {} > end {}", f, name, b, en);
    if (en > data_size)
      fail("{}: tensor {}: data_offsets end {} is past the end of the data ({} bytes)", f, name, en,
           data_size);
    if (en - b != numel * dtype_size(dt))
      fail("{}: tensor {}: {} bytes in data_offsets but shape {} of {} needs {}", f, name, en - b,
           shp.dump(), dtype_name(dt), numel * dtype_size(dt));
    ranges.emplace_back(b, en);
    Tensor t = Tensor::view_of(const_cast<unsigned char*>(bytes + data_begin + b),
                               Shape::of(dims, int(shp.size())), dt, map);
    file.tensors_[name] = SafetensorsEntry{name, t, f};
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second && ranges[i].first != ranges[i].second)
      fail("{}: tensors overlap in the data buffer (bytes {}..{})", f, ranges[i].first,
           ranges[i - 1].second);
  return file;
}

std::map<std::string, SafetensorsEntry> load_checkpoint_tensors(const fs::path& dir) {
  std::vector<fs::path> files;
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    std::ifstream in(index);
    std::stringstream ss;
    ss << in.rdbuf();
    json j = json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") ||
        !j["weight_map"].is_object())
      fail("{}: not a valid index (needs an object \"weight_map\")", index.string());
    std::vector<std::string> names;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        fail("{}: weight_map[\"{}\"] is not a file name", index.string(), it.key());
      std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos)
        fail("{}: shard name {} must be a plain file name", index.string(), shard);
      if (std::find(names.begin(), names.end(), shard) == names.end()) names.push_back(shard);
    }
    std::sort(names.begin(), names.end());
    for (const auto& s : names) files.push_back(dir / s);
  } else if (fs::exists(dir / "model.safetensors")) {
    files.push_back(dir / "model.safetensors");
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", dir.string());
  }
  std::map<std::string, SafetensorsEntry> all;
  for (const auto& p : files) {
    SafetensorsFile sf = SafetensorsFile::open(p);
    for (const auto& [name, e] : sf.tensors()) {
      auto [it, inserted] = all.emplace(name, e);
      if (!inserted) fail("{}: tensor {} is also in {}", p.string(), name, it->second.file);
    }
  }
  return all;
}

std::string safetensors_header(const std::vector<SafetensorsSlot>& slots,
                               const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& s : slots) {
    std::vector<int64_t> shape(s.shape.d.begin(), s.shape.d.begin() + s.shape.ndim);
    const uint64_t n = uint64_t(s.shape.numel()) * dtype_size(s.dtype);
    h[s.name] = {{"dtype", std::string(dtype_name(s.dtype))},
                 {"shape", shape},
                 {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');  // align the data to 8 bytes
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((n >> (8 * i)) & 0xff);
  return out + header;
}

void save_safetensors(const fs::path& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, Tensor>> sorted = tensors;
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<SafetensorsSlot> slots;
  for (const auto& [name, t] : sorted) slots.push_back({name, t.dtype(), t.shape()});
  const std::string header = safetensors_header(slots, metadata);
  AtomicFile out(path);  // streamed: no second copy of the weights in memory
  out.write(header.data(), header.size());
  for (const auto& [name, t] : sorted) {
    const Tensor host = t.to_host();  // device tensors go through one host copy at a time
    out.write(host.raw(), host.nbytes());
  }
  out.commit();
}

}  // namespace moekit
