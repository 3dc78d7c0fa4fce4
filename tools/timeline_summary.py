#!/usr/bin/env python3
"""Summarises one forward of a CUPTI timeline from `TRACE_TIMELINE=1 tools/device_run.sh trace`.

    python3 tools/timeline_summary.py timeline-deepseek-v2-lite-prefill-bf16.txt [--layer N]

The timeline has one line per kernel or copy, in timeline order: "start_us end_us K|C name".
The last forward starts at the last embedding kernel. Prints the GPU span, the kernel time by
kind, and the idle gaps over 1 us between kinds ("norm -> gemm"), the gaps that a launch-bound
step shows. With --layer N, the events of that MoE layer (from its attention kernel to the
next one) one per line with their gaps, to read a layer's critical path.
"""
import argparse
import collections

KINDS = [('nvjet', 'gemm'), ('flash', 'attn'), ('swiglu', 'swiglu'), ('GatherRows', 'gather'),
         ('CombineRows', 'combine'), ('rmsnorm', 'norm'), ('Rope', 'rope'),
         ('mla_kv_a', 'kv_a split'), ('plan_', 'plan'), ('gate_forward', 'gate'),
         ('Embedding', 'embed'), ('BroadcastKRope', 'k rope'), ('write_small_table', 'table')]


def kind(event):
    name = event[3]
    if event[2] != 'K':  # "kind K N bytes": CUPTI's copy kinds 1 HtoD, 2 DtoH, 8 DtoD
        directions = {'1': 'HtoD', '2': 'DtoH', '8': 'DtoD'}
        parts = name.split()
        return 'copy ' + (directions.get(parts[1], name) if len(parts) > 1 else name)
    for key, k in KINDS:
        if key in name:
            return k
    return 'other: ' + name[:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('timeline')
    ap.add_argument('--layer', type=int, default=None)
    args = ap.parse_args()
    events = []
    with open(args.timeline) as f:
        for line in f:
            p = line.rstrip('\n').split(' ', 3)
            events.append((float(p[0]), float(p[1]), p[2], p[3] if len(p) > 3 else ''))
    events.sort()
    starts = [i for i, e in enumerate(events) if 'EmbeddingRows' in e[3]]
    if not starts:
        raise SystemExit(f'{args.timeline}: no embedding kernel to start a forward at')
    seg = events[starts[-1]:]
    span = max(e[1] for e in seg) - seg[0][0]
    busy = sum(e[1] - e[0] for e in seg if e[2] == 'K')
    print(f'{len(starts)} forwards; the last: span {span:.1f} us, kernels {busy:.1f} us, '
          f'{len(seg)} events')
    total = collections.Counter()
    for e in seg:
        total[kind(e)] += e[1] - e[0]
    for k, v in total.most_common():
        print(f'{v:10.1f}  {k}')
    gaps, counts = collections.Counter(), collections.Counter()
    end, prev = seg[0][1], seg[0]
    for e in seg[1:]:
        if e[0] - end > 1.0:
            key = f'{kind(prev)} -> {kind(e)}'
            gaps[key] += e[0] - end
            counts[key] += 1
        if e[1] > end:
            end, prev = e[1], e
    print(f'idle gaps over 1 us: {sum(gaps.values()):.1f} us')
    for k, v in gaps.most_common(20):
        print(f'{v:10.1f} {counts[k]:5d}  {k}')
    if args.layer is not None:
        attn = [i for i, e in enumerate(seg) if 'flash' in e[3]]
        if args.layer + 1 >= len(attn):
            raise SystemExit(f'no layer {args.layer}: {len(attn)} attention kernels')
        lo, hi = attn[args.layer], attn[args.layer + 1]
        t0, last_end = seg[lo][0], seg[lo - 1][1]
        for e in seg[lo:hi + 1]:
            print(f'{e[0] - t0:9.1f} {e[1] - e[0]:8.1f} gap {e[0] - last_end:6.1f}  {e[2]} {e[3][:100]}')
            last_end = max(last_end, e[1])


if __name__ == '__main__':
    main()
