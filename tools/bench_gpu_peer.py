#!/usr/bin/env python3
"""The transformers peer of moekit's GPU benchmark (issue 8), run on the device machine.

Same shapes as moekit's side: DeepSeek-V2-Lite widths (configs/deepseek-v2-lite.json), bf16,
random init, batch B x S tokens. Measures, with CUDA events, warm-up first, median of N:
  prefill      forward without cache, no grad (4 layers, and the full 27 layers with --full)
  train-all    forward + backward + AdamW (fused) with every parameter trainable
  train-esft   transformers' best ESFT-like setting: only expert weights require grad (experts
               are fused tensors in transformers 5, so single experts cannot be frozen; the
               official ESFT scripts zero the other experts' gradients but pay their memory)
  decode       batch-1 greedy generation of 256 new tokens after a 32-token prompt with the
               default (dynamic) KV cache: tokens/s = 256 / time of the generate call (--decode
               for the --layers model; always with --full). --decode-static adds a try with
               cache_implementation="static" (reported separately; an error is reported, not
               raised: static cache and torch.compile are not known to work for deepseek_v2 here)
Prints one JSON line per measurement and the bf16 GEMM TFLOP/s of the card (fairness check).

    python3 tools/bench_gpu_peer.py --config configs/deepseek-v2-lite.json [--layers 4] [--full]
        [--decode] [--decode-static] [--no-train]
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


def bench_decode(model, config, tag, try_static, prompt_len=32, new_tokens=256):
    model.eval()
    torch.manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device="cuda")
    mask = torch.ones_like(prompt)

    def gen(n, **kw):
        # min_new_tokens: random weights must not stop early at an EOS token.
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize()
        return out.shape[1] - prompt_len

    variants = [("decode", {})]
    if try_static:
        variants.append(("decode-static", {"cache_implementation": "static"}))
    for name, kw in variants:
        try:
            gen(16, **kw)  # warm-up: allocations, kernels
            t0 = time.perf_counter()
            n = gen(new_tokens, **kw)
            t = time.perf_counter() - t0
            report(f"{name}-{tag}", tokens_per_s=n / t, new_tokens=n, prompt=prompt_len, seconds=t)
        except Exception as e:  # report, keep the other measurements
            report(f"{name}-{tag}", error=f"{type(e).__name__}: {e}"[:300])
        torch.cuda.empty_cache()


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
        bench_decode(model, config, tag, args.decode_static)
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
    ap.add_argument("--decode", action="store_true", help="decode on the --layers model too")
    ap.add_argument("--decode-static", action="store_true", help="also try a static KV cache")
    ap.add_argument("--no-train", action="store_true", help="skip the training measurements")
    args = ap.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "bf16_gemm_tflops": gemm_tflops()}), flush=True)
    decode_layers = args.decode
    args.train, args.decode = not args.no_train, decode_layers
    if args.layers > 0:  # --layers 0 --full: the full model only
        bench_model(args, args.layers, f"{args.layers}L")
    if args.full:
        args.train, args.decode = not args.no_train, True
        bench_model(args, 0, "full")


if __name__ == "__main__":
    main()
