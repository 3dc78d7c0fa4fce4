// `moekit report RUN`: renders a training run's metrics into one self-contained HTML page.
#include <fmt/format.h>

#include <filesystem>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "train/report.h"

namespace moekit::cli {

namespace {

struct ReportArgs {
  std::string run;
  std::string out;  // empty: RUN/report.html
};

}  // namespace

void add_report_commands(CLI::App& app) {
  auto a = std::make_shared<ReportArgs>();
  auto* cmd = app.add_subcommand(
      "report", "Write an HTML report (loss, LR, MaxVio, expert load) of a training run");
  cmd->add_option("RUN", a->run, "run folder (holds metrics.jsonl, optionally config.json)")
      ->required();
  cmd->add_option("--out", a->out, "output HTML file (default: RUN/report.html)");
  cmd->callback([a] {
    const std::filesystem::path out = a->out.empty() ? std::filesystem::path(a->run) / "report.html"
                                                     : std::filesystem::path(a->out);
    const HtmlReport page = build_run_report(a->run);
    page.write(out);
    fmt::print("wrote {} ({} sections)\n", out.string(), page.sections());
  });
}

}  // namespace moekit::cli
