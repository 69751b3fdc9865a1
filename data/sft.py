"""Phase-2 data: conversations -> prompt format -> token ids with label masks, balanced across sources.

Design decisions:
- One rendering (`data.prompt_format.render`) and one tokenisation of the whole text; a token carries a
  label when its first character lies inside an assistant span, so exactly the reply tokens and their
  closing `<|endoftext|>` are learned and every prompt token has label -100.
- No packing: each example is its own row, padded per batch (`DataCollatorForSeq2Seq`, labels padded
  with -100) and batched by length (`train_sampling_strategy: group_by_length`), so attention never
  crosses examples and padding waste stays small.
- Nothing is cut silently. A SQuAD passage too long for the context is windowed around the answer (or
  from the start, for unanswerable questions) so the answer stays inside; a dialogue too long keeps its
  leading exchanges; an example that cannot fit is dropped. Every such case is counted per source.
- Validation: a hash of each example's group picks `validation_split_percentage` of groups per source,
  capped at `validation_max_examples`; at least one group per source is held out. SQuAD is split by article,
  and up to `calibration_max_questions` held-out SQuAD v2.0 questions are kept whole (passage, question,
  answers) for calibrating the no-answer threshold at the end of training.
- Balancing: each source's training examples are capped (`<source>_max_examples`, a seeded sample,
  filled with examples that fit the context); the defaults keep the 10x larger SQuAD from swamping
  DailyDialog and Alpaca. A source left with no example that fits is an error naming the reason. The
  final mix (examples, tokens, label tokens per source) is returned for the run to print.
- `fill_train_hours` prepares every source uncapped once, each training row marked with the questions before it
  in its source's seeded order; `within_caps` then keeps exactly the rows a capped preparation would keep, for
  whatever caps the time budget affords (`trm.time_budget`), without preparing again.
- Prepared once per settings (`data.cache`, like phase 1); before preparing, every source is opened and its
  first record read (`preflight_sft_sources`), so a broken source stops the run in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets

from data.cache import fingerprint, load_prepared, save_prepared
from data.files import DataError, SkipCounter
from data.instruction_sources import Conversation, load_source
from data.prompt_format import (
    ABSTAIN_INSTRUCTION, ANSWER_INSTRUCTION, DEFAULT_SQUAD_LAYOUT, NO_ANSWER_REPLY, SQUAD_LAYOUTS, reading_comprehension_message,
    render,
)

logger = logging.getLogger(__name__)
SOURCES = ("alpaca", "squad", "squad_v2", "dailydialog", "chat")
PIPELINE_VERSION = 3  # bump when a change alters the prepared examples
IGNORE_INDEX = -100


@dataclass
class SftDataArguments:
    """Phase-2 sources (a local path, `hub`, or empty to leave a source out) and how they are mixed."""

    alpaca_file: str | None = field(default=None, metadata={"help": "Alpaca JSON list (or a parquet/JSONL export of tatsu-lab/alpaca), or 'hub'."})
    squad_file: str | None = field(default=None, metadata={"help": "SQuAD v1.1 official JSON (or a parquet/JSONL export of rajpurkar/squad), or 'hub'."})
    squad_v2_file: str | None = field(default=None, metadata={"help": "SQuAD v2.0 official JSON (or a parquet/JSONL export of rajpurkar/squad_v2), or 'hub'."})
    dailydialog_file: str | None = field(default=None, metadata={"help": "DailyDialog dialogues_*.txt (or rows with a dialog list), or 'hub'."})
    chat_file: str | None = field(default=None, metadata={"help": "Chat JSONL with a 'messages' list per line."})
    alpaca_max_examples: int | None = field(default=20_000, metadata={"help": "Training cap for Alpaca."})
    squad_max_examples: int | None = field(default=10_000, metadata={"help": "Training cap for SQuAD v1.1."})
    squad_v2_max_examples: int | None = field(default=10_000, metadata={"help": "Training cap for SQuAD v2.0."})
    dailydialog_max_examples: int | None = field(default=12_000, metadata={"help": "Training cap for DailyDialog."})
    chat_max_examples: int | None = field(default=None, metadata={"help": "Training cap for chat JSONL."})
    validation_split_percentage: float = field(default=5.0, metadata={"help": "Share of groups held out per source."})
    validation_max_examples: int = field(default=200, metadata={"help": "Validation cap per source."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per example (the context length)."})
    squad_layout: str = field(default=DEFAULT_SQUAD_LAYOUT, metadata={"help": f"Reading-comprehension prompt layout: {' | '.join(SQUAD_LAYOUTS)}; stored with the model."})
    squad_v2_max_unanswerable: int | None = field(default=None, metadata={"help": "Training cap on SQuAD v2.0 questions without an answer (the held-out split keeps them all)."})
    squad_group_by_passage: bool = field(default=False, metadata={"help": "One example per SQuAD passage: the passage once, then its questions as turns, loss on every answer (not yet measured at full length)."})
    squad_abstain_instruction: bool = field(default=True, metadata={"help": "SQuAD v2.0 prompts say the passage may not hold the answer (v1.1 prompts do not); stored with the model."})
    squad_v2_drop_v1_duplicates: bool = field(default=False, metadata={"help": "Leave out SQuAD v2.0 questions that SQuAD v1.1 also has (its answerable ones)."})
    calibration_min_no_answer: float | None = field(default=0.7, metadata={"help": "The stored no-answer threshold abstains on at least this share of the held-out unanswerable questions and answers as much as it can otherwise; null: the threshold that maximises SQuAD v2.0 F1 (for a weak model: abstain almost always)."})
    fill_train_hours: bool = field(default=False, metadata={"help": "With train_hours: raise every source's cap by one common factor (never past what a source has) until the epochs fill the time budget, at a pace measured on this machine before training; the caps are kept for --resume."})
    calibration_max_questions: int = field(default=400, metadata={"help": "Held-out SQuAD v2.0 questions (articles never trained on) the no-answer threshold is calibrated on at the end of training; 0: none."})
    data_cache_dir: str = field(default="cache/data", metadata={"help": "Where prepared datasets are kept."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Prepare again even if a cached copy exists."})


def _hash_fraction(key: str) -> float:
    return int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), 16) / 2**64


def encode_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation: labels are the ids on assistant replies, -100 elsewhere."""
    text, spans = render(messages)
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    labels = []
    for token, (start, _end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        inside = any(span_start <= start < span_end for span_start, span_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return encoding["input_ids"], labels


def fit_passage(passage: str, question: str, reply: str, tokenizer, max_length: int, anchor: int | None,
                layout: str = DEFAULT_SQUAD_LAYOUT, instruction: str = ANSWER_INSTRUCTION) -> str | None:
    """The longest window of `passage` (around character `anchor`, else from the start) that fits with the question and reply."""
    def length(text: str) -> int:
        messages = [{"role": "user", "content": reading_comprehension_message(text, question, layout, instruction)},
                    {"role": "assistant", "content": reply}]
        return len(tokenizer(render(messages)[0], add_special_tokens=False)["input_ids"])

    if length(passage) <= max_length:
        return passage
    budget = max_length - length("")
    offsets = tokenizer(passage, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    while budget > 0:
        if anchor is None:
            first = 0
        else:
            anchor_token = next((i for i, (s, e) in enumerate(offsets) if e > anchor), len(offsets) - 1)
            first = max(0, min(anchor_token - budget // 2, len(offsets) - budget))
        last = min(len(offsets), first + budget)
        window = passage[offsets[first][0]:offsets[last - 1][1]]
        answer_inside = anchor is None or offsets[first][0] <= anchor < offsets[last - 1][1]
        if answer_inside and length(window) <= max_length:
            return window
        budget -= 8  # re-tokenising a window can add a few tokens at its edges
    return None


def _reply(conversation: Conversation) -> str:
    return conversation.answers[0] if conversation.answers else NO_ANSWER_REPLY


def _reply_and_passage(conversation: Conversation, tokenizer, max_length: int, counts: SkipCounter, layout: str,
                       abstain_instruction: bool) -> list[dict] | None:
    reply = _reply(conversation)
    instruction = ABSTAIN_INSTRUCTION if abstain_instruction and conversation.source == "squad_v2" else ANSWER_INSTRUCTION
    passage = fit_passage(conversation.passage, conversation.question, reply, tokenizer, max_length, conversation.answer_start,
                          layout, instruction)
    if passage is None:
        counts["dropped: question and answer alone exceed the context"] += 1
        return None
    if passage != conversation.passage:
        counts["shortened: passage windowed around the answer"] += 1
    return [
        {"role": "user", "content": reading_comprehension_message(passage, conversation.question, layout, instruction)},
        {"role": "assistant", "content": reply},
    ]


def _fit_dialogue(messages: list[dict], tokenizer, max_length: int, counts: SkipCounter) -> tuple[list[int], list[int]] | None:
    kept = list(messages)
    while kept:
        ids, labels = encode_messages(kept, tokenizer)
        if len(ids) <= max_length:
            if len(kept) < len(messages):
                counts["shortened: trailing turns dropped to fit the context"] += 1
            return ids, labels
        kept = kept[:-2] if len(kept) > 2 else []
    counts["dropped: first exchange alone exceeds the context"] += 1
    return None


def encode_conversation(conversation: Conversation, tokenizer, max_length: int, counts: SkipCounter,
                        layout: str = DEFAULT_SQUAD_LAYOUT, abstain_instruction: bool = True) -> dict | None:
    messages = conversation.messages
    if conversation.passage is not None:
        messages = _reply_and_passage(conversation, tokenizer, max_length, counts, layout, abstain_instruction)
        if messages is None:
            return None
    fitted = _fit_dialogue(messages, tokenizer, max_length, counts)
    if fitted is None:
        return None
    ids, labels = fitted
    return {"input_ids": ids, "labels": labels, "length": len(ids), "source": conversation.source}


def encode_passage_questions(questions: list[Conversation], tokenizer, max_length: int, counts: SkipCounter,
                             layout: str = DEFAULT_SQUAD_LAYOUT, abstain_instruction: bool = True) -> list[tuple[dict, int]]:
    """The questions of one passage as few examples as the context allows: the passage once (windowed around the
    first question's answer if it is too long), that question and its answer, then every other question whose
    answer lies inside the window as a further turn (`Question: ...`), while the turns fit. The questions left
    over start another example. Returns (row, questions in it) pairs; every answer stays inside its window."""
    rows, pending = [], list(questions)
    while pending:
        first, rest = pending[0], pending[1:]
        instruction = ABSTAIN_INSTRUCTION if abstain_instruction and first.source == "squad_v2" else ANSWER_INSTRUCTION
        window = fit_passage(first.passage, first.question, _reply(first), tokenizer, max_length, first.answer_start, layout, instruction)
        if window is None:
            counts["dropped: question and answer alone exceed the context"] += 1
            pending = rest
            continue
        start = first.passage.find(window)
        messages = [{"role": "user", "content": reading_comprehension_message(window, first.question, layout, instruction)},
                    {"role": "assistant", "content": _reply(first)}]
        deferred = []
        for other in rest:
            inside = not other.answers or start <= other.answer_start <= other.answer_start + len(other.answers[0]) <= start + len(window)
            turns = [{"role": "user", "content": f"Question: {other.question}"}, {"role": "assistant", "content": _reply(other)}]
            if inside and len(encode_messages(messages + turns, tokenizer)[0]) <= max_length:
                messages += turns
            else:
                deferred.append(other)
        if window != first.passage:
            counts["shortened: passage windowed around the answer"] += 1
        ids, labels = encode_messages(messages, tokenizer)
        rows.append(({"input_ids": ids, "labels": labels, "length": len(ids), "source": first.source}, len(messages) // 2))
        pending = deferred
    if len(rows) > 1:
        counts["passage read again (answers far apart, or turns beyond the context)"] += len(rows) - 1
    return rows


def _by_passage(conversations: list[Conversation]) -> list[list[Conversation]]:
    groups: dict[str, list[Conversation]] = {}
    for conversation in conversations:
        groups.setdefault(conversation.group, []).append(conversation)
    return list(groups.values())


def _split_key(conversation: Conversation, by_article: bool) -> str:
    return f"article:{conversation.article}" if by_article else conversation.group


def _split_groups(conversations: list[Conversation], args: SftDataArguments) -> tuple[list, list]:
    # SQuAD is split by article (held-out questions are about articles never trained on), other sources by group.
    by_article = len({c.article for c in conversations if c.article}) > 1
    train, validation = [], []
    for conversation in conversations:
        held_out = _hash_fraction(_split_key(conversation, by_article)) < args.validation_split_percentage / 100
        (validation if held_out else train).append(conversation)
    keys = {_split_key(c, by_article) for c in conversations}
    if not validation and len(keys) > 1:
        key = min(keys, key=_hash_fraction)
        validation = [c for c in conversations if _split_key(c, by_article) == key]
        train = [c for c in conversations if _split_key(c, by_article) != key]
    return train, validation


def configured_sources(args: SftDataArguments) -> dict[str, str]:
    sources = {s: getattr(args, f"{s}_file") for s in SOURCES if getattr(args, f"{s}_file")}
    if not sources:
        raise DataError("no phase-2 source given; set at least one of " + ", ".join(f"{s}_file" for s in SOURCES) + ".")
    return sources


def preflight_sft_sources(args: SftDataArguments) -> None:
    """Open every configured source and read its first usable conversation (Hub sources streamed), so a broken
    source stops the run in seconds, before any training; one sentence per broken source."""
    problems = []
    for source, path in configured_sources(args).items():
        skipped = SkipCounter()
        try:
            if next(iter(load_source(source, path, skipped, streaming=True)), None) is None:
                problems.append(f"{source}: no usable record in {path} (skipped: {skipped.describe()}).")
        except DataError as error:
            problems.append(f"{source}: {error}")
    if problems:
        raise DataError("\n".join(problems))


def training_caps(args: SftDataArguments) -> dict[str, int | None]:
    """Each configured source's cap on training examples (questions, for SQuAD); None = all of it."""
    return {source: getattr(args, f"{source}_max_examples") for source in configured_sources(args)}


def prepared_data_path(args: SftDataArguments, seed: int) -> Path:
    """Where the prepared examples of these settings are (or will be) kept."""
    settings = {k: v for k, v in asdict(args).items() if k not in ("data_cache_dir", "overwrite_cache", "calibration_min_no_answer")}
    if args.fill_train_hours:  # one uncapped preparation serves every budget
        settings.update({f"{source}_max_examples": None for source in SOURCES})
    paths = [path for path in configured_sources(args).values() if path != "hub"]
    return Path(args.data_cache_dir) / f"phase2-{fingerprint(PIPELINE_VERSION, settings, paths, seed)}"


def prepare_sft_data(args: SftDataArguments, tokenizer, seed: int = 42) -> tuple[DatasetDict, dict]:
    """Return train/validation datasets of `input_ids`, `labels`, `length`, `source` and a per-source report,
    from cache when these settings were prepared before; otherwise every source is checked first."""
    cache_path = prepared_data_path(args, seed)
    cached = None if args.overwrite_cache else load_prepared(cache_path)
    if cached:
        logger.info("phase-2 data from cache: %s", cache_path)
        return cached
    preflight_sft_sources(args)
    datasets_, report = _prepare(args, tokenizer, seed)
    return save_prepared(datasets_, report, cache_path), report


def _prepare(args: SftDataArguments, tokenizer, seed: int) -> tuple[DatasetDict, dict]:
    sources = configured_sources(args)
    if args.squad_layout not in SQUAD_LAYOUTS:
        raise DataError(f"squad_layout must be one of {', '.join(SQUAD_LAYOUTS)}, got {args.squad_layout!r}.")
    rng = random.Random(seed)
    report: dict = {}
    v1_questions: set[tuple[str, str]] = set()
    splits: dict[str, list[Dataset]] = defaultdict(list)
    for source, path in sources.items():
        counts = SkipCounter()
        conversations = list(load_source(source, path, counts))
        if source == "squad":
            v1_questions = {(c.passage, c.question) for c in conversations}
        elif source == "squad_v2" and args.squad_v2_drop_v1_duplicates:
            unique = [c for c in conversations if (c.passage, c.question) not in v1_questions]
            if len(unique) < len(conversations):
                counts["left out: question also in SQuAD v1.1"] += len(conversations) - len(unique)
            conversations = unique
        if not conversations:
            raise DataError(f"{source}: no usable examples in {path} (skipped: {counts.describe()}).")
        train, validation = _split_groups(conversations, args)
        cap = None if args.fill_train_hours else getattr(args, f"{source}_max_examples")
        rng.shuffle(train)
        if source == "squad_v2" and args.squad_v2_max_unanswerable is not None:
            left_out = {id(c) for c in [c for c in train if not c.answers][args.squad_v2_max_unanswerable:]}
            if left_out:
                counts["left out: unanswerable beyond squad_v2_max_unanswerable"] += len(left_out)
                train = [c for c in train if id(c) not in left_out]
        source_report = {"records": len(conversations)}
        grouped = args.squad_group_by_passage and source in ("squad", "squad_v2")
        for split, items, limit in (("train", train, cap), ("validation", validation, args.validation_max_examples)):
            # Encoded until the cap (of questions) is reached, so examples dropped for length are replaced by others.
            rows, questions = [], 0
            for unit in (_by_passage(items) if grouped else items):
                if limit is not None and questions >= limit:
                    break
                if grouped:
                    encoded = encode_passage_questions(unit, tokenizer, args.max_seq_length, counts, args.squad_layout,
                                                       args.squad_abstain_instruction)
                else:
                    row = encode_conversation(unit, tokenizer, args.max_seq_length, counts, args.squad_layout,
                                              args.squad_abstain_instruction)
                    encoded = [(row, 1)] if row else []
                before = questions
                for row, asked in encoded:
                    rows.append({**row, "questions": asked, "questions_before": before} if split == "train" else row)
                    questions += asked
            if split == "train" and not rows:
                raise DataError(f"{source}: none of its {len(items):,} training examples fits the {args.max_seq_length}-token "
                                f"context ({counts.describe()}).")
            source_report[split] = {
                "examples": len(rows), "questions": questions,
                "tokens": sum(r["length"] for r in rows),
                "label_tokens": sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in rows),
            }
            if rows:
                splits[split].append(Dataset.from_list(rows))
        if source == "squad_v2" and args.calibration_max_questions > 0:
            held_out = [{"context": c.passage, "question": c.question, "answers": c.answers, "title": c.article or ""}
                        for c in validation[: args.calibration_max_questions]]
            if held_out:
                splits["calibration"].append(Dataset.from_list(held_out))
                source_report["calibration_questions"] = len(held_out)
        source_report["train_cap"] = cap
        source_report["skipped_or_changed"] = dict(counts)
        report[source] = source_report
    if not splits["train"] or not splits["validation"]:
        raise DataError("phase 2 needs at least one training and one validation example; give more data.")
    datasets_ = DatasetDict(
        train=concatenate_datasets(splits["train"]).shuffle(seed=seed),
        validation=concatenate_datasets(splits["validation"]),
        **({"calibration": concatenate_datasets(splits["calibration"])} if splits["calibration"] else {}),
    )
    return datasets_, report


def within_caps(datasets_: DatasetDict, report: dict, caps: dict[str, int | None]) -> tuple[DatasetDict, dict]:
    """The training rows a preparation with these caps keeps (a unit is kept when the questions before it in its
    source's seeded order are below the cap), and the report recounted for them."""
    train = datasets_["train"]
    keep = [index for index, (source, before) in enumerate(zip(train["source"], train["questions_before"]))
            if caps.get(source) is None or before < caps[source]]
    train = train.select(keep)
    report = {source: {**r, "train": {"examples": 0, "questions": 0, "tokens": 0, "label_tokens": 0}, "train_cap": caps.get(source)}
              for source, r in report.items()}
    for source, questions, length, labels in zip(train["source"], train["questions"], train["length"], train["labels"]):
        counts = report[source]["train"]
        counts["examples"] += 1
        counts["questions"] += questions
        counts["tokens"] += length
        counts["label_tokens"] += sum(label != IGNORE_INDEX for label in labels)
    return DatasetDict({**datasets_, "train": train}), report


def describe_mix(report: dict) -> str:
    header = f"{'source':<12} {'records':>8} {'train ex':>9} {'questions':>9} {'train tok':>10} {'share':>6} {'val ex':>7}"
    total_tokens = sum(r["train"]["tokens"] for r in report.values()) or 1
    lines = ["Phase-2 mix:", header]
    for source, r in report.items():
        lines.append(
            f"{source:<12} {r['records']:>8,} {r['train']['examples']:>9,} {r['train'].get('questions', 0):>9,} {r['train']['tokens']:>10,} "
            f"{r['train']['tokens'] / total_tokens:>6.1%} {r['validation']['examples']:>7,}"
        )
        if r["skipped_or_changed"]:
            lines.append(f"{'':<12} skipped or changed: {SkipCounter(r['skipped_or_changed']).describe()}")
    return "\n".join(lines)
