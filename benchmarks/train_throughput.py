#!/usr/bin/env python
"""Training throughput on this machine: TRM's Trainer set-up against a default Trainer recipe and a plain loop.

    python benchmarks/train_throughput.py [--phase 1|2|both] [--reps 3] [--steps 4] [--batch_size 16]
    python benchmarks/train_throughput.py --device cuda --phase 1 --batch_size 32 --profile profile.txt

For each phase, the set-ups train the same model from the same weights, interleaved repetition by
repetition so that machine noise hits all of them alike, each run in a fresh process (so that neither
memory nor process settings carry over from one run to the next). On the CPU (the default):
  (a) trm      - `TrmTrainer` configured as run_clm.py / run_sft.py configure it (chunked fused loss,
                 which in phase 2 also skips the output projection on prompt tokens; fused GELU kernel;
                 fused AdamW; freed memory kept for reuse; length-grouped batches in phase 2), in fp32;
  (a') trm-bf16 - the same in bf16 autocast with fp32 weights (what `precision: auto` picks where it is
                 faster), only on CPUs that report bf16 instructions;
  (b) default  - `Trainer` with default `TrainingArguments` on the CPU and the stock GPT2LMHeadModel loss,
                 as in Hugging Face's run_clm.py example (batch size set to the same value);
  (c) eager    - a plain PyTorch loop: stock loss, backward, torch.optim.AdamW.
On a GPU (`--device cuda`), the set-ups of a full-length run and what PyTorch offers beyond it:
  default          - `Trainer` defaults (fp32, stock loss) on the GPU;
  trm              - the GPU recipe of `benchmarks/full_length_levers.py`: bf16 autocast, Muon with fused AdamW,
                     the chunked loss in chunks of `--loss_chunk_rows` (2048 there);
  trm-compile      - the same with `--torch_compile true` (the model's forward and backward through inductor);
  trm-cudagraphs   - the same with `--torch_compile_mode reduce-overhead` (inductor plus CUDA graphs);
  stock-compile    - bf16 and torch.compile with the stock loss (`loss_chunk_rows: 0`): full logits, one graph.
Every timed step ends with a device synchronisation; `--warmup_steps` (3 on a GPU) absorb compilation and
graph capture. Reported beside tokens/s: the fraction of the measured bf16 matmul peak of this GPU and, with
`--peak_tflops` (the data sheet's dense bf16 figure, e.g. 989 for an H100 or H200 SXM), of the published peak.
`--profile FILE` traces the timed steps of the first set-up once more with `torch.profiler` and writes its
table of operators by device time: where a step's time goes, and how much of it the GPU sits idle.
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


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int | None = None, repeats: int = 10, device: str = "cpu") -> float:
    size = size or (8192 if device == "cuda" else 2048)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
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
    """Times every optimizer step; on a GPU each step ends with a synchronisation, so its kernels are counted."""

    def __init__(self, device: str):
        self.durations, self._start, self.device = [], None, device

    def _synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._synchronize()
        self.durations.append(time.perf_counter() - self._start)


class StepProfiler(TrainerCallback):
    """`torch.profiler` over the steps after the warm-up; the operator table goes to `path`."""

    def __init__(self, path: str, warmup_steps: int, device: str):
        self.path, self.warmup_steps, self.device, self.profiler = path, warmup_steps, device, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        sort_by = "self_cuda_time_total" if self.device == "cuda" else "self_cpu_time_total"
        Path(self.path).write_text(self.profiler.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")


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


def throughput(tokens: list[int], durations: list[float], warmup_steps: int) -> float:
    """Tokens per second over the timed steps (the first `warmup_steps` are not timed)."""
    return sum(tokens[warmup_steps:len(durations)]) / sum(durations[warmup_steps:])


# TrainingArguments and TrmTrainer settings of each TRM set-up beyond TRM's own; on a GPU every one is bf16 with Muon.
TRM_SETUPS = {
    "trm": ({}, {}),
    "trm-bf16": ({"bf16": True}, {}),
    "trm-compile": ({"torch_compile": True}, {}),
    "trm-cudagraphs": ({"torch_compile": True, "torch_compile_mode": "reduce-overhead"}, {}),
    "stock-compile": ({"torch_compile": True}, {"loss_chunk_rows": 0}),
}
DEFAULT_SETUPS = {"cpu": ("trm", "trm-bf16", "default", "eager"),
                  "cuda": ("default", "trm", "trm-compile", "trm-cudagraphs", "stock-compile")}


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


def trainer_run(kind: str, phase: int, dataset: Dataset, args: argparse.Namespace, tokenizer,
                profile: str | None = None) -> tuple[float, float]:
    """Train `args.warmup_steps + args.steps` steps; return (tokens/s over the timed steps, peak RSS in MB)."""
    model = build_model(args.config_name, seed=0)
    timer = StepTimer(args.device)
    callbacks = [timer] + ([StepProfiler(profile, args.warmup_steps, args.device)] if profile else [])
    on_gpu = args.device == "cuda"
    with tempfile.TemporaryDirectory() as output_dir:
        common = dict(output_dir=output_dir, use_cpu=not on_gpu, per_device_train_batch_size=args.batch_size,
                      max_steps=args.warmup_steps + args.steps, report_to=[], disable_tqdm=True, save_strategy="no",
                      logging_strategy="no")
        if kind == "default":
            training_args = TrainingArguments(**common)
            trainer_class, extra = Trainer, {}
        else:
            keep_freed_memory_for_reuse()
            setup_args, setup_trainer = TRM_SETUPS[kind]
            training_args = TrainingArguments(**{
                **common, "optim": "adamw_torch_fused", "bf16": on_gpu, "learning_rate": 1e-3, "weight_decay": 0.1,
                "adam_beta2": 0.95, "lr_scheduler_type": "cosine", "include_num_input_tokens_seen": True,
                "remove_unused_columns": False, **({"train_sampling_strategy": "group_by_length"} if phase == 2 else {}),
                **setup_args})
            extra = {"loss_chunk_rows": args.loss_chunk_rows, "use_muon": on_gpu, **setup_trainer}
            trainer_class = TrmTrainer
        collator = CountingCollator(phase, tokenizer)
        train_data = dataset if (phase == 2 and kind != "default") else dataset.remove_columns([c for c in dataset.column_names if c == "length"])
        trainer = trainer_class(model=model, args=training_args, train_dataset=train_data, data_collator=collator,
                                callbacks=callbacks, **extra)
        with PeakRss() as rss:
            trainer.train()
    return throughput(collator.tokens, timer.durations, args.warmup_steps), rss.peak_mb


def eager_run(phase: int, dataset: Dataset, args: argparse.Namespace, tokenizer) -> tuple[float, float]:
    model = build_model(args.config_name, seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    collator = CountingCollator(phase, tokenizer)
    rows = dataset.remove_columns([c for c in dataset.column_names if c == "length"])
    durations = []
    with PeakRss() as rss:
        for step in range(args.warmup_steps + args.steps):
            batch = collator([rows[i] for i in range(step * args.batch_size, (step + 1) * args.batch_size)])
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            durations.append(time.perf_counter() - start)
    return throughput(collator.tokens, durations, args.warmup_steps), rss.peak_mb


def one_run(kind: str, phase: int, args: argparse.Namespace, profile: str | None = None) -> tuple[float, float]:
    """One set-up, from scratch: this runs in its own process."""
    tokenizer = load_tokenizer()
    dataset = benchmark_dataset(phase, args)
    if kind == "eager":
        return eager_run(phase, dataset, args, tokenizer)
    return trainer_run(kind, phase, dataset, args, tokenizer, profile)


def in_fresh_process(kind: str, phase: int, args: argparse.Namespace, profile: str | None = None) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(one_run, kind, phase, args, profile).result()


def benchmark_dataset(phase: int, args: argparse.Namespace) -> Dataset:
    n = args.batch_size * (args.warmup_steps + args.steps)
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--setups", help=f"comma-separated, from {', '.join([*TRM_SETUPS, 'default', 'eager'])} "
                        f"(default on the CPU: {','.join(DEFAULT_SETUPS['cpu'])}; on a GPU: {','.join(DEFAULT_SETUPS['cuda'])})")
    parser.add_argument("--config_name", default="configs/gpt2-tiny.json")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step (the CPU recipes use 8, the GPU runs 32)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repetition")
    parser.add_argument("--warmup_steps", type=int, help="untimed steps first (default 1 on the CPU, 3 on a GPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loss_chunk_rows", type=int, help="rows per chunk of TRM's loss (default 256 on the CPU, 2048 on a GPU)")
    parser.add_argument("--peak_tflops", type=float, help="the device's published dense bf16 peak, for the '%% published' column")
    parser.add_argument("--profile", help="trace the first set-up once more and write torch.profiler's operator table here")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA device that torch can use.")
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (3 if on_gpu else 1)
    args.loss_chunk_rows = args.loss_chunk_rows or (2048 if on_gpu else 256)

    tokenizer = load_tokenizer()
    model = build_model(args.config_name, seed=0)
    flops_per_token = training_flops_per_token(model, args.seq_len)
    peak = matmul_peak_gflops(device=args.device)
    bf16_flags = ["cuda"] if on_gpu else cpu_bf16_flags()
    bf16_peak = matmul_peak_gflops(torch.bfloat16, device=args.device) if bf16_flags else None
    machine = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    print(f"machine: {machine}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"{flops_per_token / 1e6:.0f} MFLOP per training token")
    print(f"matmul peak: fp32 {peak:.0f} GFLOP/s; " + (
        f"bf16 {bf16_peak:.0f} GFLOP/s" + ("" if on_gpu else f" (CPU reports {'/'.join(bf16_flags)})") if bf16_flags
        else "bf16 not measured (the CPU reports no bf16 instructions, so TRM trains in fp32)"))
    available = [*TRM_SETUPS, "default", "eager"]
    chosen = args.setups.split(",") if args.setups else [k for k in DEFAULT_SETUPS[args.device] if k != "trm-bf16" or bf16_flags]
    unknown = [k for k in chosen if k not in available]
    if unknown:
        raise SystemExit(f"unknown set-up(s) {', '.join(unknown)}; choose from {', '.join(available)}.")
    results = {"device": machine, "matmul_peak_gflops": peak, "bf16_matmul_peak_gflops": bf16_peak,
               "cpu_bf16_flags": None if on_gpu else bf16_flags, "flops_per_token": flops_per_token, "batch_size": args.batch_size}
    for phase in ([1, 2] if args.phase == "both" else [int(args.phase)]):
        dataset = benchmark_dataset(phase, args)
        mean_tokens = statistics.mean(len(x) for x in dataset["input_ids"])
        fast_loss, stock_loss = check_losses_match(phase, dataset, args, tokenizer)
        runs = {kind: [] for kind in chosen}
        memory = {kind: 0.0 for kind in runs}
        for _ in range(args.reps):
            for kind in runs:
                speed, rss = in_fresh_process(kind, phase, args)
                runs[kind].append(speed)
                memory[kind] = max(memory[kind], rss)
        if args.profile:
            in_fresh_process(chosen[0], phase, args, profile=f"{args.profile}.phase{phase}" if args.phase == "both" else args.profile)
        print(f"\nphase {phase}: batch {args.batch_size} x {args.seq_len if phase == 1 else f'~{mean_tokens:.0f} (padded per batch)'} tokens; "
              f"loss on one batch: trm {fast_loss:.6f}, default {stock_loss:.6f}")
        if phase == 2:
            print("(GFLOP/s counts the stock model's work per token; TRM skips the output projection on prompt tokens,\n"
                  " so its useful work per token is smaller and its column can exceed what the hardware did)")
        published = f" {'% published':>12}" if args.peak_tflops else ""
        print(f"{'set-up':<15} {'tokens/s':>10} {'GFLOP/s':>9} {'% peak':>7}{published} {'peak RSS MB':>12} {'vs first':>9}")
        first = statistics.median(runs[chosen[0]])
        for kind, speeds in runs.items():
            median = statistics.median(speeds)
            gflops = median * flops_per_token / 1e9
            in_bf16 = kind == "trm-bf16" or (on_gpu and kind not in ("default", "eager"))
            kind_peak = bf16_peak if in_bf16 else peak  # each against the peak of its own arithmetic
            share = f" {gflops / (args.peak_tflops * 1e3):>12.1%}" if args.peak_tflops else ""
            print(f"{kind:<15} {median:>10.0f} {gflops:>9.1f} {gflops / kind_peak:>7.1%}{share} {memory[kind]:>12.0f} "
                  f"{median / first:>8.2f}x")
        results[f"phase{phase}"] = {k: {"tokens_per_second": statistics.median(v), "all": v, "peak_rss_mb": memory[k]} for k, v in runs.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
