#!/usr/bin/env python
"""Open-domain SQuAD: each question asked without its passage, answered from what the index retrieves.

    python benchmarks/open_domain_squad.py MODEL_DIR --squad_file unseen-v1.1.json --corpus wiki.jsonl.xz

The index (`--index`, built or extended here with the project's own indexer) holds the paragraphs of the
SQuAD file's articles and the `--corpus` documents as distractors. Reported:
- retrieval recall@1 / @k: a passage cut from the question's own paragraph is among the top 1 / k;
  answer recall@k: some top-k passage contains a gold answer string;
- end to end, EM / F1 of grounded answers (always a span: every SQuAD v1.1 question has an answer) for
  several ways of choosing among the k passages, and seconds per question on this machine. `run_ask`
  abstains when the model answers from none of the passages; its threshold is the one stored with the
  model (`grounding.json`, else 0), and an abstention scores 0 here. Also `run_ask` at fixed thresholds, and with
  `--recipe_thresholds REPORT` at the no-answer thresholds `benchmarks/grounded_squad.py` calibrated for NoAns >= 70%
  on the other articles' v2.0 questions (its report), the operating point a recipe-made model stores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.cleaning import clean_text  # noqa: E402
from data.files import load_json_document  # noqa: E402
from data.passages import split_passages  # noqa: E402
from run_eval import write_json_atomically  # noqa: E402
from trm.evaluation import best_f1, squad_questions  # noqa: E402
from trm.generation import load_model  # noqa: E402
from trm.reading.grounded import GroundedSettings, answer_from_passages  # noqa: E402
from trm.metrics.squad.squad import exact_match  # noqa: E402
from trm.reading.retrieval import PassageIndex  # noqa: E402

CHOOSERS = {  # each picks the reply from the grounded answers to the passages, best-ranked first
    "top-ranked passage, always a span": lambda answers, threshold: answers[0].span,
    "first passage in rank order the model answers (run_ask)": lambda answers, threshold: next(
        (a.span for a in answers if a.margin > threshold), ""),
    "largest margin over the no-answer reply": lambda answers, threshold: max(answers, key=lambda a: a.margin).span,
    "largest span score": lambda answers, threshold: max(answers, key=lambda a: a.span_score).span,
}


RANK_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 1e9)  # 1e9: BM25's order alone


def rank_and_margin(per_question: list[dict], questions: int) -> dict:
    """Choose the passage maximising `margin - weight * BM25 rank`, the weight fitted on the other half of the
    articles (two folds by title), so no question is scored with a weight chosen on its own article."""
    def pick(question: dict, weight: float) -> str:
        scored = [(m - weight * rank, span) for rank, (m, span) in enumerate(zip(question["margins"], question["spans"]))]
        return max(scored)[1] if scored else ""

    titles = sorted({q["title"] for q in per_question})
    folds = [{t for i, t in enumerate(titles) if i % 2 == k} for k in (0, 1)]
    em = f1 = 0.0
    weights = {}
    for k, fold in enumerate(folds):
        fit = [q for q in per_question if q["title"] not in fold]
        weight = max(RANK_WEIGHTS, key=lambda w: sum(best_f1(pick(q, w), q["answers"]) for q in fit))
        weights[" + ".join(sorted(fold))] = weight
        for q in per_question:
            if q["title"] in fold:
                chosen = pick(q, weight)
                em += max(exact_match(chosen, a) for a in q["answers"])
                f1 += best_f1(chosen, q["answers"])
    n = max(questions, 1)  # a question with no passage retrieved scores 0
    return {"exact": 100 * em / n, "f1": 100 * f1 / n, "weights": weights}


THRESHOLDS = (-1e9, -16.0, -12.0, -8.0, -4.0, -2.0, 0.0, 1.0, 2.0, 3.0, 4.0)  # -1e9: always answer, from the top passage


def run_ask_scores(per_question: list[dict], questions: int, threshold_of) -> dict:
    """`run_ask`'s rule (the first passage in BM25 order whose margin passes the question's threshold, else
    abstain): end-to-end EM / F1 and the share of questions answered."""
    em = f1 = answered = 0.0
    for q in per_question:
        chosen = next((span for span, margin in zip(q["spans"], q["margins"]) if margin > threshold_of(q)), "")
        answered += bool(chosen)
        em += max(exact_match(chosen, a) for a in q["answers"]) if chosen else 0.0
        f1 += best_f1(chosen, q["answers"]) if chosen else 0.0
    n = max(questions, 1)
    return {"exact": 100 * em / n, "f1": 100 * f1 / n, "answered": 100 * answered / n}


def recipe_thresholds(path: str) -> dict[str, float]:
    """Each article's NoAns >= 70% threshold from a `benchmarks/grounded_squad.py` report: the one calibrated on
    the other fold of articles."""
    try:
        calibrated = load_json_document(path)["v2.0"]["grounded, calibrated for NoAns >= 70% (cross-fitted by article)"]
    except (KeyError, TypeError):
        raise SystemExit(f"{path} holds no SQuAD v2.0 thresholds: run benchmarks/grounded_squad.py without --v1_only.") from None
    return {title: calibrated["thresholds"][str(fold)] for fold, titles in enumerate(calibrated["folds"]) for title in titles}


def index_squad_articles(index: PassageIndex, path: str, tokenizer) -> dict:
    document = load_json_document(path)
    stat = Path(path).stat()
    records = [{"title": article["title"].replace("_", " "), "text": paragraph["context"]}
               for article in document["data"] for paragraph in article["paragraphs"]]
    return index.add_records(f"squad:{Path(path).resolve()}", (stat.st_size, stat.st_mtime_ns), lambda skipped: iter(records),
                             tokenizer, "text", default_title="SQuAD")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path")
    parser.add_argument("--squad_file", required=True)
    parser.add_argument("--corpus", nargs="+", default=[], help="distractor documents (formats phase 1 reads)")
    parser.add_argument("--index", default="cache/open_domain.sqlite")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--recipe_thresholds", metavar="GROUNDED_SQUAD_REPORT",
                        help="also score run_ask at the NoAns >= 70%% thresholds of this benchmarks/grounded_squad.py report")
    parser.add_argument("--report", default="cache/open_domain_squad.json")
    args = parser.parse_args()
    by_title = recipe_thresholds(args.recipe_thresholds) if args.recipe_thresholds else None
    model, tokenizer = load_model(args.model_name_or_path)
    index = PassageIndex(args.index, create=True)
    for path in args.corpus:
        print(index.add_file(path, tokenizer)["status"], path, flush=True)
    print(index_squad_articles(index, args.squad_file, tokenizer)["status"], args.squad_file, f"- {len(index):,} passages", flush=True)
    settings = GroundedSettings.for_model(args.model_name_or_path)

    rows = squad_questions(args.squad_file, args.limit)
    if by_title and {row["title"] for row in rows} - by_title.keys():
        parser.error(f"{args.recipe_thresholds} has no threshold for {sorted({row['title'] for row in rows} - by_title.keys())}: "
                     "it must come from grounded_squad.py on the same articles")
    hits_1 = hits_k = answer_hits = 0
    totals = {name: [0.0, 0.0] for name in CHOOSERS}
    search_seconds = answer_seconds = 0.0
    examples, per_question, abstained = [], [], 0
    for row in rows:
        gold = index.passage_ids(split_passages(clean_text(row["context"]), tokenizer))
        started = time.perf_counter()
        passages = index.search(row["question"], args.top_k)
        search_seconds += time.perf_counter() - started
        ids = [p.id for p in passages]
        hits_1 += bool(ids[:1] and ids[0] in gold)
        hits_k += bool(gold & set(ids))
        answer_hits += any(a in p.text for p in passages for a in row["answers"])
        if not passages:
            continue
        started = time.perf_counter()
        answers = [answer_from_passages(model, tokenizer, [p.text], row["question"], settings) for p in passages]
        answer_seconds += time.perf_counter() - started
        answers = [a[1] for a in answers if a is not None]
        choices = {name: choose(answers, settings.no_answer_threshold) if answers else "" for name, choose in CHOOSERS.items()}
        abstained += choices["first passage in rank order the model answers (run_ask)"] == ""
        for name, chosen in choices.items():
            totals[name][0] += max(exact_match(chosen, a) for a in row["answers"])
            totals[name][1] += best_f1(chosen, row["answers"])
        per_question.append({"title": row["title"], "gold_rank": next((i for i, p in enumerate(ids) if p in gold), None),
                             "answers": row["answers"], "spans": [a.span for a in answers],
                             "margins": [round(a.margin, 4) for a in answers], "span_scores": [round(a.span_score, 4) for a in answers]})
        if len(examples) < 20:
            examples.append({"question": row["question"], "answers": row["answers"], "retrieved": [p.title for p in passages],
                             "gold_in_top_k": bool(gold & set(ids)), "replies": choices})
    combined = rank_and_margin(per_question, len(rows))
    thresholds = {f"{t:g}": run_ask_scores(per_question, len(rows), lambda q, t=t: t) for t in THRESHOLDS}
    if by_title:
        thresholds["recipe (NoAns >= 70%, calibrated on the other articles)"] = {
            **run_ask_scores(per_question, len(rows), lambda q: by_title[q["title"]]), "thresholds": by_title}
    passages_indexed = len(index)
    index.close()
    n = len(rows)
    report = {"model": args.model_name_or_path, "questions": n, "passages_indexed": passages_indexed, "top_k": args.top_k,
              "recall@1": 100 * hits_1 / n, f"recall@{args.top_k}": 100 * hits_k / n, f"answer_recall@{args.top_k}": 100 * answer_hits / n,
              "end_to_end": {name: {"exact": 100 * em / n, "f1": 100 * f1 / n} for name, (em, f1) in totals.items()},
              "run_ask_abstained": abstained, "rank_and_margin": combined, "run_ask_at_thresholds": thresholds,
              "seconds_per_question": {"search": search_seconds / n, "answer": answer_seconds / n}, "examples": examples,
              "per_question": per_question}
    write_json_atomically(Path(args.report), report)
    print(f"questions {n}: recall@1 {report['recall@1']:.1f}, recall@{args.top_k} {report[f'recall@{args.top_k}']:.1f}, "
          f"answer recall@{args.top_k} {report[f'answer_recall@{args.top_k}']:.1f}; "
          f"s/question: search {search_seconds / n:.3f}, answer {answer_seconds / n:.3f}")
    for name, scores in report["end_to_end"].items():
        print(f"  {name}: EM {scores['exact']:.1f} F1 {scores['f1']:.1f}")
    print(f"  BM25 rank and margin combined (weight fitted on the other articles): EM {combined['exact']:.1f} "
          f"F1 {combined['f1']:.1f}; weights chosen {combined['weights']}")
    print(f"  run_ask abstained on {abstained} of {n} questions")
    for threshold, scores in thresholds.items():
        print(f"  run_ask at no-answer threshold {threshold}: EM {scores['exact']:.1f} F1 {scores['f1']:.1f}, "
              f"{scores['answered']:.0f}% answered")
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
