// Each group of `moekit` subcommands lives in its own cli/cmd_*.cpp and registers itself here.
// A command's callback throws moekit::Error for bad input; main() prints it on one line, exit 2.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/error.h"
#include "core/tensor.h"
#include "ops/ops.h"

namespace moekit::cli {

// `--device cpu|cuda` and `--dtype fp32|bf16` of the commands that run a model (train, finetune,
// forward, generate).
struct DeviceArgs {
  std::string device = "cpu", dtype = "fp32";
};
inline void add_device_options(CLI::App* cmd, DeviceArgs& a) {
  cmd->add_option("--device", a.device,
                  "cpu | cuda: where weights, activations and training state live")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--dtype", a.dtype,
                  "fp32 | bf16 (cuda): bf16 keeps frozen weights in bf16 (trainable ones get fp32 "
                  "masters) and runs every GEMM and the attention on the bf16 tensor cores with "
                  "fp32 accumulation")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
}
// The device, after checking --dtype against it; bf16 sets that backend's precision.
inline Device parse_device(const DeviceArgs& a) {
  const Device d = a.device == "cuda" ? Device::CUDA : Device::CPU;
  if (a.dtype == "bf16") {
    if (d == Device::CPU)
      fail("--dtype bf16 needs --device cuda (the CPU backend computes in fp32)");
    backend(d).set_precision(Precision::Bf16);
  }
  return d;
}
inline DType weight_dtype(const DeviceArgs& a) {
  return a.dtype == "bf16" ? DType::BF16 : DType::F32;
}

void add_model_commands(CLI::App& app);      // info, forward (cmd_model.cpp)
void add_init_commands(CLI::App& app);       // init: random checkpoint of any size (cmd_init.cpp)
void add_plan_commands(CLI::App& app);       // plan (cmd_plan.cpp)
void add_report_commands(CLI::App& app);     // report (cmd_report.cpp)
void add_train_commands(CLI::App& app);      // train (cmd_train.cpp)
void add_tokenizer_commands(CLI::App& app);  // tokenize, detokenize, tokenizer train
void add_generate_commands(CLI::App& app);   // generate (cmd_generate.cpp)
void add_demo_commands(CLI::App& app);       // demo: the main job (cmd_demo.cpp)
void add_esft_commands(CLI::App& app);       // esft scores / select (cmd_esft.cpp)
void add_esft_experiment_commands(CLI::App* esft);  // esft tasks / eval / experiment

}  // namespace moekit::cli
