// Route logging over ESFT-formatted samples.
#include "esft/route_logger.h"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "esft/chat_rows.h"
#include "esft/routing_log.h"
#include "tokenizer/templates.h"

namespace moekit {

namespace fs = std::filesystem;
using json = nlohmann::json;

RouteLogStats log_routing(DeepSeekModel& model, const Tokenizer& tok, const fs::path& data,
                          int64_t max_tokens, const fs::path& out_dir) {
  std::map<int, std::vector<SequenceRouting>> logs;
  RouteLogStats st;
  const int64_t max_seq = model.config().max_position_embeddings;
  for (const ChatRow& row : read_chat_rows(data, true)) {
    if (st.tokens >= max_tokens) break;
    const int64_t lineno = row.line;
    std::vector<int32_t> ids = esft_sample(tok, row.user, row.assistant).ids;
    const int64_t keep = std::min<int64_t>({int64_t(ids.size()), max_tokens - st.tokens, max_seq});
    ids.resize(size_t(keep));
    Tensor t = Tensor::empty({keep}, DType::I32);
    std::copy(ids.begin(), ids.end(), t.i32());
    for (int32_t id : ids)
      if (id >= model.config().vocab_size)
        fail("{}:{}: the tokenizer produced id {} beyond the model's vocabulary ({})",
             data.string(), lineno, id, model.config().vocab_size);
    model.forward(t, 1, keep, /*backward_follows=*/false);
    for (size_t l = 0; l < model.layers().size(); ++l) {
      auto& layer = model.layers()[l];
      if (!layer.moe) continue;
      const Routing& r = layer.moe->gate.saved.routing;
      Tensor idx = r.topk_idx, w = r.topk_w;
      SequenceRouting s;
      s.expert_ids.assign(idx.i32(), idx.i32() + idx.numel());
      s.weights.assign(w.f32(), w.f32() + w.numel());
      logs[int(l)].push_back(std::move(s));
    }
    st.tokens += keep;
    ++st.sequences;
  }
  if (st.sequences == 0) fail("{}: no samples", data.string());
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) fail("{}: cannot create ({})", out_dir.string(), ec.message());
  for (const auto& [layer, seqs] : logs)
    write_routing_log(out_dir / ("expert_weights_" + std::to_string(layer) + ".txt"), seqs);
  st.layers = int64_t(logs.size());
  return st;
}

}  // namespace moekit
