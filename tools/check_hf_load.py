#!/usr/bin/env python3
"""Checks that a checkpoint moekit wrote loads in Hugging Face transformers and computes the same
logits and loss as `moekit forward` on the same ids. Runs on the device machine.
Usage: check_hf_load.py MODEL_DIR IDS.json MOEKIT_LOGITS.safetensors MOEKIT_LOSS"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    model_dir, ids_file, logits_file, moekit_loss = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor(json.load(open(ids_file))["ids"])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    ours = load_file(logits_file)["logits"]
    diff = (out.logits - ours).abs().max().item()
    print(json.dumps({"model": model_dir, "hf_class": type(model).__name__, "hf_loss": out.loss.item(),
                      "moekit_loss": moekit_loss, "max_abs_logit_diff": diff}))
    ok = diff <= 1e-4 and abs(out.loss.item() - moekit_loss) <= 1e-5 * abs(moekit_loss)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
