#!/usr/bin/env python
"""Evaluate a TRM model directory: perplexity / bits per byte, BLiMP, SQuAD v1.1 and v2.0, instruction following.

    python run_eval.py outputs/phase1 --text_file held_out.txt
    python run_eval.py outputs/phase1 --prepared_dir cache/data/phase1-<key>     # the prepared validation split
    python run_eval.py outputs/phase1 --blimp ../shared/data/blimp                # grammar: BLiMP minimal pairs
    python run_eval.py outputs/phase2 --squad_file dev-v1.1.json --squad_v2_file dev-v2.0.json --limit 500
    python run_eval.py outputs/phase2 --calibrate_no_answer dev-v2.0.json        # stores grounding.json
    python run_eval.py outputs/phase2                                             # the fixed instruction list

Prints a table and writes a JSON report (default: <model>/eval_report.json).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from data.files import DataError
from trm.blimp import blimp_evaluation
from trm.cli import run_main
from trm.evaluation import (
    WEIGHT_CHOICES, blocks_perplexity, calibrate_grounding, copying_loss, instruction_evaluation, squad_evaluation, text_blocks,
    weight_choices,
)
from trm.reading.grounded import GroundedSettings, add_weight_arguments, weight_overrides
from trm.model_card import add_results, evaluation_results
from trm.recipe import RecipeError
from trm.generation import load_model

DEFAULT_INSTRUCTIONS = Path(__file__).resolve().parent / "data" / "samples" / "eval_instructions.txt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path")
    parser.add_argument("--text_file", nargs="+", help="text files for perplexity (.txt/.jsonl/.json/.parquet, compressed too)")
    parser.add_argument("--prepared_dir", help="a prepared phase-1 dataset folder (cache/data/phase1-*)")
    parser.add_argument("--split", default="validation", help="split of --prepared_dir")
    parser.add_argument("--blimp", metavar="DIR", help="BLiMP: a directory of the authors' *.jsonl paradigm files, or hub (nyu-mll/blimp)")
    parser.add_argument("--blimp_pairs_per_paradigm", type=int, default=None, help="score a seeded sample of N pairs per paradigm")
    parser.add_argument("--squad_file", help="SQuAD v1.1 JSON (official layout), or hub: rajpurkar/squad validation")
    parser.add_argument("--squad_v2_file", help="SQuAD v2.0 JSON (official layout), or hub: rajpurkar/squad_v2 validation")
    parser.add_argument("--decoding", choices=("free", "grounded", "both"), default="both",
                        help="SQuAD answers generated freely, as passage spans (trm/reading/grounded.py), or both side by side")
    parser.add_argument("--calibrate_no_answer", metavar="SQUAD_V2_FILE",
                        help="calibrate grounded decoding on this file (its prior and proximity weights and length bonus, then "
                             "its no-answer threshold) and store them with the model")
    parser.add_argument("--calibration_min_no_answer", type=float, default=None,
                        help="calibrate for abstaining on at least this share of the unanswerable questions (e.g. 0.7, what "
                             "phase 2 stores) and answering as much as possible otherwise; default: the F1-optimal threshold")
    parser.add_argument("--no_answer_threshold", type=float, default=None,
                        help="override the stored threshold of grounded decoding")
    add_weight_arguments(parser)
    parser.add_argument("--instructions_file", default=None, help=f"one instruction per line (default: {DEFAULT_INSTRUCTIONS.name})")
    parser.add_argument("--limit", type=int, default=None, help="at most this many documents / questions per set")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="reply length for instructions (default: 128, or half the context if that is shorter)")
    parser.add_argument("--report", default=None, help="JSON report path (default: <model>/eval_report.json)")
    return parser.parse_args(argv)


def write_json_atomically(path: Path, payload: dict | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise RecipeError("--limit must be at least 1.")
    if args.blimp_pairs_per_paradigm is not None and args.blimp_pairs_per_paradigm < 1:
        raise RecipeError("--blimp_pairs_per_paradigm must be at least 1.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise RecipeError("--max_new_tokens must be at least 1.")
    model, tokenizer = load_model(args.model_name_or_path)
    block_size = int(model.config.n_positions)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(128, block_size // 2)
    if args.max_new_tokens >= block_size:
        raise RecipeError(f"--max_new_tokens must be below the model's context of {block_size} tokens.")
    report: dict = {"model": args.model_name_or_path}
    rows: list[tuple[str, str, str]] = []
    report_path = Path(args.report) if args.report else Path(args.model_name_or_path) / "eval_report.json"
    report["copying"] = copying_loss(model)
    rows += [("copying", "random tokens", f"{report['copying']['random_loss']:.3f}"),
             ("copying", "repeated tokens", f"{report['copying']['copy_loss']:.3f}")]

    if args.text_file:
        blocks, info = text_blocks(args.text_file, tokenizer, block_size, args.limit)
        report["text"] = {**blocks_perplexity(model, blocks, tokenizer), **info}
    if args.prepared_dir:
        from datasets import load_from_disk

        folder = Path(args.prepared_dir)
        dataset = load_from_disk(str(folder / "dataset" if (folder / "dataset").is_dir() else folder))[args.split]
        blocks = dataset["input_ids"][: args.limit] if args.limit else dataset["input_ids"]
        report["prepared"] = blocks_perplexity(model, [list(b) for b in blocks], tokenizer)
    write_json_atomically(report_path, report)  # after every section: a later crash keeps the finished ones
    for key in ("text", "prepared"):
        if key in report:
            r = report[key]
            rows += [(key, "perplexity", f"{r['perplexity']:.2f}"), (key, "bits per byte", f"{r['bits_per_byte']:.4f}"),
                     (key, "tokens", f"{r['tokens']:,}")]

    if args.blimp:
        report["blimp"] = blimp_evaluation(model, tokenizer, args.blimp, args.blimp_pairs_per_paradigm)
        write_json_atomically(report_path, report)
        rows += [("blimp", "mean of paradigms", f"{report['blimp']['mean']:.2f}"), ("blimp", "pairs", f"{report['blimp']['pairs']:,}")]
        rows += [("blimp", field, f"{accuracy:.2f}") for field, accuracy in report["blimp"]["fields"].items()]

    if args.calibrate_no_answer:
        settings = GroundedSettings.for_model(args.model_name_or_path)
        calibration = calibrate_grounding(model, tokenizer, args.calibrate_no_answer, args.limit, settings,
                                          args.calibration_min_no_answer, weight_choices(**weight_overrides(args)))
        settings = replace(settings, no_answer_threshold=calibration["no_answer_threshold"],
                           **{name: calibration[name] for name in WEIGHT_CHOICES})
        stored = settings.save(args.model_name_or_path)
        report["calibration"] = {**calibration, "file": args.calibrate_no_answer, "stored_in": str(stored)}
        rows += [("calibration", name.replace("_", " "), f"{calibration[name]:g}") for name in WEIGHT_CHOICES]
        rows += [("calibration", "threshold", f"{settings.no_answer_threshold:.3f}"),
                 ("calibration", "F1 at threshold", f"{calibration['f1_at_threshold']:.2f}")]
        write_json_atomically(report_path, report)

    decodings = ("free", "grounded") if args.decoding == "both" else (args.decoding,)
    for key, path in (("squad_v1.1", args.squad_file), ("squad_v2.0", args.squad_v2_file)):
        for decoding in decodings if path else ():
            # SQuAD v1.1 has no unanswerable questions: grounded decoding there always answers with a span.
            grounded = GroundedSettings.for_model(args.model_name_or_path, no_answer_threshold=args.no_answer_threshold,
                                                  allow_no_answer=key == "squad_v2.0", **weight_overrides(args))
            source = "squad_v2" if key == "squad_v2.0" else "squad"
            scores = squad_evaluation(model, tokenizer, path, args.limit, decoding, grounded, source=source)
            report[f"{key} {decoding}"] = scores
            write_json_atomically(report_path, report)
            for name in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "abstained", "answered_f1", "total"):
                if scores.get(name) is not None:
                    rows.append((f"{key} {decoding}", name, f"{scores[name]:.2f}" if name != "total" else str(scores[name])))

    if args.instructions_file or not (args.text_file or args.prepared_dir or args.squad_file or args.squad_v2_file
                                      or args.calibrate_no_answer or args.blimp):
        path = Path(args.instructions_file or DEFAULT_INSTRUCTIONS)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not valid UTF-8 at byte {error.start}.") from None
        instructions = [line.strip() for line in text.splitlines() if line.strip()]
        if not instructions:
            raise DataError(f"{path} holds no instructions; write one per line.")
        result = instruction_evaluation(model, tokenizer, instructions[: args.limit], args.max_new_tokens)
        report["instructions"] = result
        rows += [("instructions", "ended by itself", f"{result['ended_by_itself']:.1%}"),
                 ("instructions", "in format", f"{result['in_format']:.1%}"),
                 ("instructions", "count", str(result["instructions"]))]

    print(f"\n{'set':<20} {'metric':<16} {'value':>12}")
    for name, metric, value in rows:
        print(f"{name:<20} {metric:<16} {value:>12}")
    write_json_atomically(report_path, report)
    print(f"\nreport: {report_path}")
    try:
        if add_results(args.model_name_or_path, evaluation_results(report)):
            print(f"results added to the model card: {Path(args.model_name_or_path) / 'README.md'}")
    except OSError as error:
        print(f"the model card was not updated ({error.strerror}: {error.filename}).")
    return report


if __name__ == "__main__":
    run_main(main)
