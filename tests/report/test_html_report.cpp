// HtmlReport: line-chart points and markers, ticks, heatmap cells and colours, escaping, and the
// atomic write.
#include "report/html_report.h"

#include <gtest/gtest.h>

#include <cmath>
#include <regex>

#include "../temp_dir.h"
#include "core/error.h"

namespace moekit {

using test::count_of;

namespace {
// The "x,y" pairs of the polyline named `name` (from its points attribute).
size_t polyline_pairs(const std::string& html, const std::string& name) {
  std::smatch m;
  const std::regex re("data-name=\"" + name + "\" data-points=\"(\\d+)\"[^>]*points=\"([^\"]*)\"");
  if (!std::regex_search(html, m, re)) return size_t(-1);
  const size_t declared = std::stoul(m[1]);
  const std::string pts = m[2];
  const size_t pairs = pts.empty() ? 0 : count_of(pts, ",");
  EXPECT_EQ(declared, pairs) << name;
  return pairs;
}
}  // namespace

TEST(HtmlReport, LineChartDrawsFinitePointsMarkersAndLegend) {
  HtmlReport page("Run <1>");
  page.add_line_chart("Loss", {{"train", {1, 2, 3, 4, 5}, {5, 4, NAN, 3, 2.5}, false},
                               {"val & test", {2, 4}, {4.5, 3.5}, true}});
  const std::string html = page.html();
  EXPECT_EQ(polyline_pairs(html, "train"), 4u);  // the NaN point is skipped
  EXPECT_EQ(polyline_pairs(html, "val &amp; test"), 2u);
  EXPECT_EQ(count_of(html, "<circle class=\"marker\""), 2u);
  EXPECT_EQ(count_of(html, "<svg class=\"chart line-chart\""), 1u);
  EXPECT_NE(html.find("<title>Run &lt;1&gt;</title>"), std::string::npos);
  EXPECT_NE(html.find(">val &amp; test</text>"), std::string::npos);  // legend entry
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(page.sections(), 1u);
}

TEST(HtmlReport, TicksAreRoundNumbers) {
  HtmlReport page("t");
  // x spans 0..1000 -> ticks every 100; y spans 0.1..0.3 -> ticks every 0.05, printed cleanly.
  page.add_line_chart("c", {{"s", {0, 500, 1000}, {0.1, 0.3, 0.2}, false}});
  const std::string html = page.html();
  for (const char* t : {">0</text>", ">500</text>", ">1000</text>", ">0.10</text>", ">0.30</text>"})
    EXPECT_NE(html.find(t), std::string::npos) << t;
  EXPECT_EQ(html.find("0.30000000"), std::string::npos);
  // The first and last x ticks sit on the plot edges: x = 72 and 72 + 812.
  EXPECT_NE(html.find("x=\"72.0\" y=\"286.0\" text-anchor=\"middle\">0<"), std::string::npos);
  EXPECT_NE(html.find("x=\"884.0\" y=\"286.0\" text-anchor=\"middle\">1000<"), std::string::npos);
}

TEST(HtmlReport, EmptyChartSaysNoData) {
  HtmlReport page("t");
  page.add_line_chart("nothing", {{"s", {1, 2}, {NAN, INFINITY}, false}});
  EXPECT_NE(page.html().find("no data"), std::string::npos);
  EXPECT_EQ(page.html().find("<polyline"), std::string::npos);
}

TEST(HtmlReport, HeatmapCellsAndDivergingColours) {
  HtmlReport page("t");
  HeatmapOptions opt;
  opt.diverging = true;
  opt.center = 1.0;
  opt.lo = 0.0;
  opt.hi = 2.0;
  page.add_heatmap("load", {"0", "1", "2"}, {"a", "b", "c", "d"},
                   {{0.0, 1.0, 2.0, 1.0}, {1.0, 1.0, 1.0, 1.0}, {0.5, 1.5, NAN, 1.0}}, opt);
  const std::string html = page.html();
  EXPECT_EQ(count_of(html, "<rect class=\"cell\""), 12u);
  EXPECT_NE(html.find("data-rows=\"3\" data-cols=\"4\""), std::string::npos);
  EXPECT_EQ(count_of(html, "fill=\"#3163ad\""), 1u);  // 0.0: the blue end
  EXPECT_EQ(count_of(html, "fill=\"#c8322d\""), 1u);  // 2.0: the red end
  EXPECT_EQ(count_of(html, "fill=\"#f7f7f7\""), 7u);  // 1.0: white centre
  EXPECT_EQ(count_of(html, "fill=\"#c8c8c8\""), 1u);  // NaN: grey, "n/a"
  EXPECT_NE(html.find(": n/a</title>"), std::string::npos);
  // 0.5 is halfway from blue to white: (49+247)/2, (99+247)/2, (173+247)/2.
  EXPECT_EQ(count_of(html, "fill=\"#94add2\""), 1u);
}

TEST(HtmlReport, HeatmapShapeMustMatchLabels) {
  HtmlReport page("t");
  EXPECT_THROW(page.add_heatmap("h", {"0"}, {"a", "b"}, {{1.0}}), Error);
  EXPECT_THROW(page.add_heatmap("h", {"0", "1"}, {"a"}, {{1.0}}), Error);
}

TEST(HtmlReport, WriteReplacesTheFileAtomically) {
  test::TempDir dir;
  HtmlReport page("t");
  page.add_table("numbers", {"k", "v"}, {{"a", "1"}, {"b<", "2"}});
  const auto out = dir / "r.html";
  test::write_text(out, "old");
  page.write(out);
  EXPECT_EQ(test::read_text(out), page.html());
  EXPECT_NE(page.html().find("<td>b&lt;</td>"), std::string::npos);
  size_t files = 0;
  for (auto& e : std::filesystem::directory_iterator(dir.path())) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);  // no temp file left behind
  EXPECT_THROW(page.write(dir / "missing" / "r.html"), Error);
}

}  // namespace moekit
