// Training report: metrics.jsonl parsing with line-numbered errors, and the page layout.
#include "train/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::optional<double> number_field(const json& row, const char* key, const fs::path& file,
                                   int64_t line) {
  auto it = row.find(key);
  if (it == row.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) fail("{}:{}: \"{}\" must be a number", file.string(), line, key);
  return it->get<double>();
}

std::vector<std::vector<double>> load_field(const json& row, const fs::path& file, int64_t line) {
  auto it = row.find("expert_load");
  if (it == row.end() || it->is_null()) return {};
  auto bad = [&] {
    fail(
        "{}:{}: \"expert_load\" must be a list of equally long lists of numbers (one per MoE "
        "layer)",
        file.string(), line);
  };
  if (!it->is_array()) bad();
  std::vector<std::vector<double>> load;
  for (const auto& layer : *it) {
    if (!layer.is_array() || layer.empty()) bad();
    std::vector<double> counts;
    for (const auto& c : layer) {
      if (!c.is_number()) bad();
      counts.push_back(c.get<double>());
    }
    if (!load.empty() && counts.size() != load.front().size()) bad();
    load.push_back(std::move(counts));
  }
  return load;
}

std::string fmt_opt(const std::optional<double>& v, const char* spec = "{:.4f}") {
  return v ? fmt::format(fmt::runtime(spec), *v) : std::string("n/a");
}

// The points of one optional field over the steps that have it.
ChartSeries series_of(const std::vector<MetricsRow>& rows, std::string name,
                      std::optional<double> MetricsRow::*field, bool markers = false) {
  ChartSeries s{std::move(name), {}, {}, markers};
  for (const auto& r : rows)
    if (r.*field) {
      s.x.push_back(double(r.step));
      s.y.push_back(*(r.*field));
    }
  return s;
}

std::vector<std::string> index_labels(size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back(std::to_string(i));
  return out;
}

void add_load_heatmap(HtmlReport& page, const std::string& title,
                      const std::vector<std::vector<double>>& load) {
  const auto rel = relative_load(load);
  double peak = 2.0;  // a balanced layer stays pale; the scale widens only for hot experts
  for (const auto& row : rel)
    for (double v : row)
      if (std::isfinite(v)) peak = std::max(peak, v);
  HeatmapOptions opt;
  opt.value_label = "load / mean load (1 = balanced)";
  opt.diverging = true;
  opt.center = 1.0;
  opt.lo = 0.0;
  opt.hi = peak;
  opt.row_title = "MoE layer";
  opt.col_title = "expert";
  page.add_heatmap(title, index_labels(rel.size()), index_labels(rel.front().size()), rel, opt);
}

}  // namespace

std::vector<MetricsRow> read_metrics(const fs::path& file) {
  if (!fs::exists(file))
    fail("{}: not found (the trainer writes it into the run folder)", file.string());
  std::ifstream in(file);
  if (!in) fail("{}: cannot read file", file.string());
  std::vector<MetricsRow> rows;
  std::string text;
  int64_t line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    const json j = json::parse(text, nullptr, false);
    if (j.is_discarded()) fail("{}:{}: not valid JSON", file.string(), line);
    if (!j.is_object()) fail("{}:{}: expected a JSON object", file.string(), line);
    auto step = j.find("step");
    if (step == j.end() || !step->is_number_integer())
      fail("{}:{}: \"step\" must be an integer", file.string(), line);
    MetricsRow r;
    r.step = step->get<int64_t>();
    r.loss = number_field(j, "loss", file, line);
    r.lr = number_field(j, "lr", file, line);
    r.maxvio = number_field(j, "maxvio", file, line);
    r.tokens_per_s = number_field(j, "tokens_per_s", file, line);
    r.val_loss = number_field(j, "val_loss", file, line);
    r.val_maxvio_global = number_field(j, "val_maxvio_global", file, line);
    r.expert_load = load_field(j, file, line);
    rows.push_back(std::move(r));
  }
  if (rows.empty()) fail("{}: no metric rows", file.string());
  return rows;
}

std::vector<std::vector<double>> relative_load(const std::vector<std::vector<double>>& load) {
  std::vector<std::vector<double>> rel;
  for (const auto& layer : load) {
    double sum = 0;
    for (double c : layer) sum += c;
    const double mean = layer.empty() ? 0 : sum / double(layer.size());
    std::vector<double> row;
    for (double c : layer) row.push_back(mean > 0 ? c / mean : NAN);
    rel.push_back(std::move(row));
  }
  return rel;
}

HtmlReport build_run_report(const fs::path& run) {
  if (!fs::is_directory(run)) fail("{}: run folder not found", run.string());
  const std::vector<MetricsRow> rows = read_metrics(run / "metrics.jsonl");

  json config;
  const fs::path config_file = run / "config.json";
  if (fs::exists(config_file)) {
    std::ifstream in(config_file);
    config = json::parse(in, nullptr, false);
    if (config.is_discarded() || !config.is_object())
      fail("{}: not a valid JSON object", config_file.string());
  }
  std::string title = "Training report: " + fs::weakly_canonical(run).filename().string();
  for (const char* key : {"name", "model_type"})
    if (config.contains(key) && config[key].is_string()) {
      title += " (" + config[key].get<std::string>() + ")";
      break;
    }
  HtmlReport page(title);

  // Summary: where the run ended and its best validation point.
  const MetricsRow& last = rows.back();
  std::optional<double> last_loss, last_val, best_val, last_maxvio;
  int64_t best_step = 0;
  double tps_sum = 0;
  int64_t tps_n = 0;
  for (const auto& r : rows) {
    if (r.loss) last_loss = r.loss;
    if (r.maxvio) last_maxvio = r.maxvio;
    if (r.val_loss) {
      last_val = r.val_loss;
      if (!best_val || *r.val_loss < *best_val) best_val = r.val_loss, best_step = r.step;
    }
    if (r.tokens_per_s) tps_sum += *r.tokens_per_s, ++tps_n;
  }
  std::vector<std::vector<std::string>> summary = {
      {"last step", std::to_string(last.step)},
      {"metric rows", std::to_string(rows.size())},
      {"final training loss", fmt_opt(last_loss)},
      {"last validation loss", fmt_opt(last_val)},
      {"best validation loss",
       best_val ? fmt::format("{:.4f} (step {})", *best_val, best_step) : "n/a"},
      {"final MaxVio (batch)", fmt_opt(last_maxvio, "{:.3f}")},
      {"mean throughput", tps_n ? fmt::format("{:.0f} tokens/s", tps_sum / double(tps_n)) : "n/a"}};
  page.add_table("Summary", {"metric", "value"}, summary);

  page.add_line_chart("Loss",
                      {series_of(rows, "train loss", &MetricsRow::loss),
                       series_of(rows, "val loss", &MetricsRow::val_loss, true)},
                      {.x_label = "step", .y_label = "cross-entropy (nats)"});
  page.add_line_chart("Learning rate", {series_of(rows, "lr", &MetricsRow::lr)},
                      {.x_label = "step", .y_label = "learning rate"});
  std::vector<ChartSeries> balance = {series_of(rows, "MaxVio (batch)", &MetricsRow::maxvio)};
  if (std::any_of(rows.begin(), rows.end(), [](auto& r) { return r.val_maxvio_global; }))
    balance.push_back(series_of(rows, "val MaxVio (global)", &MetricsRow::val_maxvio_global, true));
  page.add_line_chart("Load balance: MaxVio = (max load - mean load) / mean load", balance,
                      {.x_label = "step", .y_label = "MaxVio"});
  if (tps_n)
    page.add_line_chart("Throughput", {series_of(rows, "tokens/s", &MetricsRow::tokens_per_s)},
                        {.x_label = "step", .y_label = "tokens per second"});

  // Expert load: the last logged interval, and the sum over all intervals of the same shape.
  const MetricsRow* last_load = nullptr;
  for (const auto& r : rows)
    if (!r.expert_load.empty()) last_load = &r;
  if (last_load) {
    add_load_heatmap(page, fmt::format("Expert load, interval ending at step {}", last_load->step),
                     last_load->expert_load);
    std::vector<std::vector<double>> total = last_load->expert_load;
    for (auto& layer : total) std::fill(layer.begin(), layer.end(), 0.0);
    int64_t n = 0, first_step = last_load->step;
    for (const auto& r : rows) {
      if (r.expert_load.size() != total.size() || r.expert_load[0].size() != total[0].size())
        continue;
      for (size_t l = 0; l < total.size(); ++l)
        for (size_t e = 0; e < total[l].size(); ++e) total[l][e] += r.expert_load[l][e];
      first_step = std::min(first_step, r.step);
      ++n;
    }
    if (n > 1)
      add_load_heatmap(page,
                       fmt::format("Expert load, all {} logged intervals (steps {} to {})", n,
                                   first_step, last_load->step),
                       total);
  } else {
    page.add_paragraph("No row carries \"expert_load\": no expert-load heatmap.");
  }

  if (!config.empty()) {
    std::vector<std::vector<std::string>> fields;
    for (auto it = config.begin(); it != config.end(); ++it)
      if (it->is_primitive() && !it->is_null())
        fields.push_back({it.key(), it->is_string() ? it->get<std::string>() : it->dump()});
    if (!fields.empty()) page.add_table("Configuration (config.json)", {"field", "value"}, fields);
  }
  return page;
}

}  // namespace moekit
