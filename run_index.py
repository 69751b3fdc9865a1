#!/usr/bin/env python
"""Build or extend a passage index for retrieval (SQLite FTS5, BM25) from the file formats phase 1 reads.

    python run_index.py --corpus my_notes.txt wiki.jsonl.xz [--index cache/index.sqlite]
    python run_index.py                                   # the phase-1 recipe's corpus (train_file, or its Hub dataset)

Indexing the same files again adds nothing; a changed file is re-indexed; an interrupted build leaves a
usable index and the next run finishes it.
"""

from __future__ import annotations

import argparse
import logging

from data.files import DataError
from data.tokenizer import load_tokenizer
from trm.cli import run_main
from trm.recipe import read_recipe
from trm.reading.retrieval import PassageIndex

logger = logging.getLogger("run_index")
PHASE1_RECIPE = "recipes/phase1_pretraining.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", help="text files to index (default: the corpus of --recipe)")
    parser.add_argument("--recipe", default=PHASE1_RECIPE, help="phase-1 recipe whose corpus is indexed when --corpus is not given")
    parser.add_argument("--text_column", default="text", help="field holding the text in JSON/parquet records")
    parser.add_argument("--index", default="cache/index.sqlite", help="the index file (created if missing)")
    return parser.parse_args(argv)


def _hub_source(recipe: dict, index: PassageIndex, tokenizer, text_column: str) -> dict:
    from datasets import load_dataset

    name, config = recipe.get("dataset_name"), recipe.get("dataset_config_name")
    if not name:
        raise DataError("the recipe names no corpus (train_file or dataset_name); pass files with --corpus (CORPUS=...).")
    try:
        dataset = load_dataset(name, config, split="train")
    except Exception as error:  # the datasets library raises many types for network/Hub failures
        raise DataError(f"could not load {name} ({config}) from the Hugging Face Hub ({type(error).__name__}); "
                        "if you are offline, index local files with --corpus (CORPUS=...).") from None
    version = (len(dataset), 0)  # a Hub split has no mtime: its row count stands in
    return index.add_records(f"hub:{name}/{config}", version, lambda skipped: iter(dataset), tokenizer, text_column,
                             default_title=name)


def _log(result: dict) -> None:
    details = ""
    if result["status"] == "indexed":
        details = f": {result['passages']:,} passages added, {result['duplicates']:,} already in the index"
        if result["skipped"]:
            details += f" (skipped: {result['skipped'].describe()})"
    logger.info("%s %s%s", result["source"], result["status"], details)


def main(argv=None) -> dict:
    args = parse_args(argv)
    recipe = read_recipe(args.recipe) if not args.corpus else {}
    corpus = args.corpus or recipe.get("train_file")
    corpus = [corpus] if isinstance(corpus, str) else corpus
    tokenizer = load_tokenizer()
    index = PassageIndex(args.index, create=True)
    results = []
    try:
        for path in corpus or [None]:
            results.append(index.add_file(path, tokenizer, args.text_column) if path
                           else _hub_source(recipe, index, tokenizer, args.text_column))
            _log(results[-1])
        logger.info("index %s holds %s passages", args.index, f"{len(index):,}")
    finally:
        index.close()
    return {"index": args.index, "files": results}


if __name__ == "__main__":
    run_main(main)
