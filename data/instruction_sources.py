"""Phase-2 sources: Alpaca, SQuAD v1.1/v2.0, DailyDialog and generic chat JSONL, as conversations.

Design decisions:
- Every loader reads either the Hub (`data.hub`, when the path is `hub`) or a local file in the source's
  original format, and yields `Conversation`s: a list of user/assistant messages
  plus a `group` key. Examples sharing a group (the questions of one SQuAD passage) always land in the
  same split, so no passage is seen in training and validation both.
- A malformed record is skipped and counted in the source's `SkipCounter` with its reason; it never
  crashes the run and is never silently lost.
- SQuAD is read in its official nested JSON or in the Hub's flat layout (the Hub, or a local parquet / JSON /
  JSON-lines export of `rajpurkar/squad(_v2)`), by one reader shared with evaluation.
- SQuAD records keep their passage, question and answer position, because the passage may need to be
  windowed to fit the context (`data.sft`); the conversation is built there with the shared prompt
  helpers. SQuAD v2.0 questions without an answer get `NO_ANSWER_REPLY`.
- DailyDialog turns alternate user/assistant from the first speaker; a final unanswered user turn is
  dropped (counted). Its tokenised spacing (`word , word .`) is undone.
- Chat records carrying retrieval fields are refused outright (`trm.rules`): no RAG data in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.files import DataError, SkipCounter, is_text, read_records
from data.hub import HUB_SOURCES, load_hub_dataset
from data.prompt_format import validate_messages
from trm import rules

SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.!?;:%)’]|n't|'s|'re|'m|'ll|'ve|'d)(?=\s|$|[,.!?])")
SPACE_AFTER_OPEN = re.compile(r"([(“$])\s+")
SPACED_CONTRACTION = re.compile(r"(\w) ?[’'] ?(s|t|m|re|ll|ve|d)\b")


@dataclass
class Conversation:
    source: str
    group: str
    messages: list[dict] = field(default_factory=list)
    # Reading-comprehension fields, turned into messages once the passage fits the context.
    passage: str | None = None
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    answer_start: int | None = None
    article: str | None = None  # SQuAD: the article's title, by which the questions are split (train / held out)


def _load_hub(source: str, split: str | None = None, streaming: bool = False):
    """Rows of a phase-2 source from the Hub (its training split unless `split` says otherwise)."""
    hub = HUB_SOURCES[source]
    return load_hub_dataset(hub, split or hub.train_split, f"give a local file with --{source}_file", streaming)


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def load_alpaca(path: str, skipped: SkipCounter, streaming: bool = False) -> Iterator[Conversation]:
    """Alpaca: a JSON list of {instruction, input, output} (input may be empty)."""
    records = _load_hub("alpaca", streaming=streaming) if path == "hub" else read_records(path, skipped)
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not {"instruction", "output"} <= set(record):
            skipped["records without instruction/output"] += 1
            continue
        rules.refuse_retrieval_fields(record, f"Alpaca record {index}")
        instruction, extra, output = _text(record["instruction"]), _text(record.get("input")), _text(record["output"])
        if not instruction or not output:
            skipped["records with an empty instruction or output"] += 1
            continue
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        yield Conversation("alpaca", f"alpaca:{instruction}", [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])


def squad_rows_from_official(document: dict, path: str) -> Iterator[dict]:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(f"{path}: not a SQuAD file (expected {{'version', 'data': [...]}}).")
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []) if isinstance(article, dict) else []:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            for qa in paragraph.get("qas", []) if isinstance(paragraph, dict) else []:
                yield {"title": article.get("title", ""), "context": context, **(qa if isinstance(qa, dict) else {})}


def _hub_layout_answers(row: dict) -> dict:
    """A row in the Hub's flat layout (`answers: {text: [...], answer_start: [...]}`) in the official one."""
    answers = row.get("answers")
    if not isinstance(answers, dict):
        return row
    texts, starts = answers.get("text") or [], answers.get("answer_start") or []
    listed = [{"text": text, "answer_start": start} for text, start in zip(texts, starts)]
    return {**row, "answers": listed, "is_impossible": not listed}


def squad_rows(path: str, skipped: SkipCounter, source: str, split: str | None = None,
               streaming: bool = False) -> Iterator[dict]:
    """Rows of a SQuAD file: the official nested JSON, or flat rows in the Hub's layout (the Hub itself, `source`
    at `split`, or a local parquet / JSON / JSON-lines export of it)."""
    records = _load_hub(source, split, streaming) if path == "hub" else read_records(path, skipped)
    for record in records:
        if isinstance(record.get("data"), list):
            yield from squad_rows_from_official(record, path)
        else:
            yield _hub_layout_answers(record)


def load_squad(path: str, skipped: SkipCounter, version: str, streaming: bool = False) -> Iterator[Conversation]:
    """SQuAD v1.1 / v2.0 in the official nested JSON layout, or the Hub's flat rows."""
    source = "squad_v2" if version == "2.0" else "squad"
    for row in squad_rows(path, skipped, source, streaming=streaming):
        context, question = _text(row.get("context")), _text(row.get("question"))
        answers = [a for a in row.get("answers") or [] if isinstance(a, dict) and _text(a.get("text"))]
        impossible = bool(row.get("is_impossible", False))
        if not context or not question:
            skipped["questions without a passage or question text"] += 1
            continue
        if not (is_text(context) and is_text(question) and all(is_text(a.get("text") or "") for a in answers)):
            skipped["questions holding text that is not valid Unicode"] += 1
            continue
        if impossible and version != "2.0":
            skipped["unanswerable questions in a v1.1 file"] += 1
            continue
        if not impossible and not answers:
            skipped["answerable questions without an answer"] += 1
            continue
        answer_start = None
        if answers:
            text, start = answers[0]["text"].strip(), answers[0].get("answer_start")
            if not isinstance(start, int) or context[start:start + len(text)] != text:
                start = context.find(text)
            if start < 0:
                skipped["answers not found in their passage"] += 1
                continue
            answer_start = start
        # Grouped by passage alone: SQuAD v2.0 reuses v1.1 passages, and a passage must not be in training for
        # one version and in validation for the other.
        yield Conversation(
            source, f"squad-passage:{context[:200]}", passage=context, question=question,
            answers=[a["text"].strip() for a in answers], answer_start=answer_start, article=_text(row.get("title")) or None,
        )


def detokenize_dialogue(text: str) -> str:
    """Undo DailyDialog's tokenised spacing: 'Hi , Jim .' -> 'Hi, Jim.'"""
    text = SPACED_CONTRACTION.sub(r"\1'\2", text)
    text = SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    return " ".join(SPACE_AFTER_OPEN.sub(r"\1", text).split())


def _dialogue_conversation(turns: list[str], skipped: SkipCounter) -> Conversation | None:
    turns = [detokenize_dialogue(t) for t in turns if t and t.strip()]
    if len(turns) < 2:  # in a .txt file: a line without __eou__ separators
        skipped["dialogues with fewer than two turns"] += 1
        return None
    if len(turns) % 2:
        turns = turns[:-1]
        skipped["final unanswered turns dropped (dialogue kept)"] += 1
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return Conversation("dailydialog", f"dailydialog:{turns[0][:200]}", messages)


def load_dailydialog(path: str, skipped: SkipCounter, streaming: bool = False) -> Iterator[Conversation]:
    """DailyDialog: original `dialogues_*.txt` (turns split by `__eou__`), or rows with a `dialog` list."""
    if path == "hub":
        dialogues = (row["dialog"] for row in _load_hub("dailydialog", streaming=streaming))
    elif Path(path).suffix == ".txt":
        dialogues = (line["text"].split("__eou__") for line in read_records(path, skipped, text_sample_by="line"))
    else:
        dialogues = (r.get("dialog") for r in read_records(path, skipped))
    for turns in dialogues:
        if not isinstance(turns, list):
            skipped["records without a dialog list"] += 1
            continue
        conversation = _dialogue_conversation(turns, skipped)
        if conversation:
            yield conversation


def load_chat(path: str, skipped: SkipCounter) -> Iterator[Conversation]:
    """Generic chat JSONL: {"messages": [{"role": ..., "content": ...}, ...]}, ending with an assistant turn."""
    for index, record in enumerate(read_records(path, skipped)):
        rules.refuse_retrieval_fields(record, f"{path} record {index}")
        try:
            messages = validate_messages(record.get("messages") or [])
        except (ValueError, AttributeError, TypeError):
            skipped["records with malformed messages"] += 1
            continue
        if not messages or messages[-1]["role"] != "assistant":
            skipped["records that do not end with an assistant reply"] += 1
            continue
        yield Conversation("chat", f"chat:{index}", messages)


def load_source(source: str, path: str, skipped: SkipCounter, streaming: bool = False) -> Iterator[Conversation]:
    """The conversations of one phase-2 source; `streaming` reads the Hub row by row (the preflight's first row)."""
    loaders = {
        "alpaca": lambda: load_alpaca(path, skipped, streaming),
        "squad": lambda: load_squad(path, skipped, "1.1", streaming),
        "squad_v2": lambda: load_squad(path, skipped, "2.0", streaming),
        "dailydialog": lambda: load_dailydialog(path, skipped, streaming),
        "chat": lambda: load_chat(path, skipped),
    }
    if source not in loaders:
        raise DataError(f"unknown phase-2 source {source!r}; use one of {', '.join(loaders)}.")
    if source == "chat" and path == "hub":
        raise DataError("the chat source reads local JSONL files only.")
    return loaders[source]()
