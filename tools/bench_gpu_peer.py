#!/usr/bin/env python3
"""The transformers peer of moekit's GPU benchmark (issue 8), run on the device machine.

Same shapes as moekit's side: DeepSeek-V2-Lite widths (configs/deepseek-v2-lite.json), bf16,
random init, batch B x S tokens. Measures, with CUDA events, warm-up first, median of N:
  prefill      forward without cache, no grad (4 layers, and the full 27 layers with --full)
  train-all    forward + backward + AdamW (fused) with every parameter trainable
  train-esft   transformers' best ESFT-like setting: only expert weights require grad (experts
               are fused tensors in transformers 5, so single experts cannot be frozen; the
               official ESFT scripts zero the other experts' gradients but pay their memory)
  decode       batch-1 greedy generation of 256 new tokens with the KV cache (--full)
Prints one JSON line per measurement and the bf16 GEMM TFLOP/s of the card (fairness check).

    python3 tools/bench_gpu_peer.py --config configs/deepseek-v2-lite.json [--layers 4] [--full]
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM


def timed(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def gemm_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 10)
    return 2 * 8192**3 / t / 1e12


def build(cfg_file, layers):
    cfg = json.load(open(cfg_file))
    cfg.pop("auto_map", None)
    cfg["num_hidden_layers"] = layers or cfg["num_hidden_layers"]
    config = DeepseekV2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV2ForCausalLM(config).to(torch.bfloat16)
    return model, config


def report(name, **kw):
    print(json.dumps({"engine": f"transformers {transformers.__version__}", "bench": name, **kw}),
          flush=True)


def bench_model(args, layers, tag):
    model, config = build(args.config, layers)
    B, S = args.batch, args.seq
    ids = torch.randint(0, config.vocab_size, (B, S), device="cuda")
    model.eval()
    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: model(input_ids=ids, use_cache=False), args.iters)
    report(f"prefill-{tag}", tokens_per_s=B * S / t, seconds=t,
           peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    if args.train:
        model.train()
        for mode in ("all", "esft"):
            for n, p in model.named_parameters():
                p.requires_grad_(mode == "all" or ".mlp.experts." in n)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

            def step():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            try:
                t = timed(step, args.iters)
                report(f"train-{mode}-{tag}", tokens_per_s=B * S / t, seconds=t,
                       trainable=sum(p.numel() for p in params),
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except torch.OutOfMemoryError:
                report(f"train-{mode}-{tag}", error="out of memory")
            del opt
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if args.decode:
        model.eval()
        prompt = torch.randint(0, config.vocab_size, (1, 16), device="cuda")
        gen = lambda: model.generate(prompt, max_new_tokens=256, min_new_tokens=256,
                                     do_sample=False)
        gen()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen()
        torch.cuda.synchronize()
        report(f"decode-{tag}", tokens_per_s=256 / (time.perf_counter() - t0))
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/deepseek-v2-lite.json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="also the full model: prefill, decode")
    args = ap.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "bf16_gemm_tflops": gemm_tflops()}), flush=True)
    args.train, args.decode = True, False
    bench_model(args, args.layers, f"{args.layers}L")
    if args.full:
        args.train, args.decode = True, True
        bench_model(args, 0, "full")


if __name__ == "__main__":
    main()
