// HtmlReport: one self-contained HTML page of tables, line charts and heatmaps drawn as inline
// SVG by this code (no scripts, no external resources), for training reports and, later, ESFT's
// routing-dispersion and analysis pages. Sections appear in the order they are added.
//
// Machine-checkable markup (tests rely on it, keep it stable):
//   <svg class="chart line-chart">      one per line chart; each series is
//     <polyline class="series" data-name="NAME" data-points="N" points="x,y x,y ...">
//     and, for series drawn with markers, N <circle class="marker"> elements
//   <svg class="chart heatmap" data-rows="R" data-cols="C">  with R*C <rect class="cell">
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace moekit {

// One line of a line chart. Non-finite points are skipped (a NaN loss must not break the page).
struct ChartSeries {
  std::string name;
  std::vector<double> x;
  std::vector<double> y;
  bool markers = false;  // draw a dot per point: for sparse series such as validation loss
};

struct LineChartOptions {
  std::string x_label = "step";
  std::string y_label;
  bool log_y = false;  // log10 axis (all y must be > 0; other points are skipped)
};

struct HeatmapOptions {
  std::string value_label;  // colour-bar caption, e.g. "load / mean load"
  // Diverging: white at `center`, blue below, red above (for ratios around 1). Sequential: light
  // to dark from lo to hi.
  bool diverging = false;
  double center = 1.0;
  std::optional<double> lo;  // colour range; defaults to the data's min / max
  std::optional<double> hi;
  std::string row_title;  // axis captions, e.g. "MoE layer" and "expert"
  std::string col_title;
};

class HtmlReport {
 public:
  explicit HtmlReport(std::string title);

  // A line of plain text (escaped) under the title or between sections.
  void add_paragraph(const std::string& text);
  // A small table; every row should have header.size() cells.
  void add_table(const std::string& title, const std::vector<std::string>& header,
                 const std::vector<std::vector<std::string>>& rows);
  void add_line_chart(const std::string& title, const std::vector<ChartSeries>& series,
                      const LineChartOptions& options = {});
  // values[r][c] for row_labels[r], col_labels[c]; fails unless the shape matches.
  void add_heatmap(const std::string& title, const std::vector<std::string>& row_labels,
                   const std::vector<std::string>& col_labels,
                   const std::vector<std::vector<double>>& values,
                   const HeatmapOptions& options = {});

  std::string html() const;
  // Writes html() to a temp file beside `path`, then renames it: readers never see half a page.
  void write(const std::filesystem::path& path) const;

  size_t sections() const { return sections_.size(); }

 private:
  std::string title_;
  std::vector<std::string> sections_;  // rendered HTML fragments
};

// HTML/XML escaping of text and attribute values.
std::string html_escape(const std::string& text);

}  // namespace moekit
