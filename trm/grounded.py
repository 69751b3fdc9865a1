"""Grounded answering: the reply to a question about a passage is a span of that passage, or the no-answer reply.

Design decisions:
- The model scores, it does not write: every candidate reply is " {span}<|endoftext|>" in the one prompt
  format (`data.prompt_format`), exactly what phase 2 trained on, and its score is the model's summed
  log-probability of those tokens after the generation prompt. The no-answer reply is scored the same way.
- Candidates are spans of whole words of the passage as it was tokenised inside the prompt: a span starts
  at a token that begins a word (GPT-2 marks a leading space) and ends where the next token does not
  continue the word. Such a span re-tokenises to the very same ids, so the scored ids are the reply.
- One forward pass over the prompt fills the KV cache and gives the first reply token's distribution;
  the `start_candidates` most probable word starts are then extended together as one batch of
  `max_answer_tokens` tokens over the shared cache (plus one row for the no-answer reply). Two forward
  passes per question, whatever the passage length: cheaper than free greedy decoding, which runs one
  per generated token.
- Abstention follows SQuAD 2.0 practice: answer when the best span's score beats the no-answer reply's
  by more than a threshold calibrated on a validation split (`calibrate_no_answer_threshold`) and stored
  beside the model (`grounding.json`). Without a stored threshold the margin is 0: the likelier reply wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.files import DataError
from data.prompt_format import NO_ANSWER_REPLY, PASSAGE_LABEL, generation_prompt, reading_comprehension_message
from data.sft import fit_passage

GROUNDING_FILE = "grounding.json"
WORD_START = "\u0120"  # the byte-level BPE mark of a leading space


@dataclass
class GroundedSettings:
    max_answer_tokens: int = 16
    start_candidates: int = 24
    length_penalty: float = 0.0
    no_answer_threshold: float = 0.0
    allow_no_answer: bool = True

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / GROUNDING_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def for_model(cls, model_dir: str | Path, **overrides) -> "GroundedSettings":
        """The settings stored beside a model (if any), with explicit overrides (None = keep)."""
        path = Path(model_dir) / GROUNDING_FILE
        stored = {}
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise DataError(f"{path} is not valid JSON ({error}); delete it or calibrate again.") from None
        known = {k: v for k, v in stored.items() if k in cls.__dataclass_fields__}
        known.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**known)


@dataclass
class GroundedAnswer:
    answer: str                 # the span, or NO_ANSWER_REPLY
    answered: bool
    span: str                   # the best span even when the reply abstains
    span_score: float           # summed log-probability of " {span}<|endoftext|>"
    no_answer_score: float      # the same for the no-answer reply
    char_start: int             # position of the best span in the passage (-1 if none)

    @property
    def margin(self) -> float:
        return self.span_score - self.no_answer_score


def reply_budget(tokenizer, settings: GroundedSettings) -> int:
    """Tokens the reply may need after the prompt: the longest span or the no-answer reply, plus EOS."""
    no_answer = len(tokenizer(" " + NO_ANSWER_REPLY, add_special_tokens=False)["input_ids"])
    return max(settings.max_answer_tokens, no_answer) + 1


def _word_boundaries(tokens: list[str]) -> tuple[list[bool], list[bool]]:
    """For each passage token: may a span start here (a word start), may it end here (the word ends)."""
    starts = [t.startswith(WORD_START) and len(t) > 1 for t in tokens]
    ends = []
    for i in range(len(tokens)):
        following = tokens[i + 1] if i + 1 < len(tokens) else WORD_START
        ends.append(following.startswith(WORD_START) or not following[:1].isalnum())
    return starts, ends


@torch.no_grad()
def answer_from_passage(model, tokenizer, passage: str, question: str, settings: GroundedSettings) -> GroundedAnswer:
    """The best-scoring passage span for the question (or the no-answer reply); the prompt must fit the context."""
    prompt = generation_prompt([{"role": "user", "content": reading_comprehension_message(passage, question)}])
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    prompt_ids = encoding["input_ids"]
    if len(prompt_ids) + reply_budget(tokenizer, settings) > int(model.config.n_positions):
        raise ValueError("the passage and question leave no room for the answer in the context; shorten the passage")
    passage_start = prompt.index(PASSAGE_LABEL) + len(PASSAGE_LABEL)
    passage_end = passage_start + len(passage.strip())
    positions = [i for i, (s, e) in enumerate(encoding["offset_mapping"]) if e > passage_start and s < passage_end]
    passage_ids = [prompt_ids[i] for i in positions]
    passage_offsets = [encoding["offset_mapping"][i] for i in positions]
    tokens = tokenizer.convert_ids_to_tokens(passage_ids)
    can_start, can_end = _word_boundaries(tokens)

    output = model(torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(output.logits[0, -1].float(), dim=-1)
    cache = output.cache
    eos = tokenizer.eos_token_id

    starts = [i for i, ok in enumerate(can_start) if ok]
    starts.sort(key=lambda i: float(first[passage_ids[i]]), reverse=True)
    starts = starts[: settings.start_candidates]
    no_answer_ids = tokenizer(" " + NO_ANSWER_REPLY, add_special_tokens=False)["input_ids"] + [eos]

    width = max(settings.max_answer_tokens, len(no_answer_ids) - 1)
    rows = [passage_ids[i:i + settings.max_answer_tokens] for i in starts] + [no_answer_ids[:-1]]
    batch = torch.full((len(rows), width), eos, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, : len(row)] = torch.tensor(row)
    cache.batch_repeat_interleave(len(rows))
    attention_mask = torch.ones(len(rows), len(prompt_ids) + width, dtype=torch.long)  # padding only trails the rows
    logits = model(batch, attention_mask=attention_mask, cache=cache, use_cache=True).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)

    no_answer_score = float(first[no_answer_ids[0]]) + float(
        logprobs[-1, torch.arange(len(no_answer_ids) - 1), torch.tensor(no_answer_ids[1:])].sum())
    candidates = []  # (score, first token, last token)
    for r, i in enumerate(starts):
        row = rows[r]
        cumulative = float(first[row[0]])
        for k in range(len(row)):
            if k > 0:
                cumulative += float(logprobs[r, k - 1, row[k]])
            if can_end[i + k]:
                total = cumulative + float(logprobs[r, k, eos])
                candidates.append((total / (k + 2) ** settings.length_penalty, i, i + k))
    if not candidates:
        return GroundedAnswer(NO_ANSWER_REPLY, False, "", -math.inf, no_answer_score, -1)
    best_score, first_token, last_token = max(candidates)
    no_answer_score /= len(no_answer_ids) ** settings.length_penalty
    char_start = max(passage_offsets[first_token][0], passage_start)
    span = prompt[char_start:passage_offsets[last_token][1]].strip()
    answered = not settings.allow_no_answer or best_score - no_answer_score > settings.no_answer_threshold
    return GroundedAnswer(span if answered else NO_ANSWER_REPLY, answered, span, best_score, no_answer_score,
                          prompt.index(span, char_start) - passage_start)


def fit_to_context(passage: str, question: str, tokenizer, settings: GroundedSettings, context: int) -> str | None:
    """The passage cut from its start so that prompt and reply fit the context; None if the question alone does not."""
    placeholder_reply = " ".join(["x"] * reply_budget(tokenizer, settings))
    return fit_passage(passage, question, placeholder_reply, tokenizer, context, anchor=None)


def answer_from_passages(model, tokenizer, passages: list[str], question: str,
                         settings: GroundedSettings) -> tuple[int, GroundedAnswer] | None:
    """Answer from each passage and keep the most confident one: the largest margin over the no-answer reply.

    Returns (index of the chosen passage, its answer), whose `answered` is False when no passage's margin
    passes the threshold; None when the question does not fit the context even without a passage.
    """
    context = int(model.config.n_positions)
    best: tuple[int, GroundedAnswer] | None = None
    for position, passage in enumerate(passages):
        fitted = fit_to_context(passage, question, tokenizer, settings, context)
        if fitted is None:
            return None
        answer = answer_from_passage(model, tokenizer, fitted, question, settings)
        if best is None or answer.margin > best[1].margin:
            best = (position, answer)
    return best


def calibrate_no_answer_threshold(margins: list[float], span_f1: list[float], has_answer: list[bool]) -> tuple[float, float]:
    """The threshold on margin (span score - no-answer score) that maximises mean F1, as SQuAD 2.0 tunes it.

    A question is answered when its margin exceeds the threshold; it then scores its span's F1, else 1 if
    it had no answer and 0 if it had one. Returns the threshold and the F1 (0-100) it reaches.
    """
    order = sorted(range(len(margins)), key=lambda i: margins[i])
    # Threshold below every margin: everything answered.
    score = sum(span_f1[i] if has_answer[i] else 0.0 for i in order)
    best_score, best_threshold = score, (margins[order[0]] - 1.0 if order else 0.0)
    for position, i in enumerate(order):  # raise the threshold to margin i: question i now abstains
        score += (0.0 if has_answer[i] else 1.0) - (span_f1[i] if has_answer[i] else 0.0)
        tied_with_next = position + 1 < len(order) and margins[order[position + 1]] == margins[i]
        if score > best_score and not tied_with_next:
            best_score, best_threshold = score, margins[i]
    return best_threshold, 100.0 * best_score / max(len(margins), 1)
