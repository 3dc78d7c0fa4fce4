// Parity with Hugging Face transformers 5 on the committed fixtures (tools/make_parity_fixtures.py
// wrote them on the device): logits, loss and parameter gradients of four DeepSeek variants.
#include <gtest/gtest.h>

#include <cmath>

#include "model/checkpoint.h"
#include "model/token_batch.h"

namespace moekit {
namespace {

const std::string kFixtures = std::string(MOEKIT_SOURCE_DIR) + "/tests/fixtures/parity/";

double max_abs_diff(const Tensor& a, const Tensor& b, double* ref_max = nullptr) {
  double d = 0.0, m = 0.0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    d = std::max(d, double(std::abs(a.f32()[i] - b.f32()[i])));
    m = std::max(m, double(std::abs(b.f32()[i])));
  }
  if (ref_max) *ref_max = m;
  return d;
}

class Parity : public ::testing::TestWithParam<std::string> {};

TEST_P(Parity, LogitsLossAndGradientsMatchTransformers) {
  const std::string dir = kFixtures + GetParam();
  auto model = load_model(dir);
  TokenBatch batch = read_ids_json(dir + "/ids.json", model->config().vocab_size);
  auto ref = SafetensorsFile::open(dir + "/reference.safetensors");
  const auto& rt = ref.tensors();

  Tensor logits = model->forward(batch.ids, batch.batch, batch.seq);
  Tensor ref_logits = rt.at("logits").tensor.to_f32();
  ASSERT_EQ(ref_logits.numel(), logits.numel());
  EXPECT_LE(max_abs_diff(logits, ref_logits), 1e-4) << "logits";

  Backend& be = backend(Device::CPU);
  Tensor targets = shifted_targets(batch.ids, batch.batch, batch.seq);
  Tensor dlogits = Tensor::empty(logits.shape());
  float loss = cross_entropy(be, logits, targets, &dlogits);
  float ref_loss = rt.at("loss").tensor.to_f32().f32()[0];
  EXPECT_LE(std::abs(loss - ref_loss) / std::abs(ref_loss), 1e-5) << loss << " vs " << ref_loss;

  model->params().allocate_grads();
  model->params().zero_grads();
  model->backward(dlogits);
  int checked = 0;
  for (const auto& [name, entry] : rt) {
    if (!name.starts_with("grad.")) continue;
    const Param& p = model->params().at(name.substr(5));
    double ref_max = 0.0;
    double diff = max_abs_diff(p.grad, entry.tensor.to_f32(), &ref_max);
    EXPECT_LE(diff / std::max(ref_max, 1e-12), 1e-3) << name << " max diff " << diff;
    ++checked;
  }
  EXPECT_GT(checked, 20);
}

// Routing must matter in these fixtures: with the gate's choice reversed (the least likely
// experts), the logits must move far beyond the parity tolerance.
TEST_P(Parity, WrongRoutingShowsInLogits) {
  const std::string dir = kFixtures + GetParam();
  auto model = load_model(dir);
  TokenBatch batch = read_ids_json(dir + "/ids.json", model->config().vocab_size);
  Tensor good = model->forward(batch.ids, batch.batch, batch.seq);
  for (auto& layer : model->layers())
    if (layer.moe) backend(Device::CPU).scale(layer.moe->gate.weight->value, -1.0f);
  Tensor bad = model->forward(batch.ids, batch.batch, batch.seq);
  EXPECT_GT(max_abs_diff(good, bad), 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity,
                         ::testing::Values("v2_lite", "v2_group", "v3_yarn", "dense2_bf16"));

}  // namespace
}  // namespace moekit
