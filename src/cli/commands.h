// Each group of `moekit` subcommands lives in its own cli/cmd_*.cpp and registers itself here.
// A command's callback throws moekit::Error for bad input; main() prints it on one line, exit 2.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/tensor.h"

namespace moekit::cli {

// `--device cpu|cuda` of the commands that run a model (train, finetune, forward, generate).
inline void add_device_option(CLI::App* cmd, std::string& device) {
  cmd->add_option("--device", device,
                  "cpu | cuda: where weights, activations and training state live")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}
inline Device parse_device(const std::string& s) {
  return s == "cuda" ? Device::CUDA : Device::CPU;
}

void add_model_commands(CLI::App& app);  // info, forward (cmd_model.cpp)
void add_init_commands(CLI::App& app);   // init: random checkpoint of any size (cmd_init.cpp)
void add_plan_commands(CLI::App& app);    // plan (cmd_plan.cpp)
void add_report_commands(CLI::App& app);  // report (cmd_report.cpp)
void add_train_commands(CLI::App& app);  // train (cmd_train.cpp)
void add_tokenizer_commands(CLI::App& app);  // tokenize, detokenize, tokenizer train
void add_generate_commands(CLI::App& app);   // generate (cmd_generate.cpp)
void add_demo_commands(CLI::App& app);       // demo: the main job (cmd_demo.cpp)
void add_esft_commands(CLI::App& app);       // esft scores / select (cmd_esft.cpp)
void add_esft_experiment_commands(CLI::App* esft);  // esft tasks / eval / experiment

}  // namespace moekit::cli
