#!/usr/bin/env python
"""Free generation vs grounded span decoding on SQuAD files a model never saw: scores and time per question.

    python benchmarks/grounded_squad.py MODEL_DIR --squad_file unseen-v1.1.json --squad_v2_file unseen-v2.0.json

- SQuAD v1.1: free greedy decoding vs grounded decoding that always answers with a span (no question is
  unanswerable there), with the mean seconds per question of each on this machine; with a prior weight, also
  the F1 at each combination of weights calibration chooses among (prior, proximity, length bonus), and at the
  combination chosen on the other half of the articles.
- SQuAD v2.0: free decoding; grounded with margin 0 (the likelier of best span and no-answer reply wins);
  grounded with the no-answer threshold calibrated the SQuAD 2.0 way (best F1), and calibrated for the
  best HasAns F1 that still abstains on >= 70% of unanswerable questions. Both are cross-fitted by
  article: the articles are split in two folds and each fold is scored with the threshold calibrated on
  the other, so no question is scored with a threshold that saw it.
Writes a JSON report; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prompt_format import NO_ANSWER_REPLY  # noqa: E402
from run_eval import write_json_atomically  # noqa: E402
from trm.evaluation import (  # noqa: E402
    best_f1, best_weights, free_squad_reply, grounded_squad_answers, grounded_squad_scores, span_f1_by_weights, squad_questions,
    weights_name,
)
from trm.generation import load_model  # noqa: E402
from trm.reading.grounded import WEIGHT_HELP, GroundedSettings, add_weight_arguments, calibrate_no_answer_threshold, weight_overrides  # noqa: E402
from trm.metrics.squad.squad import exact_match  # noqa: E402


def scores(predictions: list[str], rows: list[dict]) -> dict:
    """SQuAD v2.0-style EM/F1 (percent), overall and split by HasAns / NoAns."""
    def mean(values):
        return 100.0 * sum(values) / len(values) if values else None

    f1 = [best_f1(p, r["answers"]) if r["answers"] else float(not p) for p, r in zip(predictions, rows)]
    em = [max((exact_match(p, a) for a in r["answers"]), default=float(not p)) for p, r in zip(predictions, rows)]
    has = [bool(r["answers"]) for r in rows]
    return {"questions": len(rows), "exact": mean(em), "f1": mean(f1),
            "HasAns_f1": mean([x for x, h in zip(f1, has) if h]), "NoAns": mean([x for x, h in zip(f1, has) if not h])}


def timed(function, rows):
    started = time.perf_counter()
    results = [function(row) for row in rows]
    return results, (time.perf_counter() - started) / max(len(rows), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path")
    parser.add_argument("--squad_file", required=True)
    parser.add_argument("--squad_v2_file", required=True)
    parser.add_argument("--limit", type=int, default=None)
    add_weight_arguments(parser)
    parser.add_argument("--v1_only", action="store_true", help="SQuAD v1.1 only")
    parser.add_argument("--report", default="cache/grounded_squad.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model_name_or_path)
    settings = GroundedSettings.for_model(args.model_name_or_path, no_answer_threshold=0.0, **weight_overrides(args))
    report, table = {"model": args.model_name_or_path, "settings": vars(settings)}, []

    def free(row, may_abstain):
        reply = free_squad_reply(model, tokenizer, row, 32, may_abstain)[1]
        return "" if reply is None or reply == NO_ANSWER_REPLY else reply

    def grounded(row, allow_no_answer):
        answer = grounded_squad_answers(model, tokenizer, [row], GroundedSettings(**{**vars(settings), "allow_no_answer": allow_no_answer}))[0]
        return answer

    rows = squad_questions(args.squad_file, args.limit)
    free_predictions, free_seconds = timed(lambda row: free(row, False), rows)
    always = replace(settings, allow_no_answer=False)
    scored, grounded_seconds = timed(lambda row: grounded_squad_scores(model, tokenizer, [row], always)[0], rows)
    report["v1.1"] = {"free": {**scores(free_predictions, rows), "seconds_per_question": free_seconds},
                      "grounded": {**scores([s.answer(always).answer if s else "" for s in scored], rows),
                                   "seconds_per_question": grounded_seconds}}
    table += [("SQuAD v1.1", "free (greedy)", report["v1.1"]["free"]),
              ("SQuAD v1.1", f"grounded (always a span), {weights_name({n: getattr(settings, n) for n in WEIGHT_HELP})}",
               report["v1.1"]["grounded"])]
    kept = [(s, r) for s, r in zip(scored, rows) if s is not None]
    if settings.prior_weight and len({r["title"] for _, r in kept}) > 1:  # the rescored spans carry their priors:
        # every pair of weights can be judged from this one pass; choosing one needs other articles to choose it on
        report["v1.1"]["f1_by_weights"] = {weights_name(weights): f1 for weights, f1 in span_f1_by_weights(kept, settings)}
        titles = sorted({r["title"] for _, r in kept})
        folds = [set(titles[0::2]), set(titles[1::2])]
        chosen = {}
        for n, fold in enumerate(folds):  # as phase 2 calibrates them, on the other fold's questions
            chosen[n] = best_weights(span_f1_by_weights([(s, r) for s, r in kept if r["title"] not in fold], settings))
        fold_of = {t: n for n, fold in enumerate(folds) for t in fold}
        name = "grounded, weights chosen on the other articles"
        report["v1.1"][name] = {**scores([s.answer(replace(always, **chosen[fold_of[r["title"]]])).span for s, r in kept],
                                         [r for _, r in kept]),
                                "folds": [sorted(f) for f in folds], "weights": chosen}
        table.append(("SQuAD v1.1", f"{name} ({'; '.join(weights_name(weights) for weights in chosen.values())})", report["v1.1"][name]))

    if not args.v1_only:
        rows = squad_questions(args.squad_v2_file, args.limit, "squad_v2")
        free_predictions, free_seconds = timed(lambda row: free(row, True), rows)
        answers, grounded_seconds = timed(lambda row: grounded(row, True), rows)
        kept = [(a, r) for a, r in zip(answers, rows) if a is not None]
        titles = sorted({r["title"] for _, r in kept})
        folds = [set(titles[0::2]), set(titles[1::2])]
        fold_of = {t: n for n, fold in enumerate(folds) for t in fold}
        kept_rows = [r for _, r in kept]
        report["v2.0"] = {"free": {**scores(free_predictions, rows), "seconds_per_question": free_seconds},
                          "grounded, margin 0": {**scores([a.span if a.margin > 0 else "" for a, _ in kept], kept_rows),
                                                 "seconds_per_question": grounded_seconds}}
        names = ["free", "grounded, margin 0"]
        for name, min_no_answer in (("calibrated for F1", None), ("calibrated for NoAns >= 70%", 0.7)):
            thresholds = {}
            for number, fold in enumerate(folds):  # each fold gets the threshold calibrated on the other fold
                others = [(a, r) for a, r in kept if r["title"] not in fold]
                thresholds[number] = calibrate_no_answer_threshold(
                    [a.margin for a, _ in others], [best_f1(a.span, r["answers"]) for a, r in others],
                    [bool(r["answers"]) for _, r in others], min_no_answer)[0]
            predictions = [a.span if a.margin > thresholds[fold_of[r["title"]]] else "" for a, r in kept]
            name = f"grounded, {name} (cross-fitted by article)"
            report["v2.0"][name] = {**scores(predictions, kept_rows), "folds": [sorted(f) for f in folds], "thresholds": thresholds}
            names.append(name)
        report["v2.0"]["questions_too_long"] = len(rows) - len(kept)
        report["v2.0"]["per_question"] = [{"title": r["title"], "has_answer": bool(r["answers"]), "margin": a.margin,
                                           "span_f1": best_f1(a.span, r["answers"]) if r["answers"] else None} for a, r in kept]
        table += [("SQuAD v2.0", name, report["v2.0"][name]) for name in names]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(Path(args.report), report)

    def cell(value):
        return "-" if value is None else f"{value:.1f}"

    print("| set | decoding | questions | EM | F1 | HasAns F1 | NoAns | s/question |\n|---|---|---|---|---|---|---|---|")
    for name, decoding, s in table:
        seconds = f"{s['seconds_per_question']:.3f}" if "seconds_per_question" in s else "-"
        print(f"| {name} | {decoding} | {s['questions']} | {cell(s['exact'])} | {cell(s['f1'])} | {cell(s['HasAns_f1'])} "
              f"| {cell(s['NoAns'])} | {seconds} |")
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
