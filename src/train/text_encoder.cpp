// The trainer's view of a Hugging Face tokenizer.json.
#include "train/text_encoder.h"

#include <memory>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace moekit {

TextEncoder load_text_encoder(const std::filesystem::path& tokenizer_json) {
  if (!std::filesystem::exists(tokenizer_json))
    fail("{}: tokenizer not found (train one with `moekit tokenizer train`)",
         tokenizer_json.string());
  auto tok = std::make_shared<Tokenizer>(Tokenizer::load(tokenizer_json));
  TextEncoder e;
  e.encode = [tok](std::string_view text) { return tok->encode(text, false); };
  e.bos = tok->bos_id();
  e.eos = tok->eos_id();
  if (e.bos < 0 || e.eos < 0)
    fail("{}: the tokenizer needs beginning- and end-of-sentence tokens", tokenizer_json.string());
  e.vocab_size = tok->vocab_size();
  return e;
}

}  // namespace moekit
