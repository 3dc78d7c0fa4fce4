// The `moekit` binary: parses the command line, runs one subcommand, turns errors into one line
// on stderr and exit status 2.
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "core/error.h"
#include "core/thread_pool.h"

int main(int argc, char** argv) {
  CLI::App app{"moekit: train, specialize and serve DeepSeek-style Mixture-of-Experts models"};
  app.require_subcommand(1);
  app.fallthrough();  // global options (--threads) may follow the subcommand
  app.set_version_flag("--version", "moekit 0.1.0");
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads for every command (0 = all cores)");
  app.parse_complete_callback([&threads] { moekit::set_num_threads(threads); });
  moekit::cli::add_model_commands(app);
  moekit::cli::add_init_commands(app);
  moekit::cli::add_plan_commands(app);
  moekit::cli::add_report_commands(app);
  moekit::cli::add_train_commands(app);
  moekit::cli::add_tokenizer_commands(app);
  moekit::cli::add_generate_commands(app);
  moekit::cli::add_demo_commands(app);
  moekit::cli::add_esft_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // One line, like every other error (CLI11 would add a second "Run with --help" line).
    std::fprintf(stderr, "moekit: error: %s (see --help)\n", e.what());
    return 2;
  } catch (const moekit::Error& e) {
    std::fprintf(stderr, "moekit: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moekit: error: %s\n", e.what());
    return 2;
  }
  return 0;
}
