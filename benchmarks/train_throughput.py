#!/usr/bin/env python
"""Training throughput on this machine: TRM's Trainer set-up against a default Trainer recipe and a plain loop.

    python benchmarks/train_throughput.py [--phase 1|2|both] [--reps 3] [--steps 4] [--batch_size 16]

For each phase, three set-ups train the same model from the same weights, interleaved repetition by
repetition so that machine noise hits all of them alike, each run in a fresh process (so that neither
memory nor process settings carry over from one run to the next):
  (a) trm      - `TrmTrainer` configured as run_clm.py / run_sft.py configure it (chunked fused loss,
                 which in phase 2 also skips the output projection on prompt tokens; fused GELU kernel;
                 fused AdamW; freed memory kept for reuse; length-grouped batches in phase 2), in fp32;
  (a') trm-bf16 - the same in bf16 autocast with fp32 weights (what `precision: auto` picks where it is
                 faster), only on CPUs that report bf16 instructions;
  (b) default  - `Trainer` with default `TrainingArguments` on the CPU and the stock GPT2LMHeadModel loss,
                 as in Hugging Face's run_clm.py example (batch size set to the same value);
  (c) eager    - a plain PyTorch loop: stock loss, backward, torch.optim.AdamW.
Before timing, (a) and (b) compute the loss of one batch from the same weights; they must agree within
1e-4 (relative). Reported: median over repetitions of tokens/s (all timed steps of a repetition; phase 2 counts
non-padding tokens), achieved GFLOP/s against the fp32 (and bf16) matmul peaks measured in the same run, peak RSS
during each set-up, and ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import Dataset  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from data.tokenizer import load_tokenizer  # noqa: E402
from models.gpt2 import build_model  # noqa: E402
from trm.precision import cpu_bf16_flags  # noqa: E402
from trm.training import TrmTrainer, collate_blocks, keep_freed_memory_for_reuse  # noqa: E402


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def training_flops_per_token(model, seq_len: int) -> float:
    """3 x forward FLOPs: every linear layer (output projection included) plus causal attention scores."""
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Conv1D") + config.vocab_size * config.n_embd
    attention = 2 * config.n_layer * seq_len * config.n_embd  # QK^T and AV over on average seq_len/2 keys
    return 3 * (2 * linear + attention)


class PeakRss:
    """Samples this process's resident memory in a thread; `peak_mb` is the maximum seen."""

    def __enter__(self):
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class StepTimer(TrainerCallback):
    def __init__(self):
        self.durations, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)


class CountingCollator:
    """Wraps a collator and records the non-padding tokens of every batch it builds, in order."""

    def __init__(self, phase: int, tokenizer):
        self.inner = collate_blocks if phase == 1 else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        self.tokens: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch


def throughput(tokens: list[int], durations: list[float]) -> float:
    """Tokens per second over the timed steps (the first step is warm-up)."""
    return sum(tokens[1:len(durations)]) / sum(durations[1:])


def phase1_dataset(n: int, seq_len: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(0, 50257, (n, seq_len), generator=generator).tolist()})


def phase2_dataset(n: int, seq_len: int) -> Dataset:
    """Masked SFT-like examples: lengths 48..seq_len, the first 40-70% of each is prompt (label -100)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(48, seq_len + 1, (1,), generator=generator))
        ids = torch.randint(0, 50256, (length,), generator=generator).tolist()
        prompt = int(length * (0.4 + 0.3 * torch.rand(1, generator=generator)))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "length": length})
    return Dataset.from_list(rows)


def trainer_run(kind: str, phase: int, dataset: Dataset, args: argparse.Namespace, tokenizer) -> tuple[float, float]:
    """Train `args.steps + 1` steps; return (tokens/s over the timed steps, peak RSS in MB)."""
    model = build_model(args.config_name, seed=0)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        common = dict(output_dir=output_dir, use_cpu=True, per_device_train_batch_size=args.batch_size,
                      max_steps=args.steps + 1, report_to=[], disable_tqdm=True, save_strategy="no", logging_strategy="no")
        if kind.startswith("trm"):
            keep_freed_memory_for_reuse()
            training_args = TrainingArguments(
                **common, optim="adamw_torch_fused", bf16=kind == "trm-bf16", learning_rate=1e-3, weight_decay=0.1, adam_beta2=0.95,
                lr_scheduler_type="cosine", include_num_input_tokens_seen=True, remove_unused_columns=False,
                **({"train_sampling_strategy": "group_by_length"} if phase == 2 else {}),
            )
            trainer_class, extra = TrmTrainer, {"loss_chunk_rows": args.loss_chunk_rows}
        else:
            training_args = TrainingArguments(**common)
            trainer_class, extra = Trainer, {}
        collator = CountingCollator(phase, tokenizer)
        train_data = dataset if (phase == 2 and kind.startswith("trm")) else dataset.remove_columns([c for c in dataset.column_names if c == "length"])
        trainer = trainer_class(model=model, args=training_args, train_dataset=train_data, data_collator=collator,
                                callbacks=[timer], **extra)
        with PeakRss() as rss:
            trainer.train()
    return throughput(collator.tokens, timer.durations), rss.peak_mb


def eager_run(phase: int, dataset: Dataset, args: argparse.Namespace, tokenizer) -> tuple[float, float]:
    model = build_model(args.config_name, seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    collator = CountingCollator(phase, tokenizer)
    rows = dataset.remove_columns([c for c in dataset.column_names if c == "length"])
    durations = []
    with PeakRss() as rss:
        for step in range(args.steps + 1):
            batch = collator([rows[i] for i in range(step * args.batch_size, (step + 1) * args.batch_size)])
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            durations.append(time.perf_counter() - start)
    return throughput(collator.tokens, durations), rss.peak_mb


def one_run(kind: str, phase: int, args: argparse.Namespace) -> tuple[float, float]:
    """One set-up, from scratch: this runs in its own process."""
    tokenizer = load_tokenizer()
    dataset = benchmark_dataset(phase, args)
    if kind == "eager":
        return eager_run(phase, dataset, args, tokenizer)
    return trainer_run(kind, phase, dataset, args, tokenizer)


def in_fresh_process(kind: str, phase: int, args: argparse.Namespace) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(one_run, kind, phase, args).result()


def benchmark_dataset(phase: int, args: argparse.Namespace) -> Dataset:
    n = args.batch_size * (args.steps + 1)
    return phase1_dataset(n, args.seq_len) if phase == 1 else phase2_dataset(n, args.seq_len)


def check_losses_match(phase: int, dataset: Dataset, args: argparse.Namespace, tokenizer) -> tuple[float, float]:
    collator = collate_blocks if phase == 1 else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    rows = dataset.remove_columns([c for c in dataset.column_names if c == "length"])
    batch = collator([rows[i] for i in range(args.batch_size)])
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[])
        trm_model, stock_model = build_model(args.config_name, seed=0), build_model(args.config_name, seed=0)
        trm = TrmTrainer(model=trm_model, args=training_args, loss_chunk_rows=args.loss_chunk_rows)
        fast = trm.compute_loss(trm_model, dict(batch))
        stock = Trainer(model=stock_model, args=training_args).compute_loss(stock_model, dict(batch))
    if abs(fast.item() - stock.item()) > 1e-4 * abs(stock.item()):
        raise SystemExit(f"phase {phase}: losses differ: trm {fast.item():.6f} vs default {stock.item():.6f}")
    return fast.item(), stock.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["1", "2", "both"], default="both")
    parser.add_argument("--config_name", default="configs/gpt2-tiny.json")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step (the recipes use 8)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repetition (after one warm-up step)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loss_chunk_rows", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    model = build_model(args.config_name, seed=0)
    flops_per_token = training_flops_per_token(model, args.seq_len)
    peak = matmul_peak_gflops()
    bf16_flags = cpu_bf16_flags()
    bf16_peak = matmul_peak_gflops(torch.bfloat16) if bf16_flags else None
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {flops_per_token / 1e6:.0f} MFLOP per training token")
    print(f"matmul peak: fp32 {peak:.0f} GFLOP/s; " + (
        f"bf16 {bf16_peak:.0f} GFLOP/s (CPU reports {'/'.join(bf16_flags)})" if bf16_flags
        else "bf16 not measured (the CPU reports no bf16 instructions, so TRM trains in fp32)"))
    results = {"matmul_peak_gflops": peak, "bf16_matmul_peak_gflops": bf16_peak, "cpu_bf16_flags": bf16_flags,
               "flops_per_token": flops_per_token}
    for phase in ([1, 2] if args.phase == "both" else [int(args.phase)]):
        dataset = benchmark_dataset(phase, args)
        mean_tokens = statistics.mean(len(x) for x in dataset["input_ids"])
        fast_loss, stock_loss = check_losses_match(phase, dataset, args, tokenizer)
        runs = {"trm": [], **({"trm-bf16": []} if bf16_flags else {}), "default": [], "eager": []}
        memory = {kind: 0.0 for kind in runs}
        for _ in range(args.reps):
            for kind in runs:
                speed, rss = in_fresh_process(kind, phase, args)
                runs[kind].append(speed)
                memory[kind] = max(memory[kind], rss)
        print(f"\nphase {phase}: batch {args.batch_size} x {args.seq_len if phase == 1 else f'~{mean_tokens:.0f} (padded per batch)'} tokens; "
              f"loss on one batch: trm {fast_loss:.6f}, default {stock_loss:.6f}")
        if phase == 2:
            print("(GFLOP/s counts the stock model's work per token; TRM skips the output projection on prompt tokens,\n"
                  " so its useful work per token is smaller and its column can exceed what the hardware did)")
        print(f"{'set-up':<10} {'tokens/s':>10} {'GFLOP/s':>9} {'% peak':>7} {'peak RSS MB':>12} {'vs default':>11} {'vs trm':>7}")
        base, trm = statistics.median(runs["default"]), statistics.median(runs["trm"])
        for kind, speeds in runs.items():
            median = statistics.median(speeds)
            gflops = median * flops_per_token / 1e9
            kind_peak = bf16_peak if kind == "trm-bf16" else peak  # each against the peak of its own arithmetic
            print(f"{kind:<10} {median:>10.0f} {gflops:>9.1f} {gflops / kind_peak:>7.1%} {memory[kind]:>12.0f} "
                  f"{median / base:>10.2f}x {median / trm:>6.2f}x")
        results[f"phase{phase}"] = {k: {"tokens_per_second": statistics.median(v), "all": v, "peak_rss_mb": memory[k]} for k, v in runs.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
