"""Documents -> passages: windows of whole sentences, small enough that passage, question and answer fit the context.

Design decisions:
- A passage is a run of consecutive sentences of one cleaned document (`data.cleaning`), closed once it
  holds `target_tokens` GPT-2 tokens and never longer than `max_tokens`. The defaults (120 / 150) leave
  about 100 of the model's 256 positions for the instruction, the question and the answer.
- A single sentence longer than `max_tokens` is cut at token boundaries, so no text is dropped.
- Windows do not overlap: a passage is a unit of retrieval, and overlap would index text twice.
- A question is matched on its `question_terms`, by retrieval (BM25) and by grounded decoding (the words near a
  span) alike.
"""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does for from had has have how i in into is it its "
    "of on or so than that the their them then there these they this those to was were what when where "
    "which who whom whose why will with would you your".split()
)


def question_terms(question: str) -> list[str]:
    """The words a question is matched on, in order and once each: lowercased, common function words dropped."""
    return list(dict.fromkeys(w for w in re.findall(r"\w+", question.lower()) if w not in STOPWORDS))


def split_passages(text: str, tokenizer, target_tokens: int = 120, max_tokens: int = 150) -> list[str]:
    """Cut one document's text into passages of whole sentences (see the module docstring)."""
    sentences = [s for s in SENTENCE_END.split(" ".join(text.split())) if s]
    if not sentences:
        return []
    encodings = tokenizer(sentences, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces: list[tuple[str, int]] = []
    for sentence, offsets in zip(sentences, encodings["offset_mapping"]):
        if len(offsets) <= max_tokens:
            pieces.append((sentence, len(offsets)))
            continue
        for start in range(0, len(offsets), max_tokens):
            chunk = offsets[start:start + max_tokens]
            pieces.append((sentence[chunk[0][0]:chunk[-1][1]].strip(), len(chunk)))
    passages, current, size = [], [], 0
    for piece, length in pieces:
        if current and size + length > max_tokens:
            passages.append(" ".join(current))
            current, size = [], 0
        current.append(piece)
        size += length
        if size >= target_tokens:
            passages.append(" ".join(current))
            current, size = [], 0
    if current:
        passages.append(" ".join(current))
    return [p for p in passages if p]
