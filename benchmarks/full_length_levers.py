#!/usr/bin/env python
"""The full recipe and the levers that only full-length runs can judge, side by side on one GPU (issue 9).

    python benchmarks/shared_data_splits.py ../shared/data cache/splits          # alpaca_merged.json
    python benchmarks/full_length_levers.py [--shared ../shared/data] [--alpaca_file cache/splits/alpaca_merged.json] \
        [--phase1_minutes 4] [--phase2_minutes 1.5] [--eval_limit 150] [--output_dir outputs/full_length]

Started together on the same device:
- `run_full_recipe.py`: the recipe as shipped (phase 1 -> evaluation -> phase 2 -> evaluation) on the shared
  Wikipedia sample and all shared phase-2 sources, scored on the unseen SQuAD articles and the sample instructions;
- phase 1 with each of `--phase1_runs` (PHASE1_LEVERS; same seed, data and validation split);
- once the recipe's phase-1 model exists, phase 2 from it with each of `--phase2_runs` (PHASE2_LEVERS), each
  evaluated on the same unseen articles and instructions (free decoding).
On a GPU (`--use_cpu false`, the default here) a step is 32 x 256 tokens in one micro-batch: the same optimizer
steps as the CPU recipe's 8 x 4. Every training stage is given its time budget as the recipe's own `train_hours`:
it measures its pace and plans its length to end decayed, evaluated and saved within it, so a bounded lease still
reports comparable models; a stage that reaches its epoch cap is full length, and its report says how far it got.
Running the same command again continues where it stopped. Writes `summary.json` in `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import phase1_levers
import phase2_levers
from phase1_levers import FINAL_REPORT, chosen_runs, final_eval_command, json_ready, run_summary, usable_cores
from phase2_levers import evaluation_command, source_arguments, summary, train_then_evaluate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trm.full_recipe import FullRecipe, prepared_validation_dir  # noqa: E402

# Named setting changes, applied after --phase1_args / --phase2_args: those of the equal-token benchmarks, and
# the ones that undo a recipe choice measured there.
PHASE1_LEVERS = {
    "cosine": ["--lr_scheduler_type", "cosine", "--lr_scheduler_kwargs", "{}"],
    "adamw": ["--use_muon", "false", "--adamw_lr_ratio", "1"],
    "no_batch_ramp": ["--batch_ramp_steps", "0"],
    **{name: setting for name, setting in phase1_levers.LEVERS.items() if name != "baseline"},
}
PHASE2_LEVERS = {
    "passage_first": ["--squad_layout", "passage_first"],
    **{name: setting for name, setting in phase2_levers.LEVERS.items() if name != "baseline"},
}


def device_arguments(use_cpu: bool) -> list[str]:
    if use_cpu:
        return ["--use_cpu", "true"]
    # One micro-batch per step and 2,048-row loss chunks: fewer kernel launches, the same arithmetic.
    return ["--use_cpu", "false", "--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1",
            "--loss_chunk_rows", "2048"]


def launch(command: list[str], log_path: Path, threads: int) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(command), flush=True)
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                            stdout=log_path.open("a"), stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--alpaca_file", default="cache/splits/alpaca_merged.json")
    parser.add_argument("--output_dir", default="outputs/full_length")
    parser.add_argument("--use_cpu", choices=("true", "false"), default="false")
    parser.add_argument("--phase1_minutes", type=float, default=4.0, help="time budget of each phase-1 run")
    parser.add_argument("--phase2_minutes", type=float, default=1.5, help="time budget of each phase-2 run")
    parser.add_argument("--phase1_runs", default="cosine", help=f"comma-separated, from: {', '.join(PHASE1_LEVERS)}")
    parser.add_argument("--phase2_runs", default="passage_first,lr_1e-3", help=f"comma-separated, from: {', '.join(PHASE2_LEVERS)}")
    parser.add_argument("--eval_limit", type=int, default=150, help="SQuAD questions per file and validation blocks")
    parser.add_argument("--blimp", help="BLiMP directory for every phase-1 model (default: the shared folder's blimp/)")
    parser.add_argument("--blimp_pairs_per_paradigm", type=int, default=None, help="a seeded sample of N pairs per paradigm")
    parser.add_argument("--phase1_args", default="", help="extra run_clm.py arguments for every phase-1 run")
    parser.add_argument("--phase2_args", default="", help="extra run_sft.py arguments for every phase-2 run")
    args = parser.parse_args()
    phase1_runs = chosen_runs(parser, args.phase1_runs, PHASE1_LEVERS)
    phase2_runs = chosen_runs(parser, args.phase2_runs, PHASE2_LEVERS)
    shared, output = Path(args.shared), Path(args.output_dir)
    args.blimp = args.blimp or str(shared / "blimp")
    for path in (shared / "wiki" / "enwiki_pages_sample.jsonl.xz", Path(args.alpaca_file), Path(args.blimp)):
        if not path.exists():
            parser.error(f"{path} not found (see the usage above).")

    device = device_arguments(args.use_cpu == "true")
    phase1 = ["--train_file", str(shared / "wiki" / "enwiki_pages_sample.jsonl.xz"), *device, "--disable_tqdm", "true",
              "--train_hours", str(args.phase1_minutes / 60), *shlex.split(args.phase1_args)]
    phase2 = [*source_arguments(shared, args.alpaca_file), *device, "--disable_tqdm", "true",
              "--train_hours", str(args.phase2_minutes / 60), *shlex.split(args.phase2_args)]
    recipe_dir = output / "recipe"
    # Prepared once, before the runs that share it start.
    prepared_validation_dir(FullRecipe(output_dir=recipe_dir, phase1_args=phase1))

    threads = max(1, usable_cores() // (1 + max(len(phase1_runs), len(phase2_runs))))
    started = time.perf_counter()
    recipe = launch([
        sys.executable, "run_full_recipe.py", "--output_dir", str(recipe_dir), "--phase1_args", shlex.join(phase1),
        "--phase2_args", shlex.join(phase2), "--squad_file", str(shared / "squad" / "unseen-v1.1.json"),
        "--squad_v2_file", str(shared / "squad" / "unseen-v2.0.json"), "--eval_limit", str(args.eval_limit),
        "--blimp", args.blimp,
        *(["--blimp_pairs_per_paradigm", str(args.blimp_pairs_per_paradigm)] if args.blimp_pairs_per_paradigm else []),
    ], recipe_dir / "run.log", threads)
    phase1_processes = {name: launch([
        sys.executable, "run_clm.py", "recipes/phase1_pretraining.yaml", *phase1, *PHASE1_LEVERS[name],
        "--output_dir", str(output / f"phase1_{name}"), "--resume",
    ], output / f"phase1_{name}" / "run.log", threads) for name in phase1_runs if not (output / f"phase1_{name}" / "training_log.json").is_file()}

    while not (recipe_dir / "phase1" / "training_log.json").is_file():
        if recipe.poll() is not None:
            sys.exit(f"the recipe stopped before its phase-1 model was finished (see {recipe_dir / 'run.log'}).")
        time.sleep(5)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def phase2_lever(name: str) -> None:
        run_dir = output / f"phase2_{name}"
        train = [sys.executable, "run_sft.py", "recipes/phase2_instruction_tuning.yaml", "--model_name_or_path",
                 str(recipe_dir / "phase1"), *phase2, *PHASE2_LEVERS[name], "--output_dir", str(run_dir), "--resume"]
        train_then_evaluate(run_dir, train, evaluation_command(run_dir, shared, "free", args.eval_limit), env)

    with ThreadPoolExecutor(max_workers=max(1, len(phase2_runs))) as pool:
        lever_results = list(pool.map(lambda name: (name, _failure_of(phase2_lever, name)), phase2_runs))
    failures = {name: error for name, error in lever_results if error}
    failures.update({f"phase1_{name}": f"exit status {code}" for name, process in phase1_processes.items()
                     if (code := process.wait()) != 0})
    for name in phase1_runs:  # BLiMP of each lever's model, as the recipe's phase-1 evaluation scores its own
        run_dir = output / f"phase1_{name}"
        if (run_dir / "training_log.json").is_file() and not (run_dir / FINAL_REPORT).is_file():
            with (run_dir / "run.log").open("a") as log:
                if subprocess.run(final_eval_command(run_dir, args.blimp, args.blimp_pairs_per_paradigm), cwd=ROOT, env=env, stdout=log, stderr=log).returncode:
                    failures[f"phase1_{name} BLiMP"] = f"see {run_dir / 'run.log'}"
    if recipe.wait() != 0:
        failures["recipe"] = f"exit status {recipe.returncode} (see {recipe_dir / 'run.log'})"

    result = {
        "wall_s": round(time.perf_counter() - started, 1), "arguments": vars(args), "failures": failures,
        "recipe": json.loads((recipe_dir / "report.json").read_text()) if (recipe_dir / "report.json").is_file() else None,
        "phase1": {name: json_ready(run_summary(folder)) for name, folder in
                   [("recipe", recipe_dir / "phase1"), *((n, output / f"phase1_{n}") for n in phase1_runs)]
                   if (folder / "training_log.json").is_file()},
        "phase2": {name: summary(output / f"phase2_{name}") for name in phase2_runs
                   if (output / f"phase2_{name}" / "training_log.json").is_file()},
    }
    tmp = output / "summary.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, output / "summary.json")
    print(json.dumps(result, indent=2))
    if failures:
        sys.exit(f"failed: {failures}")


def _failure_of(function, name: str) -> str | None:
    try:
        function(name)
    except RuntimeError as error:
        return str(error)
    return None


if __name__ == "__main__":
    main()
