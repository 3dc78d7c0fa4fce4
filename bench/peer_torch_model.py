#!/usr/bin/env python3
"""PyTorch peer for bench/run_cpu_model_bench.sh: the same DeepSeekMoE (MLA + fine-grained
routed experts + shared experts) written plainly in PyTorch, timed on the same shapes and thread
count as moekit. Run with Debian's python3-torch (OpenBLAS as libblas.so.3).
Usage: peer_torch_model.py CONFIG.json BATCH SEQ ITERS THREADS"""
import json
import math
import sys
import statistics
import time
import resource

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class MLP(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate = nn.Linear(h, i, bias=False)
        self.up = nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rope(x, cos, sin):  # x [..., S, d] interleaved pairs
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class MLA(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.nh = c["hidden_size"], c["num_attention_heads"]
        self.dn, self.dr, self.dv, self.r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        self.q = nn.Linear(h, self.nh * (self.dn + self.dr), bias=False)
        self.kv_a = nn.Linear(h, self.r + self.dr, bias=False)
        self.kv_norm = RMSNorm(self.r, c["rms_norm_eps"])
        self.kv_b = nn.Linear(self.r, self.nh * (self.dn + self.dv), bias=False)
        self.o = nn.Linear(self.nh * self.dv, h, bias=False)
        self.scale = (self.dn + self.dr) ** -0.5

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.nh, self.dn + self.dr).transpose(1, 2)
        q_nope, q_pe = q.split([self.dn, self.dr], -1)
        kv = self.kv_a(x)
        c_kv, k_pe = kv.split([self.r, self.dr], -1)
        kvb = self.kv_b(self.kv_norm(c_kv)).view(B, S, self.nh, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kvb.split([self.dn, self.dv], -1)
        q_pe = rope(q_pe, cos, sin)
        k_pe = rope(k_pe.unsqueeze(1), cos, sin).expand(B, self.nh, S, self.dr)
        qf = torch.cat([q_nope, q_pe], -1)
        kf = torch.cat([k_nope, k_pe], -1)
        # torch 1.13 (Debian 12) has no scaled_dot_product_attention: the plain masked softmax.
        scores = (qf @ kf.transpose(-1, -2)) * self.scale
        mask = torch.ones(S, S, dtype=torch.bool).triu(1)
        o = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self.o(o.transpose(1, 2).reshape(B, S, self.nh * self.dv))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        self.k = c["num_experts_per_tok"]
        self.gate = nn.Linear(h, c["n_routed_experts"], bias=False)
        self.experts = nn.ModuleList(MLP(h, c["moe_intermediate_size"]) for _ in range(c["n_routed_experts"]))
        self.shared = MLP(h, c["moe_intermediate_size"] * c["n_shared_experts"])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = torch.topk(self.gate(x).softmax(-1), self.k, dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                y.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return (y + self.shared(x)).view(shape)


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        self.embed = nn.Embedding(c["vocab_size"], h)
        self.layers = nn.ModuleList()
        for l in range(c["num_hidden_layers"]):
            ffn = MoE(c) if l >= c["first_k_dense_replace"] else MLP(h, c["intermediate_size"])
            self.layers.append(nn.ModuleList([RMSNorm(h, c["rms_norm_eps"]), MLA(c), RMSNorm(h, c["rms_norm_eps"]), ffn]))
        self.norm = RMSNorm(h, c["rms_norm_eps"])
        self.head = nn.Linear(h, c["vocab_size"], bias=False)
        dr = c["qk_rope_head_dim"]
        inv = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(0, dr, 2).float() / dr))
        self.inv = inv

    def forward(self, ids):
        S = ids.shape[1]
        ang = torch.arange(S).float()[:, None] * self.inv[None]
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(ids)
        for n1, attn, n2, ffn in self.layers:
            x = x + attn(n1(x), cos, sin)
            x = x + ffn(n2(x))
        return self.head(self.norm(x))


def main():
    cfg_path, B, S, iters, threads = sys.argv[1], *map(int, sys.argv[2:6])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = json.load(open(cfg_path))
    # The peer's GEMM rate (must be OpenBLAS-class, or the comparison is unfair).
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    gflops = 2 * 1024 ** 3 * 10 / (time.perf_counter() - t) / 1e9
    model = Model(c)
    ids = torch.randint(0, c["vocab_size"], (B, S))

    def median_seconds(fn):
        # Two untimed runs, then the median of `iters` (moekit_model_bench's method too).
        fn()
        fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.no_grad():
        fwd = median_seconds(lambda: model(ids))

    def step():
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, c["vocab_size"]), ids[:, 1:].reshape(-1))
        model.zero_grad(set_to_none=False)
        loss.backward()

    train = median_seconds(step)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": f"pytorch {torch.__version__}", "forward_tok_s": round(B * S / fwd, 1),
                      "train_tok_s": round(B * S / train, 1), "peak_rss_mib": round(rss, 1),
                      "threads": torch.get_num_threads(), "gemm_gflops": round(gflops, 1)}))


if __name__ == "__main__":
    main()
