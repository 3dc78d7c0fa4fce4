// Run directory, checkpoints, metrics file.
#include "train/run_state.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "model/checkpoint.h"
#include "model/safetensors.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
constexpr int kFormat = 1;

void fsync_dir(const fs::path& d) {
  int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

json read_json(const fs::path& f) {
  std::ifstream in(f);
  if (!in) fail("{}: cannot read", f.string());
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) fail("{}: not valid JSON", f.string());
  return j;
}

int64_t step_of(const fs::path& p) {
  const std::string n = p.filename().string();
  if (!n.starts_with("step-")) return -1;
  try {
    return std::stoll(n.substr(5));
  } catch (...) {
    return -1;
  }
}
}  // namespace

void RunDir::prepare(const ModelConfig& cfg, bool resume) {
  std::error_code ec;
  fs::create_directories(dir_ / "checkpoints", ec);
  if (ec) fail("{}: cannot create run directory ({})", dir_.string(), ec.message());
  const json want = config_to_json(cfg);
  const fs::path cfg_file = dir_ / "config.json";
  if (fs::exists(cfg_file)) {
    if (!resume && latest_checkpoint())
      fail("{}: holds a run already; pass --resume to continue it or choose another --out",
           dir_.string());
    if (resume) {
      // Compared as parsed configs: a field an older moekit did not write reads as its default.
      json have = config_to_json(load_config(cfg_file));
      for (auto it = want.begin(); it != want.end(); ++it)
        if (!have.contains(it.key()) || have[it.key()] != it.value())
          fail(
              "{}: cannot resume: the run was trained with another config (field \"{}\" is {}, "
              "now {})",
              cfg_file.string(), it.key(),
              have.contains(it.key()) ? have[it.key()].dump() : "absent", it.value().dump());
    }
  }
  write_file_atomic(cfg_file, want.dump(2) + "\n");
}

std::optional<fs::path> RunDir::latest_checkpoint() const {
  std::optional<fs::path> best;
  int64_t best_step = -1;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_ / "checkpoints", ec)) {
    int64_t s = step_of(e.path());
    if (s > best_step && fs::exists(e.path() / "state.json")) {
      best_step = s;
      best = e.path();
    }
  }
  return best;
}

RunState RunDir::load_checkpoint(const fs::path& ckpt, DeepSeekModel& model, AdamW& adam) const {
  json st = read_json(ckpt / "state.json");
  if (!st.contains("format") || st["format"] != kFormat || !st.contains("step") ||
      !st.contains("data_position"))
    fail("{}: not a moekit checkpoint state (format {})", (ckpt / "state.json").string(), kFormat);
  auto weights = SafetensorsFile::open(ckpt / "model.safetensors");
  load_weights(model, weights.tensors(), (ckpt / "model.safetensors").string());
  auto opt = SafetensorsFile::open(ckpt / "optimizer.safetensors");
  std::map<std::string, Tensor> state;
  for (const auto& [name, e] : opt.tensors()) {
    Param* p = model.params().find(name.substr(2));
    if (!p || !(p->value.shape() == e.tensor.shape()))
      fail("{}: optimizer tensor {} does not match the model",
           (ckpt / "optimizer.safetensors").string(), name);
    state[name] = e.tensor.to_f32();
  }
  adam.load_state(state, st["step"].get<int64_t>());
  return {st["step"].get<int64_t>(), st["data_position"].get<int64_t>()};
}

void RunDir::save_checkpoint(int64_t step, int64_t data_position, const DeepSeekModel& model,
                             const AdamW& adam, int64_t keep) const {
  const fs::path root = dir_ / "checkpoints";
  const fs::path final_dir = root / fmt::format("step-{:08}", step);
  const fs::path tmp = root / fmt::format(".step-{:08}.tmp-{}", step, ::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    std::vector<std::pair<std::string, Tensor>> weights;
    for (const auto& p : model.params().all()) weights.emplace_back(p->name, p->value);
    save_safetensors(tmp / "model.safetensors", weights);
    const auto state = adam.state();
    std::vector<std::pair<std::string, Tensor>> moments(state.begin(), state.end());
    save_safetensors(tmp / "optimizer.safetensors", moments);
    json st = {{"format", kFormat}, {"step", step}, {"data_position", data_position}};
    write_file_atomic(tmp / "state.json", st.dump(2) + "\n");
    fsync_dir(tmp);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);  // the previous checkpoint stays as it was
    throw;
  }
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  fsync_dir(root);
  std::vector<std::pair<int64_t, fs::path>> all;
  for (const auto& e : fs::directory_iterator(root))
    if (step_of(e.path()) >= 0) all.emplace_back(step_of(e.path()), e.path());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + size_t(keep) < all.size(); ++i) fs::remove_all(all[i].second);
}

void RunDir::append_metrics(const json& row) const {
  std::ofstream out(dir_ / "metrics.jsonl", std::ios::app);
  out << row.dump() << "\n";
  if (!out) fail("{}: cannot append metrics", (dir_ / "metrics.jsonl").string());
}

void RunDir::truncate_metrics(int64_t step) const {
  const fs::path f = dir_ / "metrics.jsonl";
  if (!fs::exists(f)) return;
  std::ifstream in(f);
  std::string line, kept;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("step") && j["step"].get<int64_t>() <= step)
      kept += line + "\n";
  }
  write_file_atomic(f, kept);
}

}  // namespace moekit
