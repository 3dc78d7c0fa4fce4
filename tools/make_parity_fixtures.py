#!/usr/bin/env python3
"""Writes moekit's parity fixtures: small random-initialised DeepSeek checkpoints saved by
Hugging Face transformers, with reference logits, loss and parameter gradients (PyTorch
autograd, fp32). Runs on the device machine (transformers 5 is there):

    python3 tools/make_parity_fixtures.py --out DIR

Each case DIR/<case>/ holds config.json + model.safetensors (as transformers saves them),
ids.json ({"ids": [[...], ...]}, the `moekit forward` input) and reference.safetensors:
`logits` [B, S, V], `loss` [1], and `grad.<name>` for selected parameters under moekit's
per-expert checkpoint names (fused transformers-5 expert gradients are split per expert).
"""
import argparse
import json
import math
import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
              num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-6,
              bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
              attention_bias=False)

CASES = {
    # V2-Lite-like: softmax greedy, no q-LoRA, norm_topk false, 2 shared experts.
    "v2_lite": ("v2", dict(num_hidden_layers=3, n_routed_experts=8, n_shared_experts=2,
                           num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy",
                           n_group=1, topk_group=1, norm_topk_prob=False,
                           routed_scaling_factor=1.0, q_lora_rank=None), "float32"),
    # V2-like: group_limited_greedy, q-LoRA, scaled weights.
    "v2_group": ("v2", dict(num_hidden_layers=2, n_routed_experts=16, n_shared_experts=2,
                            num_experts_per_tok=3, first_k_dense_replace=1,
                            topk_method="group_limited_greedy", n_group=4, topk_group=2,
                            norm_topk_prob=False, routed_scaling_factor=2.0, q_lora_rank=24),
                 "float32"),
    # V3-like: sigmoid + bias + groups, norm_topk true, scaling 2.5, YaRN.
    "v3_yarn": ("v3", dict(num_hidden_layers=2, n_routed_experts=16, n_shared_experts=1,
                           num_experts_per_tok=4, first_k_dense_replace=1, topk_method="noaux_tc",
                           n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                           q_lora_rank=24, max_position_embeddings=256,
                           rope_yarn=dict(factor=4.0, original_max_position_embeddings=64,
                                          beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                          mscale_all_dim=0.8)), "float32"),
    # first_k_dense_replace > 1, weights stored in bf16 (reference uses the bf16 values).
    "dense2_bf16": ("v2", dict(num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1,
                               num_experts_per_tok=2, first_k_dense_replace=2,
                               topk_method="greedy", n_group=1, topk_group=1,
                               norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None),
                    "bfloat16"),
}


def make_config(kind, extra):
    kw = dict(COMMON)
    kw.update(extra)
    yarn = kw.pop("rope_yarn", None)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}
    cls = DeepseekV2Config if kind == "v2" else DeepseekV3Config
    cfg = cls(**kw, rope_parameters=rope)
    if kind == "v2":
        cfg.scoring_func = "softmax"
    cfg._attn_implementation = "eager"
    return cfg


def randomise(model, gen):
    """Spread large enough that routing differs between tokens and wrong routing shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("gate.weight") and "proj" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.2 / math.sqrt(fan_in)))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.02 * (2 * torch.rand(b.shape, generator=gen) - 1))


def per_expert_grads(name, grad, n_inter):
    """Split transformers-5 fused expert tensors into moekit's per-expert names."""
    out = {}
    prefix = name.rsplit(".", 1)[0]  # ...mlp.experts
    if name.endswith("experts.gate_up_proj"):
        for e in range(grad.shape[0]):
            out[f"{prefix}.{e}.gate_proj.weight"] = grad[e, :n_inter]
            out[f"{prefix}.{e}.up_proj.weight"] = grad[e, n_inter:]
    elif name.endswith("experts.down_proj"):
        for e in range(grad.shape[0]):
            out[f"{prefix}.{e}.down_proj.weight"] = grad[e]
    else:
        out[name] = grad
    return out


def run_case(name, kind, extra, dtype, out_dir):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234 + len(name))
    cfg = make_config(kind, extra)
    cls = DeepseekV2ForCausalLM if kind == "v2" else DeepseekV3ForCausalLM
    model = cls(cfg).float()
    randomise(model, gen)
    if dtype == "bfloat16":  # the reference computes with exactly the stored bf16 values
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    model.eval()
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)

    ids = torch.randint(2, cfg.vocab_size, (2, 12), generator=gen)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    ref = {"logits": out.logits.detach().contiguous(), "loss": out.loss.detach().reshape(1)}
    for pname, p in model.named_parameters():
        if p.grad is None:
            continue
        for n, g in per_expert_grads(pname, p.grad, cfg.moe_intermediate_size).items():
            # Keep the file small: every non-expert grad, and experts 0..2 and the last.
            if ".experts." in n:
                e = int(n.split(".experts.")[1].split(".")[0])
                if e > 2 and e != cfg.n_routed_experts - 1:
                    continue
            ref["grad." + n] = g.detach().contiguous().float()
    save_file(ref, os.path.join(d, "reference.safetensors"))
    # Save last: Module.to(bfloat16) also rounds buffers such as rotary inv_freq, which must not
    # leak into the fp32 reference computed above.
    model.zero_grad(set_to_none=True)
    (model if dtype == "float32" else model.to(torch.bfloat16)).save_pretrained(d, safe_serialization=True)
    with open(os.path.join(d, "ids.json"), "w") as f:
        json.dump({"ids": ids.tolist()}, f)
    names = sorted(load_file(os.path.join(d, "model.safetensors")).keys())
    # Routing must differ between tokens: count distinct expert sets in the last MoE layer.
    print(f"{name}: loss {out.loss.item():.6f}, {len(names)} tensors, first names {names[:3]}, rope {getattr(cfg, 'rope_parameters', None)}")
    return {"loss": out.loss.item(), "tensor_names": names}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    manifest = {"torch": torch.__version__, "transformers": transformers.__version__, "cases": {}}
    for name, (kind, extra, dtype) in CASES.items():
        manifest["cases"][name] = run_case(name, kind, extra, dtype, args.out)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
