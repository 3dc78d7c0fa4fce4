// Random-initialised checkpoints: layout and shard plan, target checks, streamed writing, and the
// counter-based normal generator.
#include "model/init.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "model/safetensors.h"
#include "model/summary.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
constexpr int64_t kChunk = int64_t(1) << 22;              // values generated and written at a time
constexpr uint64_t kProgressBytes = uint64_t(256) << 20;  // show progress from this size on

// SplitMix64's output function: a bijective mix of a 64-bit counter.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Box-Muller on counters 2p and 2p+1 of stream `key`: normal values 2p and 2p+1.
void normal_pair(uint64_t key, uint64_t p, double& z0, double& z1) {
  const uint64_t a = mix64(key + (2 * p + 1) * kGolden);
  const uint64_t b = mix64(key + (2 * p + 2) * kGolden);
  const double u1 = double((a >> 11) + 1) * 0x1p-53;  // (0, 1]
  const double u2 = double(b >> 11) * 0x1p-53;        // [0, 1)
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double t = 2.0 * M_PI * u2;
  z0 = r * std::cos(t);
  z1 = r * std::sin(t);
}

std::string shard_name(size_t i, size_t n) {
  return n == 1 ? "model.safetensors" : fmt::format("model-{:05}-of-{:05}.safetensors", i + 1, n);
}

// transformers' split: tensors in model order, a new shard when the next one would overflow.
std::vector<InitShard> split_shards(const std::vector<CheckpointTensor>& tensors, DType dtype,
                                    uint64_t max_bytes) {
  std::vector<InitShard> shards;
  uint64_t used = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const uint64_t n = uint64_t(tensors[i].shape.numel()) * dtype_size(dtype);
    if (shards.empty() || (!shards.back().tensors.empty() && used + n > max_bytes)) {
      shards.emplace_back();
      used = 0;
    }
    shards.back().tensors.push_back(i);
    used += n;
  }
  return shards;
}

void finish_shard(InitShard& s, size_t i, size_t n, const std::vector<CheckpointTensor>& tensors,
                  DType dtype) {
  s.file = shard_name(i, n);
  std::vector<SafetensorsSlot> slots;
  uint64_t data = 0;
  for (size_t t : s.tensors) {
    slots.push_back({tensors[t].name, dtype, tensors[t].shape});
    data += uint64_t(tensors[t].shape.numel()) * dtype_size(dtype);
  }
  s.header = safetensors_header(slots, {{"format", "pt"}});
  s.bytes = s.header.size() + data;
}

std::string index_json(const InitPlan& p) {
  json map = json::object();
  for (const auto& s : p.shards)
    for (size_t t : s.tensors) map[p.tensors[t].name] = s.file;
  json j = {{"metadata", {{"total_size", p.data_bytes}}}, {"weight_map", map}};
  return j.dump(2) + "\n";
}

// Values [begin, begin + n) of tensor t as fp32.
void generate(const CheckpointTensor& t, uint64_t key, float std, int64_t begin, int64_t n,
              float* out) {
  if (t.init != TensorInit::Normal) {
    std::fill(out, out + n, t.init == TensorInit::Ones ? 1.0f : 0.0f);
    return;
  }
  cpu_pool().parallel_for(
      n, [&](int64_t b, int64_t e) { normal_fill(out + b, key, begin + b, e - b, std); }, 65536);
}

void convert(const float* in, int64_t n, DType dtype, std::vector<unsigned char>& bytes) {
  bytes.resize(size_t(n) * dtype_size(dtype));
  if (dtype == DType::F32) {
    std::memcpy(bytes.data(), in, bytes.size());
    return;
  }
  auto* o = reinterpret_cast<uint16_t*>(bytes.data());
  cpu_pool().parallel_for(
      n,
      [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) o[i] = f32_to_bf16(in[i]);
      },
      65536);
}

class Writer {
 public:
  // Progress in MiB, reported on whole percents (plain lines every 5%).
  Writer(const InitPlan& p, bool show)
      : plan_(p),
        progress_("init", int64_t(p.data_bytes >> 20), "MiB"),
        show_(show),
        step_(std::max<int64_t>(1, int64_t(p.data_bytes >> 20) / 100)) {
    progress_.set_plain_every(5 * step_);
  }

  void write_shard(const InitShard& s, const fs::path& path) {
    AtomicFile f(path);
    f.write(s.header.data(), s.header.size());
    for (size_t t : s.tensors) write_tensor(plan_.tensors[t], f);
    f.commit();
  }

  void finish() {
    if (show_) progress_.finish();
  }

 private:
  void write_tensor(const CheckpointTensor& t, AtomicFile& f) {
    const uint64_t key = init_key(t.name, plan_.options.seed);
    const float std = float(plan_.config.initializer_range);
    const int64_t n = t.shape.numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      const int64_t m = std::min(kChunk, n - b);
      values_.resize(size_t(m));
      generate(t, key, std, b, m, values_.data());
      convert(values_.data(), m, plan_.options.dtype, bytes_);
      f.write(bytes_.data(), bytes_.size());
      done_ += bytes_.size();
      report();
    }
  }

  void report() {
    const int64_t at = int64_t(done_ >> 20) / step_ * step_;
    if (show_ && at > reported_) progress_.update(at);
    reported_ = std::max(reported_, at);
  }

  const InitPlan& plan_;
  Progress progress_;
  bool show_;
  int64_t step_, reported_ = 0;
  uint64_t done_ = 0;
  std::vector<float> values_;
  std::vector<unsigned char> bytes_;
};

// Removes the files (and the folder, when this run made it) of a failed write.
void undo(const std::vector<fs::path>& written, const fs::path& dir, bool made_dir) {
  std::error_code ec;
  for (const auto& p : written) fs::remove(p, ec);
  if (made_dir) fs::remove(dir, ec);
}

bool holds_checkpoint(const fs::path& dir) {
  if (fs::exists(dir / "config.json") || fs::exists(dir / "model.safetensors.index.json"))
    return true;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ".safetensors") return true;
  return false;
}

// The nearest folder that exists at or above `dir` (where the space would come from).
fs::path existing_ancestor(const fs::path& dir) {
  fs::path p = fs::absolute(dir);
  while (!fs::exists(p) && p.has_parent_path() && p != p.parent_path()) p = p.parent_path();
  return p;
}

}  // namespace

void init_weights(DeepSeekModel& model, uint64_t seed) {
  const float std = float(model.config().initializer_range);
  constexpr int64_t kChunk = int64_t(1) << 24;  // elements per host buffer (64 MiB of fp32)
  std::vector<float> buf;
  std::vector<unsigned char> bytes;
  for (const CheckpointTensor& t : checkpoint_layout(model.config())) {
    Param& p = model.params().at(t.name);
    const int64_t n = p.value.numel(), row = n / std::max<int64_t>(1, p.value.dim(0));
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, row));
    const uint64_t key = init_key(t.name, seed);
    for (int64_t r = 0; r < p.value.dim(0); r += rows_per_chunk) {
      const int64_t r_end = std::min(p.value.dim(0), r + rows_per_chunk), m = (r_end - r) * row;
      buf.resize(size_t(m));
      generate(t, key, std, r * row, m, buf.data());
      Shape s = p.value.shape();
      s.d[0] = r_end - r;
      convert(buf.data(), m, p.value.dtype(), bytes);
      Tensor dst = p.value.slice(r, r_end);
      dst.copy_from(Tensor::view_of(bytes.data(), s, p.value.dtype(), nullptr));
    }
  }
}

uint64_t init_key(const std::string& name, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the name
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return mix64(h ^ mix64(seed + kGolden));
}

void normal_fill(float* out, uint64_t key, int64_t begin, int64_t count, float std) {
  const int64_t end = begin + count;
  for (int64_t p = begin / 2; 2 * p < end; ++p) {
    double z0, z1;
    normal_pair(key, uint64_t(p), z0, z1);
    if (2 * p >= begin) out[2 * p - begin] = float(double(std) * z0);
    if (2 * p + 1 < end) out[2 * p + 1 - begin] = float(double(std) * z1);
  }
}

InitPlan plan_init(const ModelConfig& config, const InitOptions& options) {
  if (options.dtype != DType::BF16 && options.dtype != DType::F32)
    fail("init: dtype {} is not supported (bf16 or f32)", dtype_name(options.dtype));
  if (options.shard_bytes == 0) fail("init: the shard size must be positive");
  InitPlan p;
  p.config = config;
  p.config.torch_dtype = options.dtype == DType::BF16 ? "bfloat16" : "float32";
  p.options = options;
  p.tensors = checkpoint_layout(config);
  p.shards = split_shards(p.tensors, options.dtype, options.shard_bytes);
  for (size_t i = 0; i < p.shards.size(); ++i)
    finish_shard(p.shards[i], i, p.shards.size(), p.tensors, options.dtype);
  for (const auto& t : p.tensors) {
    if (t.init != TensorInit::Zeros) p.params += t.shape.numel();
    p.data_bytes += uint64_t(t.shape.numel()) * dtype_size(options.dtype);
  }
  if (p.shards.size() > 1) p.index_json = index_json(p);
  p.config_json = config_to_json(p.config).dump(2) + "\n";
  p.total_bytes = p.index_json.size() + p.config_json.size() + options.tokenizer_json.size();
  for (const auto& s : p.shards) p.total_bytes += s.bytes;
  return p;
}

void check_init_target(const InitPlan& plan, const fs::path& dir) {
  if (fs::exists(dir) && !fs::is_directory(dir))
    fail("{}: exists and is not a directory", dir.string());
  if (fs::is_directory(dir) && holds_checkpoint(dir))
    fail("{}: already holds a checkpoint (config.json or safetensors); choose another --out",
         dir.string());
  const fs::path base = existing_ancestor(dir);
  std::error_code ec;
  const fs::space_info space = fs::space(base, ec);
  if (ec)
    fail("{}: cannot read the free space of {} ({})", dir.string(), base.string(), ec.message());
  if (space.available < plan.total_bytes)
    fail("{}: not enough free disk space: the checkpoint needs {}, {} has {} available",
         dir.string(), human_bytes(double(plan.total_bytes)), base.string(),
         human_bytes(double(space.available)));
}

void write_init(const InitPlan& plan, const fs::path& dir, bool show_progress) {
  const bool made_dir = !fs::exists(dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create directory ({})", dir.string(), ec.message());
  std::vector<fs::path> written;
  try {
    Writer w(plan, show_progress && plan.data_bytes >= kProgressBytes);
    for (const auto& s : plan.shards) {
      w.write_shard(s, dir / s.file);
      written.push_back(dir / s.file);
    }
    w.finish();
    auto text = [&](const std::string& name, const std::string& content) {
      if (content.empty()) return;
      write_file_atomic(dir / name, content);
      written.push_back(dir / name);
    };
    text("model.safetensors.index.json", plan.index_json);
    text("tokenizer.json", plan.options.tokenizer_json);
    text("config.json", plan.config_json);  // last: a folder with config.json is complete
  } catch (...) {
    undo(written, dir, made_dir);
    throw;
  }
}

}  // namespace moekit
