#!/usr/bin/env python
"""What each model shape costs: FLOPs per training token, and hours for 3 epochs on the reference 6-core Zen 2.

    python benchmarks/shape_costs.py                      # every configs/*.json, from FLOPs alone
    python benchmarks/shape_costs.py --measure            # also times training steps of each shape on this CPU

Method (stated, so the hours can be checked):
- FLOPs per training token = 6 x (matrix parameters, the tied 50,257-way output projection included) +
  6 x layers x context x width (causal attention scores and values, forward and backward); 108 MFLOP for
  `gpt2-tiny` (the embedding lookup is not a product).
- Hours = tokens x epochs x FLOPs per token / (the Zen 2's fp32 peak x utilisation). The Ryzen 5 3600's peak:
  6 cores x 2 FMA units x 8 fp32 lanes x 2 FLOP x ~3.9 GHz all-core = ~750 GFLOP/s. Utilisation = the share of
  this machine's measured fp32 matmul speed that a TRM training step reaches here (`--measure`; 0.75 for
  gpt2-tiny in `make bench`) x the share of its theoretical peak a large fp32 matmul reaches on Zen 2 (assumed
  0.85), divided by the cost of the rest of a training step (optimizer, data, logging: `--step_overhead`, 1.19 =
  1,525 tokens/s forward+backward here vs 1,278 for whole `run_clm.py` steps in `make bench`). The range shown
  takes that product from -30% to +15%: a different BLAS, memory speed and clocks move it by that much, so read
  the hours as +-30%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ZEN2_PEAK_FLOPS = 6 * 2 * 8 * 2 * 3.9e9
ZEN2_MATMUL_SHARE = 0.85


def flops_per_token(config: dict) -> float:
    width, layers, context = config["n_embd"], config["n_layer"], config["n_positions"]
    inner = config.get("n_inner") or 4 * width
    per_layer = 4 * width * width + 2 * width * inner  # attention q, k, v, output; MLP in and out
    matrix_parameters = layers * per_layer + config["vocab_size"] * width
    return 6 * matrix_parameters + 6 * layers * context * width


def parameters(config: dict) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    return sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(**config)).parameters())


def matmul_flops_per_second(size: int = 1024, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.json")))
    parser.add_argument("--tokens", type=float, default=20e6, help="training tokens per epoch (the recipe's cap: 20M)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--utilisation", type=float, default=0.85, help="forward+backward's share of the matmul speed, when not measured")
    parser.add_argument("--step_overhead", type=float, default=1.19, help="whole step time / forward+backward time")
    parser.add_argument("--measure", action="store_true", help="time 3 training steps (8 x 256 tokens, fp32) of each shape here")
    args = parser.parse_args()
    peak_here = matmul_flops_per_second() if args.measure else None
    rows = []
    for path in args.configs:
        config = json.loads((ROOT / path).read_text())
        flops = flops_per_token(config)
        utilisation, tokens_per_second = args.utilisation, None
        if args.measure:
            from models.gpt2 import build_model
            from trm.precision import seconds_per_step

            seconds = seconds_per_step(build_model(ROOT / path, seed=0), 8, config["n_positions"], bf16=False, steps=3)
            tokens_per_second = 8 * config["n_positions"] / seconds
            utilisation = flops * tokens_per_second / peak_here
        work = args.tokens * args.epochs * flops * args.step_overhead
        hours = [work / (ZEN2_PEAK_FLOPS * ZEN2_MATMUL_SHARE * utilisation * factor) / 3600 for factor in (1.15, 1.0, 0.7)]
        rows.append((Path(path).stem, parameters(config), flops, tokens_per_second, utilisation, hours))
    if peak_here:
        print(f"this CPU: fp32 matmul {peak_here / 1e9:.0f} GFLOP/s (1024 x 1024), training steps 8 x 256 tokens, fp32, forward+backward")
    print(f"| shape | parameters | MFLOP / token | tokens/s here | share of the matmul speed | hours for {args.epochs:g} x {args.tokens / 1e6:g}M tokens on the Zen 2 (range) |")
    print("|---|---|---|---|---|---|")
    for name, count, flops, speed, utilisation, (low, mid, high) in rows:
        speed_text = f"{speed:,.0f}" if speed else "-"
        print(f"| {name} | {count / 1e6:.1f}M | {flops / 1e6:.0f} | {speed_text} | {utilisation:.2f} | {mid:.1f} ({low:.1f}-{high:.1f}) |")


if __name__ == "__main__":
    main()
