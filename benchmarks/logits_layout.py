#!/usr/bin/env python
"""Why the chunked loss writes its logits vocabulary-major: the same product timed in both layouts.

    python benchmarks/logits_layout.py [--rows 256] [--repeats 5]

Times `hidden @ weight.T` (chunk-major output) against `weight @ hidden.T` (vocabulary-major output) for one
loss chunk of the default model (256 hidden units, the 50,257-token GPT-2 vocabulary), fp32, median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_seconds(product, repeats: int) -> float:
    product()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="rows per loss chunk (loss_chunk_rows)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    vocab, width = 50257, 256
    weight, hidden = torch.randn(vocab, width), torch.randn(args.rows, width)
    chunk_major, vocab_major = torch.empty(args.rows, vocab), torch.empty(vocab, args.rows)
    gflop = 2 * args.rows * width * vocab / 1e9
    for name, product in (("hidden @ weight.T", lambda: torch.mm(hidden, weight.t(), out=chunk_major)),
                          ("weight @ hidden.T", lambda: torch.mm(weight, hidden.t(), out=vocab_major))):
        seconds = median_seconds(product, args.repeats)
        print(f"{name:<18} {seconds * 1e3:7.1f} ms  {gflop / seconds:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
