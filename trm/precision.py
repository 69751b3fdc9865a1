"""Which arithmetic a run trains in: fp32, or bf16 autocast with fp32 master weights, chosen per machine.

Design decisions:
- `precision: auto` (the default) decides on the machine at hand, because a recipe cannot know where it
  will run: the reference user's Zen 2 has no bf16 units (bf16 there is ~100x slower than fp32), a Zen 4
  has AVX512-BF16, a recent Xeon has AMX. On a CPU, bf16 is considered only where the CPU reports bf16
  instructions, and then adopted only if a few timed training steps of this very model at this very
  batch shape are clearly faster than in fp32 (`BF16_MIN_SPEEDUP`). The log says what was chosen and why.
- bf16 means autocast: weights, optimizer state and gradients stay fp32; matrix products run in bf16
  with fp32 accumulation. The chunked loss follows autocast (`models.gpt2.chunked_lm_loss`).
- `precision: fp32|bf16` (or TrainingArguments' `--bf16 true`) forces one; bf16 on a CPU without bf16 units,
  and fp16 on any CPU, are refused by `trm.rules`.
- On a GPU (`use_cpu: false`) auto means bf16 where the GPU supports it, as GPU recipes usually do.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.gpt2 import chunked_lm_loss, use_fused_gelu

logger = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX512-BF16, Arm BF16 (Linux cpuinfo names)
BF16_MIN_SPEEDUP = 1.15  # below this, a timing difference is within what a busy machine varies by


@dataclass(frozen=True)
class PrecisionChoice:
    dtype: str  # "fp32", "bf16" (autocast) or "fp16" (a GPU run that asked for it)
    reason: str

    @property
    def description(self) -> str:
        return {"bf16": "bf16 autocast, fp32 weights", "fp16": "fp16 mixed precision"}.get(self.dtype, "fp32")


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The bf16 instruction sets this CPU reports (empty where it reports none, or cpuinfo is unreadable)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def seconds_per_step(model, batch_size: int, block_size: int, bf16: bool, steps: int = 2) -> float:
    """Fastest of `steps` forward+backward passes of the chunked loss (after one warm-up) on a copy of `model`."""
    model = use_fused_gelu(copy.deepcopy(model)).train()
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, block_size))
    best = float("inf")
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = chunked_lm_loss(model, input_ids, input_ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:
            best = min(best, time.perf_counter() - start)
    return best


def choose_precision(setting: str, use_cpu: bool, model, batch_size: int, block_size: int) -> PrecisionChoice:
    """Resolve `setting` ("auto", or a dtype asked for) for this run; whether the CPU allows it is `trm.rules`' call."""
    if setting != "auto":
        return PrecisionChoice(setting, f"{setting} was asked for")
    if not use_cpu:
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if supported else "fp32",
                               "the GPU supports bf16" if supported else "no bf16 support on this accelerator")
    flags = cpu_bf16_flags()
    if not flags:
        return PrecisionChoice("fp32", "this CPU reports no bf16 instructions")
    fp32 = seconds_per_step(model, batch_size, block_size, bf16=False)
    bf16 = seconds_per_step(model, batch_size, block_size, bf16=True)
    measured = f"this CPU has {'/'.join(flags)}; a training step took {bf16:.3f} s in bf16 vs {fp32:.3f} s in fp32"
    if fp32 / bf16 >= BF16_MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"{measured} ({fp32 / bf16:.2f}x faster)")
    return PrecisionChoice("fp32", f"{measured} (bf16 not clearly faster)")
