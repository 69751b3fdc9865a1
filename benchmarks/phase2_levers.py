#!/usr/bin/env python
"""Phase-2 levers of issue 9, each against the current recipe, from one common phase-1 model.

    python benchmarks/shared_data_splits.py ../shared/data cache/splits      # alpaca_merged.json
    python benchmarks/phase2_levers.py --model_name_or_path outputs/phase1_levers/baseline \
        [--runs baseline,question_first] [--max_steps 150] [--parallel 2] [--eval_limit 200]

Every run is the phase-2 recipe (32 examples per step) with one change, on all shared sources (the merged
Alpaca-format files, the SQuAD v1.1 / v2.0 dev parts, DailyDialog train), for `--max_steps` from the same
seed, then `run_eval.py` on articles no run was tuned on (`squad/unseen-v1.1.json`, `unseen-v2.0.json`:
free decoding, `--decoding both` adds grounded) and on the 50 sample instructions (share of replies that end by themselves).
`--parallel N` runs N at once with one thread each. A finished run or evaluation is not repeated.
Reports held-out reply loss overall and per source, the scores and each run's tokens/s (the prompt loss
weight sends prompt tokens through the output projection: its steps cost more). Writes `levers.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from phase1_levers import chosen_runs, usable_cores

ROOT = Path(__file__).resolve().parent.parent
# The recipe as it stood before these measurements (passage-first SQuAD prompts); each lever changes one setting.
BEFORE = ["--squad_layout", "passage_first"]
LEVERS = {
    "baseline": [],
    "question_first": ["--squad_layout", "question_first"],
    "v2_without_v1_duplicates": ["--squad_v2_drop_v1_duplicates", "true"],
    "lr_1e-3": ["--learning_rate", "1e-3"],
    "prompt_weight_0.1": ["--prompt_loss_weight", "0.1"],
    "unanswerable_2000": ["--squad_v2_max_unanswerable", "2000"],  # about half of the shared v2.0 part's
    "one_instruction": ["--squad_abstain_instruction", "false"],  # the recipe before v2.0 prompts said abstaining is allowed
    "passage_conversations": ["--squad_group_by_passage", "true"],
    "passage_conversations_prompt_0.1": ["--squad_group_by_passage", "true", "--prompt_loss_weight", "0.1"],
    "passage_conversations_prompt_0.3": ["--squad_group_by_passage", "true", "--prompt_loss_weight", "0.3"],
}


def source_arguments(shared: str | Path, alpaca_file: str) -> list[str]:
    """run_sft.py's data arguments for all shared sources."""
    shared = Path(shared)
    return ["--alpaca_file", alpaca_file, "--squad_file", str(shared / "squad" / "dev-v1.1.part.json"),
            "--squad_v2_file", str(shared / "squad" / "dev-v2.0.part.json"),
            "--dailydialog_file", str(shared / "dailydialog" / "train" / "dialogues_train.txt")]


def evaluation_command(run_dir: Path, shared: str | Path, decoding: str, limit: int) -> list[str]:
    """run_eval.py on the articles no run was tuned on and the sample instructions; report in lever_eval.json."""
    shared = Path(shared)
    return [
        sys.executable, "run_eval.py", str(run_dir), "--squad_file", str(shared / "squad" / "unseen-v1.1.json"),
        "--squad_v2_file", str(shared / "squad" / "unseen-v2.0.json"), "--decoding", decoding,
        "--instructions_file", "data/samples/eval_instructions.txt", "--limit", str(limit),
        "--report", str(run_dir / "lever_eval.json"),
    ]


def commands(name: str, args) -> list[list[str]]:
    run_dir = Path(args.output_dir) / name
    train = [
        sys.executable, "run_sft.py", "recipes/phase2_instruction_tuning.yaml", "--model_name_or_path", args.model_name_or_path,
        *source_arguments(args.shared, args.alpaca_file),
        "--output_dir", str(run_dir), "--seed", "42", "--max_steps", str(args.max_steps),
        "--eval_steps", str(args.max_steps // 3), "--save_steps", str(args.max_steps // 3),
        "--load_best_model_at_end", "false", "--disable_tqdm", "true", "--resume", *BEFORE, *LEVERS[name],
    ]
    return [train, evaluation_command(run_dir, args.shared, args.decoding, args.eval_limit)]


def evaluated(run_dir: Path) -> bool:
    """run_eval writes its report after every section; the instructions are its last."""
    report = run_dir / "lever_eval.json"
    return report.is_file() and "instructions" in json.loads(report.read_text(encoding="utf-8"))


def run_lever(name: str, args, env: dict) -> None:
    run_dir = Path(args.output_dir) / name
    train_then_evaluate(run_dir, *commands(name, args), env)


def train_then_evaluate(run_dir: Path, train: list[str], evaluate: list[str], env: dict) -> None:
    """One lever: its training, then its evaluation, each skipped when already done; output in run.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "run.log").open("a") as log:
        for command, done in ((train, lambda: (run_dir / "training_log.json").is_file()), (evaluate, lambda: evaluated(run_dir))):
            if done():
                continue
            print("$", " ".join(command), flush=True)
            if subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=log).returncode != 0:
                raise RuntimeError(f"{run_dir.name} failed (see {run_dir / 'run.log'})")


def summary(run_dir: Path) -> dict:
    history = json.loads((run_dir / "training_log.json").read_text(encoding="utf-8"))
    final = next(r for r in reversed(history) if "eval_loss" in r and "eval_squad_loss" not in r)
    per_source = {key[5:-5]: value for r in history for key, value in r.items()
                  if key.startswith("eval_") and key.endswith("_loss") and key != "eval_loss" and key != "eval_copy_loss"}
    speeds = [r["tokens_per_second"] for r in history if "tokens_per_second" in r]
    report_path = run_dir / "lever_eval.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}  # partial if cut short
    squad = {key: {k: v for k, v in value.items() if k in ("f1", "exact", "HasAns_f1", "NoAns_f1", "abstained", "answered_f1", "total")}
             for key, value in report.items() if key.startswith("squad_")}
    return {"validation_loss": final["eval_loss"], "per_source_loss": per_source, "squad": squad,
            "ended_by_itself": report.get("instructions", {}).get("ended_by_itself"),
            "tokens_per_second": sorted(speeds)[len(speeds) // 2] if speeds else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="the common phase-1 model")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--alpaca_file", default="cache/splits/alpaca_merged.json")
    parser.add_argument("--runs", default=",".join(LEVERS), help=f"comma-separated, from: {', '.join(LEVERS)}")
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--eval_limit", type=int, default=200)
    parser.add_argument("--decoding", choices=("free", "grounded", "both"), default="free",
                        help="SQuAD decoding in the evaluations (grounded costs ~3x the time)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--output_dir", default="outputs/phase2_levers")
    args = parser.parse_args()
    names = chosen_runs(parser, args.runs, LEVERS)
    if not Path(args.alpaca_file).is_file():
        parser.error(f"{args.alpaca_file} not found; make it with benchmarks/shared_data_splits.py.")

    threads = max(1, usable_cores() // max(1, args.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(run_lever, name, args, env) for name in names]:
            future.result()

    results = {name: summary(Path(args.output_dir) / name) for name in names}
    columns = ["val loss", "squad loss", "v2 loss", "v1.1 F1 free", "v1.1 F1 grounded", "v2 NoAns free", "v2 HasAns free", "ended", "tok/s"]
    print(f"\n{'run':<26}" + "".join(f"{c:>17}" for c in columns))
    for name, r in results.items():
        free1, grounded1, free2 = (r["squad"].get(k, {}) for k in ("squad_v1.1 free", "squad_v1.1 grounded", "squad_v2.0 free"))
        values = [r["validation_loss"], r["per_source_loss"].get("squad"), r["per_source_loss"].get("squad_v2"),
                  free1.get("f1"), grounded1.get("f1"), free2.get("NoAns_f1"), free2.get("HasAns_f1"),
                  None if r["ended_by_itself"] is None else 100 * r["ended_by_itself"], r["tokens_per_second"]]
        print(f"{name:<26}" + "".join(f"{'-' if v is None else f'{v:.3f}':>17}" for v in values))
    output = Path(args.output_dir) / "levers.json"
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_name_or_path": args.model_name_or_path, "max_steps": args.max_steps,
                               "eval_limit": args.eval_limit, "threads_per_run": threads, "runs": results}, indent=2))
    os.replace(tmp, output)


if __name__ == "__main__":
    main()
