"""Phase-1 data: plain text -> cleaned documents -> GPT-2 tokens -> packed 256-token blocks, cached.

Design decisions:
- Sources are the Hub through `datasets.load_dataset` (default: Simple English Wikipedia) or local
  files read by `data.files`. Every record goes through `trm.rules` (its fields and its text) before
  anything else: phase 1 never sees instruction, Q&A or dialogue data, not even late in a file.
- Cleaning, tokenising and packing are `datasets.map` calls (batched, `num_proc` workers).
- Exact duplicates are dropped by a hash of the cleaned text; the train/validation split is made per
  document by the same hash, so it does not depend on file order and no document is in both splits.
- Documents are shuffled with the seed before the token budget (`max_train_tokens`, the user's 15–20M)
  is applied, so a capped run sees a sample of the whole corpus rather than its first articles.
- Each document ends with `<|endoftext|>`; blocks are cut `group_texts`-style with no padding. The
  tail of each map batch that does not fill a block is dropped and counted.
- The result is saved by `data.cache` under a key that hashes the data arguments, the input files
  (path, size, mtime), the tokenizer files and `PIPELINE_VERSION`, written to a temporary folder and
  renamed into place, so a second run starts at once and an interrupted one leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from data.cleaning import clean_text
from data.cache import fingerprint, load_prepared, save_prepared
from data.files import DataError, SkipCounter, read_records
from data.hub import HubSource, first_row, load_hub_dataset
from data.tokenizer import EOS_TOKEN_ID, load_tokenizer
from trm import rules

logger = logging.getLogger(__name__)
PIPELINE_VERSION = 3  # bump when a change alters the prepared blocks (2: tables, footnotes, appendices dropped; 3: gallery lines)


@dataclass
class PretrainingDataArguments:
    """Where phase-1 text comes from and how it is prepared (names follow Hugging Face's `run_clm.py`)."""

    dataset_name: str | None = field(default="wikimedia/wikipedia", metadata={"help": "Hub dataset of plain text."})
    dataset_config_name: str | None = field(default="20231101.simple", metadata={"help": "Hub dataset config."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Local .txt/.jsonl/.json/.parquet files (optionally .gz/.xz/.bz2/.zst); replaces the Hub dataset."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file; default: split off the training text."})
    text_column: str = field(default="text", metadata={"help": "Field holding the text in JSON/parquet records."})
    text_sample_by: str = field(default="auto", metadata={"help": ".txt layout: line, paragraph (blank-line separated) or auto."})
    max_train_tokens: int = field(default=20_000_000, metadata={"help": "Token budget of the training split."})
    max_eval_tokens: int = field(default=100_000, metadata={"help": "Token budget of the validation split."})
    validation_split_percentage: float = field(default=1.0, metadata={"help": "Share of documents held out for validation."})
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training block (the context length)."})
    min_document_chars: int = field(default=100, metadata={"help": "Cleaned documents shorter than this are dropped."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Worker processes; default: all cores."})
    data_cache_dir: str = field(default="cache/data", metadata={"help": "Where prepared datasets are kept."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Prepare again even if a cached copy exists."})


def _num_workers(args: PretrainingDataArguments) -> int:
    return max(1, args.preprocessing_num_workers or os.cpu_count() or 1)


def _load_local(paths: list[str], args: PretrainingDataArguments, skipped: SkipCounter) -> Dataset:
    texts: list[str] = []
    for path in paths:
        before = len(texts)
        for number, record in enumerate(read_records(path, skipped, args.text_sample_by), 1):
            rules.check_plain_text_record(record, f"{path} (record {number})")
            text = record.get(args.text_column)
            if isinstance(text, str):
                texts.append(text)
            else:
                skipped[f"records without a text field {args.text_column!r}"] += 1
        if len(texts) == before:
            found = f"skipped: {skipped.describe()}" if skipped else f"empty file, or no {args.text_column!r} field"
            raise DataError(f"{path}: no documents found ({found}).")
    return Dataset.from_dict({"text": texts})


def hub_source(args: PretrainingDataArguments) -> HubSource:
    return HubSource(args.dataset_name, args.dataset_config_name)


HUB_HINT = "pass local files with --train_file"


def _load_hub(args: PretrainingDataArguments) -> Dataset:
    rules.check_plain_text_hub_dataset(args.dataset_name)
    dataset = load_hub_dataset(hub_source(args), "train", HUB_HINT)
    rules.check_plain_text_record(dict.fromkeys(dataset.column_names), args.dataset_name)  # the schema of every row
    if args.text_column not in dataset.column_names:
        raise DataError(f"{args.dataset_name} has no {args.text_column!r} column (it has {dataset.column_names}).")
    dataset = dataset.select_columns([args.text_column])
    if args.text_column != "text":
        dataset = dataset.rename_column(args.text_column, "text")
    for start, batch in enumerate(dataset.iter(batch_size=1000)):
        for offset, text in enumerate(batch["text"]):
            if isinstance(text, str):
                rules.check_plain_text(text, f"{args.dataset_name} (row {start * 1000 + offset})")
    return dataset


def preflight_pretraining_sources(args: PretrainingDataArguments) -> None:
    """Open the configured text (local files or the Hub, streamed) and check its first record: plain text in the
    text column, under the phase-1 rules. Stops a broken source in seconds, before any preparation."""
    problems = []
    if args.train_file:
        for path in args.train_file:
            skipped = SkipCounter()
            try:
                record = next(iter(read_records(path, skipped, args.text_sample_by)), None)
            except DataError as error:
                problems.append(str(error))
                continue
            if record is None:
                problems.append(f"{path}: no documents found (skipped: {skipped.describe()}).")
                continue
            rules.check_plain_text_record(record, f"{path} (record 1)")
            if not isinstance(record.get(args.text_column), str):
                problems.append(f"{path}: its first record has no text field {args.text_column!r} (it has {sorted(record)}).")
    else:
        rules.check_plain_text_hub_dataset(args.dataset_name)
        try:
            row = first_row(hub_source(args), "train", HUB_HINT)
        except DataError as error:
            problems.append(str(error))
        else:
            rules.check_plain_text_record(dict.fromkeys(row), args.dataset_name)
            if not isinstance(row.get(args.text_column), str):
                problems.append(f"{args.dataset_name} has no {args.text_column!r} column (it has {sorted(row)}).")
    if problems:
        raise DataError("\n".join(problems))


def prepared_data_path(args: PretrainingDataArguments, seed: int) -> Path:
    """Where the prepared blocks of these settings are (or will be) kept."""
    settings = {k: v for k, v in asdict(args).items() if k not in ("preprocessing_num_workers", "data_cache_dir", "overwrite_cache")}
    paths = [*(args.train_file or []), *([args.validation_file] if args.validation_file else [])]
    return Path(args.data_cache_dir) / f"phase1-{fingerprint(PIPELINE_VERSION, settings, paths, seed)}"


def _clean_batch(batch: dict, min_chars: int) -> dict:
    texts = [clean_text(text or "") for text in batch["text"]]
    return {
        "text": texts,
        "digest": [hashlib.blake2b(t.encode(), digest_size=8).hexdigest() for t in texts],
        "keep": [len(t) >= min_chars for t in texts],
        "empty": [not t for t in texts],
    }


def _clean_and_dedupe(dataset: Dataset, args: PretrainingDataArguments, skipped: SkipCounter) -> Dataset:
    dataset = dataset.map(
        _clean_batch, batched=True, num_proc=_num_workers(args), fn_kwargs={"min_chars": args.min_document_chars},
        desc="Cleaning",
    )
    seen: set[str] = set()
    keep_indices = []
    for index, (digest, keep, empty) in enumerate(zip(dataset["digest"], dataset["keep"], dataset["empty"])):
        if empty:
            skipped["documents empty after cleaning"] += 1
        elif not keep:
            skipped[f"documents shorter than {args.min_document_chars} characters"] += 1
        elif digest in seen:
            skipped["exact duplicate documents"] += 1
        else:
            seen.add(digest)
            keep_indices.append(index)
    return dataset.select(keep_indices).remove_columns(["keep", "empty"])


def _tokenize_batch(batch: dict, tokenizer) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [doc + [EOS_TOKEN_ID] for doc in ids], "length": [len(doc) + 1 for doc in ids]}


def _group_texts(batch: dict, block_size: int) -> dict:
    flat = np.fromiter((t for doc in batch["input_ids"] for t in doc), dtype=np.int32)
    usable = len(flat) // block_size * block_size
    return {"input_ids": flat[:usable].reshape(-1, block_size)}


def _take_budget(dataset: Dataset, budget: int) -> tuple[Dataset, int]:
    """Keep whole documents in order until the token budget is reached; return them and how many were left out."""
    lengths = np.asarray(dataset["length"], dtype=np.int64)
    count = int(np.searchsorted(np.cumsum(lengths), budget, side="right"))
    return dataset.select(range(count)), len(dataset) - count


def _tokenize_and_pack(dataset: Dataset, budget: int, args: PretrainingDataArguments, split: str, stats: dict) -> Dataset:
    tokenizer = load_tokenizer(model_max_length=10**9)  # documents are longer than the context; packing cuts them
    workers = _num_workers(args)
    dataset = dataset.map(
        _tokenize_batch, batched=True, num_proc=workers, fn_kwargs={"tokenizer": tokenizer},
        remove_columns=dataset.column_names, desc=f"Tokenizing {split}",
    )
    dataset, over_budget = _take_budget(dataset, budget)
    tokens = int(np.sum(dataset["length"])) if len(dataset) else 0
    packed = dataset.map(
        _group_texts, batched=True, batch_size=2000, num_proc=workers, fn_kwargs={"block_size": args.block_size},
        remove_columns=dataset.column_names, desc=f"Packing {split}",
        features=Features({"input_ids": Sequence(Value("int32"))}),
    )
    stats[split] = {
        "documents": len(dataset), "documents_over_token_budget": over_budget, "tokens": tokens,
        "blocks": len(packed), "tokens_dropped_at_block_ends": tokens - len(packed) * args.block_size,
    }
    return packed


def _split_by_digest(dataset: Dataset, percentage: float) -> tuple[Dataset, Dataset]:
    threshold = percentage / 100.0
    is_validation = [int(d[:8], 16) / 0xFFFFFFFF < threshold for d in dataset["digest"]]
    train = [i for i, v in enumerate(is_validation) if not v]
    validation = [i for i, v in enumerate(is_validation) if v]
    return dataset.select(train), dataset.select(validation)


def prepare_pretraining_data(args: PretrainingDataArguments, seed: int = 42) -> tuple[DatasetDict, dict]:
    """Return the packed train/validation blocks and a statistics report, from cache when possible."""
    if args.block_size < 2:
        raise DataError(f"block_size must be at least 2, got {args.block_size}.")
    cache_path = prepared_data_path(args, seed)
    cached = None if args.overwrite_cache else load_prepared(cache_path)
    if cached:
        cached[1]["from_cache"] = cached[1]["cache_dir"] = str(cache_path)
        return cached
    preflight_pretraining_sources(args)

    started = time.time()
    skipped = SkipCounter()
    source = args.train_file or f"{args.dataset_name} ({args.dataset_config_name})"
    raw = _load_local(args.train_file, args, skipped) if args.train_file else _load_hub(args)
    documents_read = len(raw)
    cleaned = _clean_and_dedupe(raw, args, skipped).shuffle(seed=seed)
    if args.validation_file:
        validation_raw = _load_local([args.validation_file], args, skipped)
        train_docs, validation_docs = cleaned, _clean_and_dedupe(validation_raw, args, skipped)
    else:
        train_docs, validation_docs = _split_by_digest(cleaned, args.validation_split_percentage)
    if len(train_docs) == 0 or len(validation_docs) == 0:
        raise DataError(
            f"after cleaning, {len(train_docs)} training and {len(validation_docs)} validation documents remain "
            f"(skipped: {skipped.describe()}); give more text or a larger validation_split_percentage."
        )
    stats: dict = {"source": source, "documents_read": documents_read, "documents_kept": len(cleaned)}
    splits = DatasetDict(
        train=_tokenize_and_pack(train_docs, args.max_train_tokens, args, "train", stats),
        validation=_tokenize_and_pack(validation_docs, args.max_eval_tokens, args, "validation", stats),
    )
    if len(splits["train"]) == 0 or len(splits["validation"]) == 0:
        raise DataError(f"not enough text to fill one {args.block_size}-token block in each split ({len(splits['train'])} "
                        f"training and {len(splits['validation'])} validation blocks from {len(train_docs)} and "
                        f"{len(validation_docs)} documents); give more text or a larger validation_split_percentage.")
    stats["skipped"] = dict(skipped)
    stats["seconds"] = round(time.time() - started, 1)

    splits = save_prepared(splits, stats, cache_path)
    stats["cache_dir"] = str(cache_path)
    return splits, stats


def describe_stats(stats: dict) -> str:
    """A short human-readable data report for the log."""
    lines = [f"Data from {stats['source']}: {stats['documents_read']:,} documents read, {stats['documents_kept']:,} kept"]
    skipped = SkipCounter(stats.get("skipped", {}))
    lines.append(f"  skipped or dropped: {skipped.describe()}")
    for split in ("train", "validation"):
        s = stats[split]
        lines.append(
            f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens -> {s['blocks']:,} blocks "
            f"({s['documents_over_token_budget']:,} documents over the token budget, "
            f"{s['tokens_dropped_at_block_ends']:,} tokens dropped at block ends)"
        )
    if "from_cache" in stats:
        lines.append(f"  (prepared earlier in {stats['seconds']} s; reused from {stats['from_cache']})")
    else:
        lines.append(f"  prepared in {stats['seconds']} s")
    return "\n".join(lines)
