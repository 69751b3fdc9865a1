#!/usr/bin/env python
"""Does bf16 autocast cost model quality? Phase-1 runs in fp32 and bf16 over the same tokens, from the same seed.

    python benchmarks/precision_parity.py --train_file ../shared/data/wiki/enwiki_pages_sample.jsonl.xz \
        [--max_steps 245] [--output_dir outputs/precision_parity]

Three runs of the phase-1 recipe (32 x 256 tokens per step; 245 steps = 2.0M tokens), each evaluated on the
whole prepared validation split: bf16 and fp32 from seed 42, and bf16 from seed 43, whose difference from
seed 42 is the run-to-run noise the precision difference is compared against. Each run resumes if
interrupted. Prints the validation losses at every evaluation and writes `parity.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = (("bf16", 42), ("fp32", 42), ("bf16", 43))


def eval_losses(run_dir: Path) -> dict[int, float]:
    history = json.loads((run_dir / "training_log.json").read_text(encoding="utf-8"))
    return {record["num_input_tokens_seen"]: record["eval_loss"] for record in history
            if "eval_loss" in record and "num_input_tokens_seen" in record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--max_steps", type=int, default=245)
    parser.add_argument("--eval_steps", type=int, default=49)
    parser.add_argument("--output_dir", default="outputs/precision_parity")
    args = parser.parse_args()

    output = Path(args.output_dir)
    for dtype, seed in RUNS:
        run_dir = output / f"{dtype}-seed{seed}"
        if (run_dir / "training_log.json").is_file():
            continue
        command = [
            sys.executable, str(ROOT / "run_clm.py"), str(ROOT / "recipes" / "phase1_pretraining.yaml"),
            "--train_file", args.train_file, "--output_dir", str(run_dir), "--precision", dtype, "--seed", str(seed),
            "--max_steps", str(args.max_steps), "--eval_steps", str(args.eval_steps), "--save_steps", str(args.eval_steps),
            "--max_eval_tokens", "100000000", "--load_best_model_at_end", "false", "--disable_tqdm", "true",
            "--resume",
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)

    curves = {f"{dtype}-seed{seed}": eval_losses(output / f"{dtype}-seed{seed}") for dtype, seed in RUNS}
    tokens = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    print(f"\n{'tokens':>10} " + " ".join(f"{name:>12}" for name in curves) + f" {'bf16-fp32':>10} {'seed noise':>10}")
    for count in tokens:
        losses = [curve[count] for curve in curves.values()]
        print(f"{count:>10,} " + " ".join(f"{loss:>12.4f}" for loss in losses)
              + f" {losses[0] - losses[1]:>+10.4f} {losses[2] - losses[0]:>+10.4f}")
    final = tokens[-1]
    result = {"curves": {name: {str(k): v for k, v in curve.items()} for name, curve in curves.items()},
              "final_tokens": final,
              "bf16_minus_fp32": curves["bf16-seed42"][final] - curves["fp32-seed42"][final],
              "seed43_minus_seed42_bf16": curves["bf16-seed43"][final] - curves["bf16-seed42"][final]}
    (output / "parity.json").write_text(json.dumps(result, indent=2))
    print(f"\nat {final:,} tokens: bf16 - fp32 = {result['bf16_minus_fp32']:+.4f} nats; "
          f"seed 43 - seed 42 (bf16) = {result['seed43_minus_seed42_bf16']:+.4f} nats")


if __name__ == "__main__":
    main()
