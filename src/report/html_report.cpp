// HtmlReport: page assembly, SVG line charts (nice ticks, legend, linear or log axes) and SVG
// heatmaps (diverging or sequential colour scale with a colour bar), and the atomic write.
#include "report/html_report.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>

#include "core/error.h"

namespace moekit {

namespace fs = std::filesystem;

namespace {

constexpr std::array<const char*, 8> kPalette = {"#1f6fb4", "#d1432f", "#2f9e44", "#e8890c",
                                                 "#7b4fbf", "#8c564b", "#d0449c", "#5f6b73"};
constexpr double kCharWidth = 6.8;  // average width of a 12px sans-serif character, for layout

// ---- axes --------------------------------------------------------------------------------------

// A "nice" tick spacing (1, 2 or 5 times a power of ten) giving about `target` intervals.
double nice_step(double range, int target) {
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
}

struct Axis {
  double lo = 0, hi = 1;  // data range mapped onto the axis (log10 units for a log axis)
  bool log = false;
  std::vector<double> ticks;  // in data units
  double step = 1;            // tick spacing (data units, linear axes)

  double unit(double v) const {  // 0..1 along the axis
    const double t = log ? std::log10(v) : v;
    return (t - lo) / (hi - lo);
  }
};

Axis linear_axis(double lo, double hi, int target) {
  if (hi - lo < 1e-12 * std::max(1.0, std::abs(hi))) {  // flat data: open a band around it
    const double pad = lo == 0 ? 1.0 : std::abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  Axis a;
  a.step = nice_step(hi - lo, target);
  // Integer tick indices: adding the step repeatedly would drift (0.30000000000000004).
  const double k0 = std::floor(lo / a.step + 1e-9), k1 = std::ceil(hi / a.step - 1e-9);
  a.lo = k0 * a.step;
  a.hi = k1 * a.step;
  for (double k = k0; k <= k1 + 0.5; k += 1) a.ticks.push_back(k * a.step);
  return a;
}

Axis log_axis(double lo, double hi) {
  Axis a;
  a.log = true;
  a.lo = std::floor(std::log10(lo));
  a.hi = std::ceil(std::log10(hi));
  if (a.hi <= a.lo) a.hi = a.lo + 1;
  const int every = a.hi - a.lo > 8 ? 2 : 1;
  for (int e = int(a.lo); e <= int(a.hi); e += every) a.ticks.push_back(std::pow(10.0, e));
  return a;
}

std::string tick_label(double v, const Axis& a) {
  if (std::abs(v) < 1e-12 * std::max(1.0, a.step)) return "0";
  const double mag = std::max(std::abs(a.log ? v : a.hi), std::abs(a.log ? v : a.lo));
  if (a.log || mag >= 1e6 || a.step < 1e-3) return fmt::format("{:.3g}", v);
  const int decimals = std::max(0, int(-std::floor(std::log10(a.step) + 1e-9)));
  return fmt::format("{:.{}f}", v, decimals);
}

// ---- colours -----------------------------------------------------------------------------------

struct Rgb {
  double r, g, b;
};

Rgb mix(Rgb a, Rgb b, double t) {
  return {a.r + (b.r - a.r) * t, a.g + (b.g - a.g) * t, a.b + (b.b - a.b) * t};
}

std::string hex(Rgb c) {
  auto ch = [](double v) { return int(std::lround(std::clamp(v, 0.0, 255.0))); };
  return fmt::format("#{:02x}{:02x}{:02x}", ch(c.r), ch(c.g), ch(c.b));
}

// Piecewise-linear ramp through `stops` for t in [0, 1].
template <size_t N>
Rgb ramp(const std::array<Rgb, N>& stops, double t) {
  t = std::clamp(t, 0.0, 1.0) * double(N - 1);
  const size_t i = std::min(size_t(t), N - 2);
  return mix(stops[i], stops[i + 1], t - double(i));
}

constexpr std::array<Rgb, 3> kDiverging = {Rgb{49, 99, 173}, Rgb{247, 247, 247}, Rgb{200, 50, 45}};
constexpr std::array<Rgb, 5> kSequential = {Rgb{247, 251, 255}, Rgb{198, 219, 239},
                                            Rgb{107, 174, 214}, Rgb{33, 113, 181}, Rgb{8, 48, 107}};

struct ColourScale {
  double lo, hi, center;
  bool diverging;

  // Position on the colour bar, 0..1; a diverging scale puts `center` at 0.5 whatever the range.
  double position(double v) const {
    if (!diverging) return hi > lo ? (v - lo) / (hi - lo) : 0.5;
    if (v < center) return center > lo ? 0.5 * (v - lo) / (center - lo) : 0.5;
    return hi > center ? 0.5 + 0.5 * (v - center) / (hi - center) : 0.5;
  }
  Rgb at_position(double t) const { return diverging ? ramp(kDiverging, t) : ramp(kSequential, t); }
  Rgb colour(double v) const { return at_position(position(v)); }
};

bool is_dark(Rgb c) {
  return 0.299 * c.r + 0.587 * c.g + 0.114 * c.b < 140;
}

std::string section(const std::string& title, const std::string& body) {
  return fmt::format("<section>\n<h2>{}</h2>\n{}</section>\n", html_escape(title), body);
}

std::string no_data(const std::string& title) {
  return section(title, "<p class=\"empty\">no data</p>\n");
}

}  // namespace

std::string html_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

HtmlReport::HtmlReport(std::string title) : title_(std::move(title)) {}

void HtmlReport::add_paragraph(const std::string& text) {
  sections_.push_back(fmt::format("<p>{}</p>\n", html_escape(text)));
}

void HtmlReport::add_table(const std::string& title, const std::vector<std::string>& header,
                           const std::vector<std::vector<std::string>>& rows) {
  std::string body = "<table>\n<tr>";
  for (const auto& h : header) body += fmt::format("<th>{}</th>", html_escape(h));
  body += "</tr>\n";
  for (const auto& row : rows) {
    body += "<tr>";
    for (const auto& cell : row) body += fmt::format("<td>{}</td>", html_escape(cell));
    body += "</tr>\n";
  }
  body += "</table>\n";
  sections_.push_back(section(title, body));
}

void HtmlReport::add_line_chart(const std::string& title, const std::vector<ChartSeries>& series,
                                const LineChartOptions& options) {
  // Keep only the points that can be drawn, per series.
  struct Points {
    std::vector<double> x, y;
  };
  std::vector<Points> kept(series.size());
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (size_t s = 0; s < series.size(); ++s) {
    const auto& in = series[s];
    MOEKIT_CHECK(in.x.size() == in.y.size(), "series '{}': {} x values but {} y values", in.name,
                 in.x.size(), in.y.size());
    for (size_t i = 0; i < in.x.size(); ++i) {
      const double x = in.x[i], y = in.y[i];
      if (!std::isfinite(x) || !std::isfinite(y) || (options.log_y && y <= 0)) continue;
      kept[s].x.push_back(x);
      kept[s].y.push_back(y);
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
  }
  if (!std::isfinite(x0)) {
    sections_.push_back(no_data(title));
    return;
  }

  const Axis ax = linear_axis(x0, x1, 8);
  const Axis ay = options.log_y ? log_axis(y0, y1) : linear_axis(y0, y1, 5);
  // The left margin grows with the widest y tick label so it never runs into the axis caption.
  size_t y_chars = 0;
  for (double t : ay.ticks) y_chars = std::max(y_chars, tick_label(t, ay).size());
  const double width = 900, height = 320, right = 16, top = 34, bottom = 50;
  const double left = std::max(72.0, 34 + kCharWidth * double(y_chars));
  const double pw = width - left - right, ph = height - top - bottom;
  auto px = [&](double x) { return left + ax.unit(x) * pw; };
  auto py = [&](double y) { return top + (1.0 - ay.unit(y)) * ph; };

  std::string svg = fmt::format(
      "<svg class=\"chart line-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" "
      "height=\"{1}\" viewBox=\"0 0 {0} {1}\" role=\"img\" aria-label=\"{2}\">\n",
      width, height, html_escape(title));
  svg += fmt::format("<rect class=\"plot\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/>\n", left,
                     top, pw, ph);
  for (double t : ay.ticks) {
    const double y = py(t);
    svg += fmt::format(
        "<line class=\"grid\" x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>"
        "<text class=\"tick\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n",
        left, y, left + pw, y, left - 6, y + 4, tick_label(t, ay));
  }
  for (double t : ax.ticks) {
    const double x = px(t);
    svg += fmt::format(
        "<line class=\"grid\" x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\"/>"
        "<text class=\"tick\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n",
        x, top, x, top + ph, x, top + ph + 16, tick_label(t, ax));
  }
  svg += fmt::format(
      "<line class=\"axis\" x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\"/>"
      "<line class=\"axis\" x1=\"{0}\" y1=\"{3}\" x2=\"{0}\" y2=\"{1}\"/>\n",
      left, top + ph, left + pw, top);
  svg += fmt::format(
      "<text class=\"label\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n",
      left + pw / 2, height - 8, html_escape(options.x_label));
  if (!options.y_label.empty())
    svg += fmt::format(
        "<text class=\"label\" transform=\"translate(16 {:.1f}) rotate(-90)\" "
        "text-anchor=\"middle\">{}{}</text>\n",
        top + ph / 2, html_escape(options.y_label), options.log_y ? " (log)" : "");

  double legend_x = left;
  for (size_t s = 0; s < series.size(); ++s) {
    const char* colour = kPalette[s % kPalette.size()];
    std::string points;
    for (size_t i = 0; i < kept[s].x.size(); ++i)
      points += fmt::format("{}{:.1f},{:.1f}", i ? " " : "", px(kept[s].x[i]), py(kept[s].y[i]));
    svg += fmt::format(
        "<polyline class=\"series\" data-name=\"{}\" data-points=\"{}\" fill=\"none\" "
        "stroke=\"{}\" stroke-width=\"1.8\" stroke-linejoin=\"round\" points=\"{}\"/>\n",
        html_escape(series[s].name), kept[s].x.size(), colour, points);
    if (series[s].markers)
      for (size_t i = 0; i < kept[s].x.size(); ++i)
        svg += fmt::format(
            "<circle class=\"marker\" cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3.2\" fill=\"{}\">"
            "<title>{}: {} {:g}, {:.5g}</title></circle>\n",
            px(kept[s].x[i]), py(kept[s].y[i]), colour, html_escape(series[s].name),
            html_escape(options.x_label), kept[s].x[i], kept[s].y[i]);
    // Legend along the top margin: a colour swatch and the series name.
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"14\" x2=\"{1:.1f}\" y2=\"14\" stroke=\"{2}\" "
        "stroke-width=\"3\"/><text class=\"legend\" x=\"{3:.1f}\" y=\"18\">{4}</text>\n",
        legend_x, legend_x + 18, colour, legend_x + 24, html_escape(series[s].name));
    legend_x += 24 + kCharWidth * double(series[s].name.size()) + 18;
  }
  svg += "</svg>\n";
  sections_.push_back(section(title, svg));
}

void HtmlReport::add_heatmap(const std::string& title, const std::vector<std::string>& row_labels,
                             const std::vector<std::string>& col_labels,
                             const std::vector<std::vector<double>>& values,
                             const HeatmapOptions& options) {
  if (values.size() != row_labels.size())
    fail("heatmap '{}': {} rows of values but {} row labels", title, values.size(),
         row_labels.size());
  for (size_t r = 0; r < values.size(); ++r)
    if (values[r].size() != col_labels.size())
      fail("heatmap '{}': row {} has {} values but there are {} column labels", title, r,
           values[r].size(), col_labels.size());
  double vmin = INFINITY, vmax = -INFINITY;
  for (const auto& row : values)
    for (double v : row)
      if (std::isfinite(v)) vmin = std::min(vmin, v), vmax = std::max(vmax, v);
  if (values.empty() || col_labels.empty() || !std::isfinite(vmin)) {
    sections_.push_back(no_data(title));
    return;
  }
  ColourScale scale{options.lo.value_or(vmin), options.hi.value_or(vmax), options.center,
                    options.diverging};
  if (scale.diverging) {
    scale.lo = std::min(scale.lo, scale.center);
    scale.hi = std::max(scale.hi, scale.center);
  }

  const size_t rows = values.size(), cols = col_labels.size();
  size_t row_chars = options.row_title.size(), col_chars = 1;
  for (const auto& l : row_labels) row_chars = std::max(row_chars, l.size());
  for (const auto& l : col_labels) col_chars = std::max(col_chars, l.size());
  const double left = 14 + kCharWidth * double(row_chars);
  const double top = options.row_title.empty() ? 8 : 24;  // room for the row caption above
  const double cw = std::clamp(std::floor((880 - left) / double(cols)), 4.0, 48.0);
  const double ch = rows <= 32 ? std::clamp(cw, 16.0, 28.0) : std::clamp(cw, 4.0, 12.0);
  const double grid_w = cw * double(cols), grid_h = ch * double(rows);
  // Label every k-th column so that labels never overlap.
  const size_t every = size_t(std::ceil((kCharWidth * double(col_chars) + 6) / cw));
  const bool cell_text = cw >= 34 && ch >= 18;
  const double bar_y = top + grid_h + 44, width = std::max(left + grid_w + 16, 420.0);
  const double height = bar_y + 40;

  std::string svg = fmt::format(
      "<svg class=\"chart heatmap\" data-rows=\"{}\" data-cols=\"{}\" "
      "xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" "
      "viewBox=\"0 0 {:.0f} {:.0f}\" role=\"img\" aria-label=\"{}\">\n",
      rows, cols, width, height, width, height, html_escape(title));
  for (size_t r = 0; r < rows; ++r) {
    const double y = top + ch * double(r);
    svg += fmt::format(
        "<text class=\"tick\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6,
        y + ch / 2 + 4, html_escape(row_labels[r]));
    for (size_t c = 0; c < cols; ++c) {
      const double v = values[r][c], x = left + cw * double(c);
      const bool ok = std::isfinite(v);
      const Rgb fill = ok ? scale.colour(v) : Rgb{200, 200, 200};
      svg += fmt::format(
          "<rect class=\"cell\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" "
          "fill=\"{}\"><title>{} {}, {} {}: {}</title></rect>",
          x, y, cw, ch, hex(fill), html_escape(options.row_title), html_escape(row_labels[r]),
          html_escape(options.col_title), html_escape(col_labels[c]),
          ok ? fmt::format("{:.4g}", v) : std::string("n/a"));
      if (cell_text && ok)
        svg += fmt::format(
            "<text class=\"cell-value\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\" "
            "fill=\"{}\">{:.2f}</text>",
            x + cw / 2, y + ch / 2 + 4, is_dark(fill) ? "#ffffff" : "#222222", v);
      svg += "\n";
    }
  }
  for (size_t c = 0; c < cols; c += every)
    svg += fmt::format(
        "<text class=\"tick\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n",
        left + cw * (double(c) + 0.5), top + grid_h + 15, html_escape(col_labels[c]));
  if (!options.col_title.empty())
    svg += fmt::format(
        "<text class=\"label\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n",
        left + grid_w / 2, top + grid_h + 32, html_escape(options.col_title));
  if (!options.row_title.empty())
    svg += fmt::format("<text class=\"label\" x=\"4\" y=\"14\">{}</text>\n",
                       html_escape(options.row_title));

  // Colour bar: 40 steps of the scale with the range ends (and the centre) labelled.
  const double bar_x = left, bar_w = 240, steps = 40;
  for (int i = 0; i < int(steps); ++i)
    svg += fmt::format(
        "<rect class=\"colour-bar\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.2f}\" height=\"10\" "
        "fill=\"{}\"/>",
        bar_x + bar_w * i / steps, bar_y, bar_w / steps + 0.3,
        hex(scale.at_position((i + 0.5) / steps)));
  svg += fmt::format(
      "\n<text class=\"tick\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"start\">{:.3g}</text>"
      "<text class=\"tick\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{:.3g}</text>\n",
      bar_x, bar_y + 24, scale.lo, bar_x + bar_w, bar_y + 24, scale.hi);
  if (scale.diverging)
    svg += fmt::format(
        "<text class=\"tick\" x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{:.3g}</text>\n",
        bar_x + bar_w / 2, bar_y + 24, scale.center);
  if (!options.value_label.empty())
    svg += fmt::format("<text class=\"label\" x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n",
                       bar_x + bar_w + 12, bar_y + 9, html_escape(options.value_label));
  svg += "</svg>\n";
  sections_.push_back(section(title, svg));
}

std::string HtmlReport::html() const {
  std::string out = fmt::format(R"(<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{0}</title>
<style>
body {{ margin: 0; background: #f4f5f7; color: #1d2329;
       font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; }}
main {{ max-width: 960px; margin: 0 auto; padding: 20px 16px 40px; }}
h1 {{ font-size: 1.45rem; margin: 8px 0 14px; }}
h2 {{ font-size: 1.02rem; margin: 0 0 10px; }}
section {{ background: #fff; border-radius: 8px; padding: 14px 16px; margin: 14px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: .88rem; }}
th, td {{ text-align: left; padding: 3px 14px 3px 0; border-bottom: 1px solid #eceef1; }}
th {{ color: #5b6670; font-weight: 600; }}
p.empty {{ color: #8a949c; font-style: italic; }}
svg {{ display: block; font-size: 12px; }}
svg text {{ fill: #39424a; }}
svg text.cell-value {{ font-size: 10px; }}
svg .label {{ fill: #5b6670; }}
svg .plot {{ fill: #fcfcfd; }}
svg .grid {{ stroke: #e6e8eb; stroke-width: 1; }}
svg .axis {{ stroke: #8a949c; stroke-width: 1; }}
svg .cell {{ stroke: #ffffff; stroke-width: .5; }}
footer {{ color: #8a949c; font-size: .8rem; }}
</style>
</head>
<body>
<main>
<h1>{0}</h1>
)",
                                html_escape(title_));
  for (const auto& s : sections_) out += s;
  out += "<footer>Generated by moekit.</footer>\n</main>\n</body>\n</html>\n";
  return out;
}

void HtmlReport::write(const fs::path& path) const {
  const fs::path parent = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  if (!fs::is_directory(parent))
    fail("{}: folder {} does not exist", path.string(), parent.string());
  const fs::path tmp = parent / ("." + path.filename().string() + ".tmp");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("{}: cannot create temp file {}", path.string(), tmp.string());
    const std::string page = html();
    out.write(page.data(), std::streamsize(page.size()));
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      fail("{}: write failed (disk full?)", path.string());
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    const std::string why = ec.message();
    fs::remove(tmp, ec);
    fail("{}: cannot move the temp file into place: {}", path.string(), why);
  }
}

}  // namespace moekit
