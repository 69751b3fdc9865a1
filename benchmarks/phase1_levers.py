#!/usr/bin/env python
"""Phase-1 levers of issue 9, each against the recipe over the same tokens from the same seed.

    python benchmarks/phase1_levers.py --train_file ../shared/data/wiki/enwiki_pages_sample.jsonl.xz \
        [--runs baseline,beta2_0.99] [--max_steps 196] [--parallel 2] [--output_dir outputs/phase1_levers] [--base recipe]
        [--blimp ../shared/data/blimp --blimp_pairs_per_paradigm 100] [--text_file held_out.jsonl] [--seed 42]

Every run is the phase-1 recipe as it was before Muon became its default (32 x 256 tokens per step, AdamW,
cosine), or with `--base recipe` the recipe as it is now (Muon, warmup-stable-decay), with one change,
evaluated on the whole prepared validation split (`--max_eval_tokens` unbounded) every `--eval_steps`, and
with `--blimp` each final model on BLiMP (`run_eval.py`, mean over paradigms) and with `--text_file` on held-out
text no run trained on (loss and bits per byte: the common measure when a change to the data pipeline changes the
validation split itself). `--parallel N` runs N at once, sharing the cores this process may use (one thread
each on 2 cores), so runs started together share the machine alike; a second invocation beside a running one
takes all the cores too and both slow down several-fold (measured: ~500 instead of ~1,800 tokens/s): pin each
to its own cores (`taskset -c 1 python benchmarks/phase1_levers.py ...`). Each run resumes if interrupted (also after
Ctrl-C, whose final model stops short of `--max_steps`) and a finished run is not repeated. The table compares
validation loss at equal tokens and reports each run's measured tokens/s: levers that change the cost of a step
(depth, Muon) are judged at equal time by `--max_steps` scaled with that cost. Writes `levers.json` and the curves as `levers.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINAL_REPORT = "final_eval.json"
# The recipe as it stood before these measurements (AdamW, cosine decay); each lever changes one setting of it.
BEFORE = ["--use_muon", "false", "--adamw_lr_ratio", "1", "--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", "{}"]
LEVERS = {
    "baseline": [],
    "beta2_0.99": ["--adam_beta2", "0.99"],
    "wsd": ["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs", json.dumps({"num_decay_steps": 0.2})],
    "depth8": ["--config_name", "configs/gpt2-tiny-8layer.json"],
    "muon": ["--use_muon", "true"],
    "document_attention": ["--document_attention", "true"],
    "depth10": ["--config_name", "configs/gpt2-tiny-10layer.json"],
    "depth12": ["--config_name", "configs/gpt2-tiny-12layer.json"],  # the recipe's shape since the sixteenth session
    "depth16": ["--config_name", "configs/gpt2-tiny-16layer.json"],  # the deepest of SHAPE=auto's ladder
    "depth6": ["--config_name", "configs/gpt2-tiny.json"],  # the recipe's shape before 12 layers
    "wide384": ["--config_name", "configs/gpt2-wide-384.json"],
    "decay_0.4": ["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs", json.dumps({"num_decay_steps": 0.4})],
    "decay_to_0.1": ["--lr_scheduler_type", "warmup_stable_decay",
                     "--lr_scheduler_kwargs", json.dumps({"num_decay_steps": 0.2, "min_lr_ratio": 0.1})],
    "zero_init_projections": ["--zero_init_projections", "true"],
    "sinusoidal_positions": ["--sinusoidal_positions", "0.02"],  # the size of GPT-2's random start
    "sinusoidal_positions_0.1": ["--sinusoidal_positions", "0.1"],  # nearer the trained token embeddings' size
    "z_loss_1e-4": ["--z_loss_weight", "1e-4"],
    "no_embedding_decay": ["--decay_embeddings", "false"],  # weight decay on the blocks' matrices only
    "adamw_lr_x3": ["--adamw_lr_ratio", "3"],  # embeddings, norms and biases at 3x the blocks' rate: the recipe's since the eighteenth session
    "adamw_lr_x1": ["--adamw_lr_ratio", "1"],  # one rate for both halves, as before
    "adamw_lr_x2": ["--adamw_lr_ratio", "2"],
    "adamw_lr_x6": ["--adamw_lr_ratio", "6"],
    "adamw_lr_x10": ["--adamw_lr_ratio", "10"],
    "ema_0.999": ["--ema_decay", "0.999"],
    "batch_ramp_280": ["--batch_ramp_steps", "280"],  # 5% of a full run's ~5,600 steps of 32 x 256 tokens, at every length
    # 16 sequences per step, ramped over the recipe's first 8,960 sequences (from 4 per update); micro-batches of 8
    "batch_16": ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--batch_ramp_steps", "560"],
    "lr_1e-3": ["--learning_rate", "1e-3"],  # the rate before 2e-3 became the recipe's
    "lr_2e-3": ["--learning_rate", "2e-3"],
    "lr_3e-3": ["--learning_rate", "3e-3"],
    "lr_4e-3": ["--learning_rate", "4e-3"],
}

# Levers whose steps hold fewer sequences than the recipe's 32: their runs take proportionally more steps (and
# evaluate proportionally less often in steps), so every run sees the same tokens and is evaluated at the same counts.
STEPS_PER_RECIPE_STEP = {"batch_16": 2}


def usable_cores() -> int:
    """The cores this process may run on (taskset and containers narrow them), where the OS says."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_steps(name: str, args) -> tuple[int, int]:
    """`--max_steps` and `--eval_steps` of a run, at the recipe's tokens per step."""
    scale = STEPS_PER_RECIPE_STEP.get(name, 1)
    return args.max_steps * scale, args.eval_steps * scale


def run_command(name: str, args) -> list[str]:
    max_steps, eval_steps = run_steps(name, args)
    return [
        sys.executable, str(ROOT / "run_clm.py"), str(ROOT / "recipes" / "phase1_pretraining.yaml"),
        "--train_file", args.train_file, "--output_dir", str(Path(args.output_dir) / name), "--seed", str(args.seed),
        "--max_steps", str(max_steps), "--eval_steps", str(eval_steps), "--save_steps", str(eval_steps),
        "--max_eval_tokens", "100000000", "--load_best_model_at_end", "false", "--disable_tqdm", "true",
        "--resume", *(BEFORE if args.base == "before" else []), *LEVERS[name],
    ]


def final_eval_command(run_dir: Path, blimp: str | None, pairs_per_paradigm: int | None = None,
                       text_files: list[str] | None = None) -> list[str]:
    """run_eval.py on a final model: BLiMP (optionally N pairs per paradigm) and loss on held-out text."""
    return [sys.executable, str(ROOT / "run_eval.py"), str(run_dir), "--report", str(run_dir / FINAL_REPORT),
            *(["--blimp", blimp] if blimp else []),
            *(["--blimp_pairs_per_paradigm", str(pairs_per_paradigm)] if blimp and pairs_per_paradigm else []),
            *(["--text_file", *text_files] if text_files else [])]


def trained_steps(run_dir: Path) -> int:
    """The last step of a run's final model; 0 before there is one. A run stopped by Ctrl-C or SIGTERM saves its
    final model too, short of `--max_steps`."""
    log = run_dir / "training_log.json"
    return max((record.get("step", 0) for record in json.loads(log.read_text(encoding="utf-8"))), default=0) if log.is_file() else 0


def run_summary(run_dir: Path) -> dict:
    history = json.loads((run_dir / "training_log.json").read_text(encoding="utf-8"))
    evals = {r["num_input_tokens_seen"]: r["eval_loss"] for r in history if "eval_loss" in r and "num_input_tokens_seen" in r}
    copies = {r["num_input_tokens_seen"]: r["eval_copy_loss"] for r in history if "eval_copy_loss" in r}
    speeds = [r["tokens_per_second"] for r in history if "tokens_per_second" in r]
    report_file = run_dir / FINAL_REPORT
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    return {"eval_loss": evals, "copy_loss": copies,
            "tokens_per_second": sorted(speeds)[len(speeds) // 2] if speeds else None,
            "blimp": report.get("blimp", {}).get("mean"),
            "held_out_text": {key: report["text"][key] for key in ("tokens", "loss", "bits_per_byte")} if "text" in report else None}


def json_ready(summary: dict) -> dict:
    """A run_summary with its token counts as JSON keys."""
    return {**summary, "eval_loss": {str(k): v for k, v in summary["eval_loss"].items()},
            "copy_loss": {str(k): v for k, v in summary["copy_loss"].items()}}


def chosen_runs(parser: argparse.ArgumentParser, text: str, levers: dict) -> list[str]:
    """The comma-separated run names of `text`; an unknown one ends the program with the choices."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in levers]
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; choose from {', '.join(levers)}.")
    return names


def plot_curves(summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, s in summaries.items():
        points = sorted(s["eval_loss"].items())
        axis.plot([t for t, _ in points], [loss for _, loss in points], marker="o", markersize=3, label=name)
    axis.set_xlabel("tokens seen")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title("phase-1 levers, same seed and tokens")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--runs", default=",".join(LEVERS), help=f"comma-separated, from: {', '.join(LEVERS)}")
    parser.add_argument("--max_steps", type=int, default=196)
    parser.add_argument("--eval_steps", type=int, default=49)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--output_dir", default="outputs/phase1_levers")
    parser.add_argument("--base", choices=("before", "recipe"), default="before",
                        help="the recipe each lever changes: as it was before Muon (the published table) or as it is now")
    parser.add_argument("--blimp", help="BLiMP directory (or hub): score every final model on it")
    parser.add_argument("--blimp_pairs_per_paradigm", type=int, default=None)
    parser.add_argument("--text_file", nargs="+", help="held-out text no run trained on: every final model's loss and bits per byte on it")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    names = chosen_runs(parser, args.runs, LEVERS)

    output = Path(args.output_dir)
    steps = {name: trained_steps(output / name) for name in names}
    pending = [name for name in names if steps[name] < run_steps(name, args)[0]]
    for name in pending:
        if steps[name]:
            print(f"{name}: stopped at step {steps[name]} of {run_steps(name, args)[0]} (interrupted); resuming it", flush=True)
            (output / name / FINAL_REPORT).unlink(missing_ok=True)
    threads = max(1, usable_cores() // max(1, args.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    while pending:
        batch, pending = pending[:args.parallel], pending[args.parallel:]
        processes = []
        for name in batch:
            (output / name).mkdir(parents=True, exist_ok=True)
            print("$", " ".join(run_command(name, args)), flush=True)
            log = (output / name / "run.log").open("a")
            processes.append((name, subprocess.Popen(run_command(name, args), cwd=ROOT, env=env, stdout=log, stderr=log)))
        failed = [name for name, process in processes if process.wait() != 0]
        if failed:
            sys.exit(f"runs failed: {', '.join(failed)} (see {output}/<run>/run.log)")

    for name in names if args.blimp or args.text_file else []:
        if (output / name / "training_log.json").is_file() and not (output / name / FINAL_REPORT).is_file():
            command = final_eval_command(output / name, args.blimp, args.blimp_pairs_per_paradigm, args.text_file)
            print("$", " ".join(command), flush=True)
            with (output / name / "run.log").open("a") as log:
                if subprocess.run(command, cwd=ROOT, stdout=log, stderr=log).returncode != 0:
                    sys.exit(f"the final evaluation of {name} failed (see {output / name}/run.log)")

    summaries = {name: run_summary(output / name) for name in names if (output / name / "training_log.json").is_file()}
    tokens = sorted(set.intersection(*(set(s["eval_loss"]) for s in summaries.values())))
    print(f"\n{'tokens':>10} " + " ".join(f"{name:>18}" for name in summaries))
    for count in tokens:
        print(f"{count:>10,} " + " ".join(f"{s['eval_loss'][count]:>18.4f}" for s in summaries.values()))
    print(f"{'copy loss':>10} " + " ".join(f"{s['copy_loss'].get(tokens[-1], float('nan')):>18.3f}" for s in summaries.values()))
    print(f"{'tokens/s':>10} " + " ".join(f"{s['tokens_per_second'] or 0:>18,.0f}" for s in summaries.values()))
    if args.blimp:
        print(f"{'BLiMP':>10} " + " ".join(f"{s['blimp'] or float('nan'):>18.2f}" for s in summaries.values()))
    if args.text_file:
        print(f"{'held out':>10} " + " ".join(f"{(s['held_out_text'] or {}).get('loss', float('nan')):>18.4f}" for s in summaries.values()))
    result = {"max_steps": args.max_steps, "seed": args.seed, "threads_per_run": threads, "base": args.base,
              "runs": {name: json_ready(s) for name, s in summaries.items()}}
    plot_curves(summaries, output / "levers.png")
    tmp = output / "levers.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, output / "levers.json")


if __name__ == "__main__":
    main()
