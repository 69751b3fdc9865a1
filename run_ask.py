#!/usr/bin/env python
"""Ask a question of your own corpus: retrieve passages from the index, answer from them, show the source.

    python run_ask.py outputs/phase2 "What is the capital of France?" [--index cache/index.sqlite] [--top_k 5]
    python run_ask.py outputs/phase2 "..." --json            # one JSON object, for scripts

The answer is a span of a retrieved passage (grounded decoding, trm/reading/grounded.py) or the no-answer reply.
"""

from __future__ import annotations

import argparse
import json

from data.files import checked_text
from trm.cli import run_main
from trm.generation import load_model
from trm.reading.grounded import GroundedSettings, add_weight_arguments, weight_overrides
from trm.recipe import RecipeError
from trm.reading.retrieval import PassageIndex, RetrievedAnswer, ask


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path", help="model directory written by run_sft.py")
    parser.add_argument("question")
    parser.add_argument("--index", default="cache/index.sqlite", help="passage index built by run_index.py")
    parser.add_argument("--top_k", type=int, default=5, help="passages retrieved and answered from")
    parser.add_argument("--no_answer_threshold", type=float, default=None, help="override the threshold stored with the model")
    add_weight_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def describe(result: RetrievedAnswer) -> str:
    if result.passage is None:
        return f"{result.answer}\n(no passage in the index shares a word with the question)"
    source = f"[{result.passage.title}] {result.passage.text}"
    if not result.answered:
        return f"{result.answer}\n(closest passage: {source})"
    return f"{result.answer}\n\nsource: {source}"


def main(argv=None) -> RetrievedAnswer:
    args = parse_args(argv)
    checked_text(args.question, "the question")
    if args.top_k < 1:
        raise RecipeError("--top_k must be at least 1.")
    index = PassageIndex(args.index, read_only=True)
    model, tokenizer = load_model(args.model_name_or_path)
    settings = GroundedSettings.for_model(args.model_name_or_path, no_answer_threshold=args.no_answer_threshold,
                                          **weight_overrides(args))
    try:
        result = ask(model, tokenizer, index, args.question, settings, args.top_k)
    finally:
        index.close()
    print(json.dumps(result.as_dict(), ensure_ascii=False, indent=2) if args.json else describe(result))
    return result


if __name__ == "__main__":
    run_main(main)
