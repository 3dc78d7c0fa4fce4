// Training report: metrics parsing, the page built from a synthetic run, `moekit report` errors,
// and a headless Chromium rendering of the page when Chromium is installed.
#include "train/report.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include "../run_command.h"
#include "../temp_dir.h"
#include "core/error.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wshadow=local"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#include <stb/stb_image.h>
#pragma GCC diagnostic pop

namespace moekit {

namespace fs = std::filesystem;
using test::count_of;

namespace {

// 20 training rows (steps 10..200), validation on steps 100 and 200, expert load (2 MoE layers x
// 4 experts) on steps 180..200: in layer 0, expert 0 gets twice the mean load.
std::string synthetic_metrics() {
  std::string out;
  for (int s = 10; s <= 200; s += 10) {
    out += "{\"step\": " + std::to_string(s) + ", \"loss\": " + std::to_string(6.0 - s / 50.0) +
           ", \"lr\": 0.001, \"maxvio\": " + std::to_string(1.0 - s / 400.0) +
           ", \"grad_norm\": 1.5";
    if (s % 100 == 0) out += ", \"val_loss\": " + std::to_string(6.2 - s / 50.0);
    if (s >= 180) out += ", \"expert_load\": [[400, 100, 100, 200], [175, 175, 175, 175]]";
    out += "}\n";
  }
  return out;
}

fs::path make_run(const test::TempDir& dir) {
  const fs::path run = dir / "run-a";
  fs::create_directories(run);
  test::write_text(run / "metrics.jsonl", synthetic_metrics());
  test::write_text(run / "config.json", R"({"name": "tiny", "num_hidden_layers": 3})");
  return run;
}

std::string points_of(const std::string& html, const std::string& name) {
  const std::string key = "data-name=\"" + name + "\" data-points=\"";
  const size_t at = html.find(key);
  if (at == std::string::npos) return "missing";
  return html.substr(at + key.size(), html.find('"', at + key.size()) - at - key.size());
}

}  // namespace

TEST(RunReport, ReadMetricsKeepsOptionalFields) {
  test::TempDir dir;
  const fs::path run = make_run(dir);
  const auto rows = read_metrics(run / "metrics.jsonl");
  ASSERT_EQ(rows.size(), 20u);
  EXPECT_EQ(rows[0].step, 10);
  EXPECT_DOUBLE_EQ(*rows[0].loss, 5.8);
  EXPECT_FALSE(rows[0].val_loss);
  EXPECT_DOUBLE_EQ(*rows[9].val_loss, 4.2);   // step 100
  EXPECT_TRUE(rows[16].expert_load.empty());  // step 170
  ASSERT_EQ(rows[17].expert_load.size(), 2u);
  EXPECT_EQ(rows[17].expert_load[0], (std::vector<double>{400, 100, 100, 200}));
}

TEST(RunReport, RelativeLoadIsLoadOverMean) {
  const auto rel = relative_load({{400, 100, 100, 200}, {0, 0, 0, 0}});
  EXPECT_EQ(rel[0], (std::vector<double>{2.0, 0.5, 0.5, 1.0}));  // mean 200
  EXPECT_TRUE(std::isnan(rel[1][0]));                            // no tokens: undefined
}

TEST(RunReport, PageHasChartsWithEveryPointAndLoadHeatmaps) {
  test::TempDir dir;
  const std::string html = build_run_report(make_run(dir)).html();
  EXPECT_NE(html.find("<h1>Training report: run-a (tiny)</h1>"), std::string::npos);
  EXPECT_EQ(points_of(html, "train loss"), "20");
  EXPECT_EQ(points_of(html, "val loss"), "2");
  EXPECT_EQ(points_of(html, "lr"), "20");
  EXPECT_EQ(points_of(html, "MaxVio (batch)"), "20");
  EXPECT_EQ(points_of(html, "tokens/s"), "missing");  // no throughput field, no chart
  EXPECT_EQ(count_of(html, "<circle class=\"marker\""), 2u);
  // Last interval and the 3-interval sum: 2 heatmaps of 2 x 4 cells.
  EXPECT_EQ(count_of(html, "data-rows=\"2\" data-cols=\"4\""), 2u);
  EXPECT_EQ(count_of(html, "<rect class=\"cell\""), 16u);
  EXPECT_NE(html.find("interval ending at step 200"), std::string::npos);
  EXPECT_NE(html.find("all 3 logged intervals (steps 180 to 200)"), std::string::npos);
  EXPECT_EQ(count_of(html, "MoE layer 0, expert 0: 2</title>"), 2u);
  EXPECT_EQ(count_of(html, "MoE layer 0, expert 1: 0.5</title>"), 2u);
  EXPECT_EQ(count_of(html, "MoE layer 1, expert 3: 1</title>"), 2u);
  EXPECT_NE(html.find("<td>best validation loss</td><td>2.2000 (step 200)</td>"),
            std::string::npos);
  EXPECT_NE(html.find("<td>num_hidden_layers</td><td>3</td>"), std::string::npos);
}

TEST(RunReport, CommandWritesPage) {
  test::TempDir dir;
  const fs::path run = make_run(dir);
  auto r = test::run_moekit_merged("report '" + run.string() + "' --out '" +
                                   (dir / "r.html").string() + "'");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(test::read_text(dir / "r.html"), build_run_report(run).html());
  r = test::run_moekit_merged("report '" + run.string() + "'");  // default: RUN/report.html
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(run / "report.html"));
}

TEST(RunReport, BadInputIsOneLineErrorAndNoFile) {
  test::TempDir dir;
  const fs::path run = dir / "run", out = dir / "out.html";
  auto expect_error = [&](const std::string& what) {
    const auto r =
        test::run_moekit_merged("report '" + run.string() + "' --out '" + out.string() + "'");
    EXPECT_EQ(r.status, 2) << r.output;
    EXPECT_EQ(count_of(r.output, "\n"), 1u) << r.output;
    EXPECT_NE(r.output.find(what), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(out));
  };
  expect_error(run.string() + ": run folder not found");
  fs::create_directories(run);
  expect_error((run / "metrics.jsonl").string() + ": not found");
  const std::string good = "{\"step\": 1, \"loss\": 3.0}\n";
  test::write_text(run / "metrics.jsonl", good + "\n" + "{\"step\": 2, \"loss\": 2.9\n");
  expect_error((run / "metrics.jsonl").string() + ":3: not valid JSON");
  test::write_text(run / "metrics.jsonl", good + "{\"step\": 2.5, \"loss\": 2.9}\n");
  expect_error("metrics.jsonl:2: \"step\" must be an integer");
  test::write_text(run / "metrics.jsonl", good + "{\"step\": 2, \"loss\": \"low\"}\n");
  expect_error("metrics.jsonl:2: \"loss\" must be a number");
  test::write_text(run / "metrics.jsonl", good + "{\"step\": 2, \"expert_load\": [[1, 2], [3]]}\n");
  expect_error("metrics.jsonl:2: \"expert_load\" must be a list of equally long lists");
  test::write_text(run / "metrics.jsonl", "\n");
  expect_error("metrics.jsonl: no metric rows");
}

// Renders the page in headless Chromium and checks the screenshot shows the charts: blue series
// lines and the red heatmap cell of the overloaded expert must be on it.
TEST(RunReport, RendersInChromium) {
  const char* chromium = "/usr/bin/chromium";
  if (!fs::exists(chromium)) GTEST_SKIP() << "chromium not installed (scripts/setup installs it)";
  test::TempDir dir;
  const fs::path run = make_run(dir), page = dir / "report.html", png = dir / "shot.png";
  build_run_report(run).write(page);
  const std::string cmd =
      std::string("timeout 60 ") + chromium +
      " --headless --no-sandbox --disable-gpu --disable-quic --no-first-run"
      " --disable-background-networking --disable-component-update --disable-sync"
      " --user-data-dir='" +
      (dir / "profile").string() + "' --screenshot='" + png.string() +
      "' --window-size=1200,2000 'file://" + page.string() + "' >'" +
      (dir / "chromium.log").string() + "' 2>&1";
  const auto r = test::run_command(cmd);
  ASSERT_EQ(r.status, 0) << test::read_text(dir / "chromium.log");
  ASSERT_TRUE(fs::exists(png));
  EXPECT_GT(fs::file_size(png), 20'000u);

  int w = 0, h = 0, channels = 0;
  unsigned char* px = stbi_load(png.string().c_str(), &w, &h, &channels, 3);
  ASSERT_NE(px, nullptr) << stbi_failure_reason();
  EXPECT_EQ(w, 1200);
  EXPECT_EQ(h, 2000);
  auto count_near = [&](int r0, int g0, int b0) {
    size_t n = 0;
    for (int i = 0; i < w * h; ++i) {
      const unsigned char* p = px + 3 * i;
      n += std::abs(p[0] - r0) < 16 && std::abs(p[1] - g0) < 16 && std::abs(p[2] - b0) < 16;
    }
    return n;
  };
  const size_t blue = count_near(0x1f, 0x6f, 0xb4);  // first series colour (loss, lr, maxvio)
  const size_t red = count_near(0xc8, 0x32, 0x2d);   // load / mean = 2: the red end
  stbi_image_free(px);
  EXPECT_GT(blue, 1500u);
  EXPECT_GT(red, 1500u);  // two 48 x 28 px cells, less their text
}

}  // namespace moekit
