// Hugging Face checkpoint directories <-> DeepSeekModel: config.json + model.safetensors (or
// shards). Reads per-expert tensor names (DeepSeek's layout, which transformers 5 also saves) and
// transformers 5's fused expert tensors (mlp.experts.gate_up_proj [E, 2I, H],
// mlp.experts.down_proj [E, H, I]); writes per-expert names so both readers load the result.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/atomic_file.h"
#include "model/deepseek.h"
#include "model/safetensors.h"

namespace moekit {

// How `moekit init` fills a tensor (transformers' _init_weights): N(0, initializer_range) for
// weights, ones for RMSNorm weights, zeros for buffers (the balance bias).
enum class TensorInit { Normal, Ones, Zeros };

struct CheckpointTensor {
  std::string name;
  Shape shape;
  TensorInit init = TensorInit::Normal;
};

// Whether the checkpoint format carries the routers' e_score_correction_bias (V3's noaux_tc);
// V2 has none, and load_weights starts it at zero.
bool format_has_balance_bias(const ModelConfig& c);

// Every tensor a checkpoint of `c` holds, in model order, without allocating weights: the names
// and shapes of DeepSeekModel's parameter table (the one load_weights checks against), minus the
// balance bias where the format has none.
std::vector<CheckpointTensor> checkpoint_layout(const ModelConfig& c);

// Loads config and weights; every missing, extra, mis-shaped or unsupported tensor is an Error
// naming the file and the tensor.
// `matrix_dtype` BF16 keeps the frozen GEMM weights, embedding and LM head in bf16 on the device
// (DeepSeekModel).
std::unique_ptr<DeepSeekModel> load_model(const std::filesystem::path& dir,
                                          Device device = Device::CPU,
                                          DType matrix_dtype = DType::F32);

// Copies checkpoint tensors into the model's parameters (the checks of load_model).
void load_weights(DeepSeekModel& model, const std::map<std::string, SafetensorsEntry>& tensors,
                  const std::string& where);

// Writes DIR/config.json and DIR/model.safetensors (atomically each), weights in `dtype`.
void save_model(const DeepSeekModel& model, const std::filesystem::path& dir,
                DType dtype = DType::F32);

}  // namespace moekit
