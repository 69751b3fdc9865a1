"""The whole recipe in one command: phase 1, its evaluation, phase 2, its evaluation, one report.

Design decisions:
- Each stage is the command a user would type (`run_clm.py`, `run_eval.py`, `run_sft.py`), run as a child
  process: the stages share nothing in memory, a GPU run is the same command with `--use_cpu false`, and
  what the report says can be reproduced stage by stage.
- Before anything starts, every data source still to be prepared is opened (`preflight`): a broken phase-2
  source stops the recipe in seconds instead of after phase 1.
- Resumable at every stage: a training stage is done once its final model directory holds
  `training_log.json` (written last, atomically); until then it is started again with `--resume`, which
  continues from its newest complete checkpoint. An evaluation stage is done once its report is stored in
  `<output_dir>/stages/`. Running the same command again skips what is done.
- The report (`report.json` and `report.md` in `output_dir`) holds held-out loss and bits per byte, the
  copying probe, BLiMP (from the Hub unless a directory is given), SQuAD v1.1 / v2.0 (free and grounded decoding), the share of replies that end by
  themselves, and each phase's tokens/s and wall time. Numbers come from the stages' own logs and
  reports, never recomputed here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from transformers import TrainingArguments

from data.files import DataError
from data.pretraining import PretrainingDataArguments, prepare_pretraining_data, prepared_data_path, preflight_pretraining_sources
from data.sft import SftDataArguments, preflight_sft_sources
from data.sft import prepared_data_path as sft_prepared_data_path
from trm.blimp import check_blimp_source
from trm.recipe import parse_recipe
from trm.training import ModelArguments

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FullRecipe:
    output_dir: Path
    phase1_recipe: str = "recipes/phase1_pretraining.yaml"
    phase2_recipe: str = "recipes/phase2_instruction_tuning.yaml"
    phase1_args: list[str] = field(default_factory=list)
    phase2_args: list[str] = field(default_factory=list)
    squad_file: str | None = None
    squad_v2_file: str | None = None
    blimp: str | None = "hub"
    blimp_pairs_per_paradigm: int | None = None
    eval_limit: int | None = None

    @property
    def phase1_dir(self) -> Path:
        return self.output_dir / "phase1"

    @property
    def phase2_dir(self) -> Path:
        return self.output_dir / "phase2"


def _run(command: list[str]) -> float:
    """Run one stage as a child process; its wall time in seconds. A failing stage stops the recipe."""
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"stage failed (exit status {result.returncode}): {shlex.join(command)}; "
                         "fix the cause and run the same command again to continue from there.")
    return time.perf_counter() - start


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    _write_text(path, json.dumps(payload, indent=2))


def _train(script: str, recipe: str, output: Path, extra: list[str], stages: Path) -> dict:
    """A training stage (skipped when its model is complete); returns its log summary and wall time."""
    timing = stages / f"{output.name}_time.json"
    if not _finished(output):
        seconds = _run([sys.executable, script, recipe, *extra, "--output_dir", str(output), "--resume"])
        previous = json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else 0.0
        _write_json(timing, {"wall_seconds": previous + seconds})
    history = json.loads((output / "training_log.json").read_text(encoding="utf-8"))
    summary = next((r for r in reversed(history) if "train_runtime" in r and "train_loss" in r), {})
    evaluation = next((r for r in reversed(history) if "eval_loss" in r), {})
    tokens = summary.get("num_input_tokens_seen") or evaluation.get("num_input_tokens_seen")
    return {
        "validation_loss": evaluation.get("eval_loss"), "copy_loss": evaluation.get("eval_copy_loss"),
        "steps": summary.get("step"), "epochs": summary.get("epoch"), "tokens_seen": tokens,
        "train_runtime_s": summary.get("train_runtime"),
        "tokens_per_second": tokens / summary["train_runtime"] if tokens and summary.get("train_runtime") else None,
        "wall_s": json.loads(timing.read_text())["wall_seconds"] if timing.is_file() else None,
        "eval_curve": [(r.get("num_input_tokens_seen"), r["eval_loss"]) for r in history if "eval_loss" in r],
    }


def _evaluate(name: str, model: Path, arguments: Callable[[], list[str]], stages: Path) -> dict:
    """An evaluation stage (skipped when its report is stored; its arguments are only worked out when it runs)."""
    stored = stages / f"{name}.json"
    if not stored.is_file():
        report_path = stages / f"{name}.running.json"
        seconds = _run([sys.executable, "run_eval.py", str(model), *arguments(), "--report", str(report_path)])
        report = json.loads(report_path.read_text(encoding="utf-8"))
        _write_json(stored, {**report, "wall_s": seconds})
        report_path.unlink()
    return json.loads(stored.read_text(encoding="utf-8"))


def _phase1_settings(recipe: FullRecipe):
    return parse_recipe((ModelArguments, PretrainingDataArguments, TrainingArguments),
                        [recipe.phase1_recipe, *recipe.phase1_args, "--output_dir", str(recipe.phase1_dir)])


def prepared_validation_dir(recipe: FullRecipe) -> str:
    """The folder of phase 1's prepared data (its validation split is the held-out text)."""
    _, data_args, training_args = _phase1_settings(recipe)
    _, stats = prepare_pretraining_data(data_args, seed=training_args.seed)  # after phase 1: from its cache
    return stats["cache_dir"]


def _finished(model_dir: Path) -> bool:
    return (model_dir / "training_log.json").is_file()


def preflight(recipe: FullRecipe) -> None:
    """Open every source of both phases that is still to be prepared, before phase 1 starts: a broken phase-2
    source must stop the recipe in seconds, not after a 4-8 hour phase 1."""
    problems = []
    if recipe.blimp and not (recipe.output_dir / "stages" / "phase1_eval.json").is_file():
        try:
            check_blimp_source(recipe.blimp)
        except DataError as error:
            problems.append(f"BLiMP: {error}")
    if not _finished(recipe.phase1_dir):
        _, data_args, training_args = _phase1_settings(recipe)
        if not prepared_data_path(data_args, training_args.seed).is_dir():
            try:
                preflight_pretraining_sources(data_args)
            except DataError as error:
                problems.append(f"phase 1: {error}")
    if not _finished(recipe.phase2_dir):
        _, sft_args, training_args = parse_recipe(
            (ModelArguments, SftDataArguments, TrainingArguments),
            [recipe.phase2_recipe, "--model_name_or_path", str(recipe.phase1_dir), *recipe.phase2_args,
             "--output_dir", str(recipe.phase2_dir)])
        if not sft_prepared_data_path(sft_args, training_args.seed).is_dir():
            try:
                preflight_sft_sources(sft_args)
            except DataError as error:
                problems.append(f"phase 2: {error}")
    if problems:
        raise DataError("a data source cannot be used, so nothing was started:\n" + "\n".join(problems))


def run(recipe: FullRecipe) -> dict:
    stages = recipe.output_dir / "stages"
    stages.mkdir(parents=True, exist_ok=True)  # also when a stage finished without this process (killed meanwhile)
    preflight(recipe)
    limit = ["--limit", str(recipe.eval_limit)] if recipe.eval_limit else []
    report: dict = {"phase1": _train("run_clm.py", recipe.phase1_recipe, recipe.phase1_dir, recipe.phase1_args, stages)}
    blimp = [*(["--blimp", recipe.blimp] if recipe.blimp else []),
             *(["--blimp_pairs_per_paradigm", str(recipe.blimp_pairs_per_paradigm)] if recipe.blimp_pairs_per_paradigm else [])]
    phase1_eval = _evaluate("phase1_eval", recipe.phase1_dir,
                            lambda: ["--prepared_dir", prepared_validation_dir(recipe), *blimp, *limit], stages)
    report["phase1"].update(bits_per_byte=phase1_eval["prepared"]["bits_per_byte"],
                            held_out_loss=phase1_eval["prepared"]["loss"], held_out_tokens=phase1_eval["prepared"]["tokens"],
                            copying=phase1_eval["copying"])
    if "blimp" in phase1_eval:
        report["phase1"]["blimp"] = {key: phase1_eval["blimp"][key] for key in ("mean", "fields", "pairs")}

    phase2_args = ["--model_name_or_path", str(recipe.phase1_dir), *recipe.phase2_args]
    report["phase2"] = _train("run_sft.py", recipe.phase2_recipe, recipe.phase2_dir, phase2_args, stages)
    squad = [*(["--squad_file", recipe.squad_file] if recipe.squad_file else []),
             *(["--squad_v2_file", recipe.squad_v2_file] if recipe.squad_v2_file else [])]
    phase2_eval = _evaluate("phase2_eval", recipe.phase2_dir,
                            lambda: [*squad, "--instructions_file", str(default_instructions()), *limit], stages)
    report["phase2"].update(copying=phase2_eval["copying"], instructions={
        key: phase2_eval["instructions"][key] for key in ("ended_by_itself", "in_format", "instructions")})
    report["squad"] = {key: {k: v for k, v in value.items() if k != "examples"}
                       for key, value in phase2_eval.items() if key.startswith("squad_")}
    _write_json(recipe.output_dir / "report.json", report)
    markdown = render_markdown(report)
    _write_text(recipe.output_dir / "report.md", markdown)
    print(markdown)
    return report


def default_instructions() -> Path:
    return ROOT / "data" / "samples" / "eval_instructions.txt"


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_markdown(report: dict) -> str:
    phase1, phase2 = report["phase1"], report["phase2"]
    rows = [
        ("phase 1", "validation loss (nats/token)", _number(phase1["validation_loss"])),
        ("phase 1", "held-out bits per byte", _number(phase1["bits_per_byte"], 4)),
        ("phase 1", "copy probe: random / repeated tokens", f"{phase1['copying']['random_loss']:.2f} / {phase1['copying']['copy_loss']:.2f}"),
        *([("phase 1", f"BLiMP, mean of paradigms ({phase1['blimp']['pairs']:,} pairs)", f"{phase1['blimp']['mean']:.1f}")]
          if phase1.get("blimp") else []),
        ("phase 1", "tokens trained", f"{phase1['tokens_seen']:,}" if phase1["tokens_seen"] else "-"),
        ("phase 1", "tokens/s (training)", _number(phase1["tokens_per_second"], 0)),
        ("phase 1", "wall time (s)", _number(phase1["wall_s"], 0)),
        ("phase 2", "validation loss (reply tokens)", _number(phase2["validation_loss"])),
        ("phase 2", "replies ending by themselves", f"{phase2['instructions']['ended_by_itself']:.1%}"),
        ("phase 2", "tokens/s (training)", _number(phase2["tokens_per_second"], 0)),
        ("phase 2", "wall time (s)", _number(phase2["wall_s"], 0)),
    ]
    for key, scores in report["squad"].items():
        metrics = ["exact", "f1"] + [m for m in ("HasAns_f1", "NoAns_f1", "abstained") if scores.get(m) is not None]
        rows.append((key, ", ".join(metrics), " / ".join(f"{scores[m]:.1f}" for m in metrics)))
    lines = ["| stage | measure | value |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"
