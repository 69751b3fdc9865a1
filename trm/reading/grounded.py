"""Grounded answering: the reply to a question about a passage is a span of that passage, or the no-answer reply.

Design decisions:
- The model scores, it does not write: every candidate reply is " {span}<|endoftext|>" in the one prompt
  format (`data.prompt_format`), exactly what phase 2 trained on, and its score is the model's summed
  log-probability of those tokens after the generation prompt. The no-answer reply is scored the same way.
- Candidates are spans of whole words of the passage as it was tokenised inside the prompt: a span starts
  at a token that begins a word (GPT-2 marks a leading space) and ends where the next token does not
  continue the word. Such a span re-tokenises to the very same ids, so the scored ids are the reply.
- One forward pass over the prompt fills the KV cache and gives the first reply token's distribution;
  the `start_candidates` most probable word starts, and the `starts_near_question` words nearest the question's
  words (by `proximity_to_question`: where the model ranks starts worst), are then extended together as one batch
  of `max_answer_tokens` tokens over the shared cache (plus one row for the no-answer reply). Two forward
  passes per question, whatever the passage length (~3x the time of free greedy decoding here,
  `benchmarks/grounded_squad.py`: the batched pass projects ~500 positions onto the vocabulary; padding
  positions of shorter rows are not projected).
- The candidates are distinct replies: the same tokens score the same wherever they stand, so each is kept once,
  at its occurrence nearest the question's words, and a reply made only of function words or of the question's
  own words (`the`, `is`, the subject asked about) is dropped while another remains (docs/measurements.md).
- `prior_weight` subtracts that share of each reply's score under the same passage with an empty question
  (the model's taste for a reply whatever is asked: surface-form competition). Only the best
  `PRIOR_RESCORED_SPANS` spans by the question's score (with length and proximity, below) are rescored, so the
  prior costs one more prompt pass and one short batch (~1.3x plain grounded decoding).
- `proximity_weight` adds that multiple of a span's proximity to the question: the weighted share of the
  question's terms among the words around the span (`proximity_to_question`, the sliding window of the SQuAD
  paper's baseline). The small model knows what kind of answer fits but not where the question points: its 16
  best spans hold a far better one than its first (oracle F1 37 against 14 on unseen articles), and its score
  plus the question's words nearby pick it out better than either alone (docs/measurements.md). No model call.
- `length_bonus` adds that much per token of a span (a length reward, as machine translation gives): a summed
  log-probability favours short replies, and the model's likeliest spans are shorter than SQuAD's answers.
- The rescored spans are picked by their score plus `RESCORED_LENGTH_BONUS` per token and
  `RESCORED_PROXIMITY_WEIGHT` x their proximity, constants, so that the candidates a calibration chose among are
  the ones later answers choose among; with proximity among them, they hold better answers (docs/measurements.md).
- Phase 2 chooses the three weights with the threshold on its held-out questions (`trm.evaluation.calibrate_grounding_on`);
  0.5, 12 and 0.5 without a stored choice (measured in docs/measurements.md).
- Abstention follows SQuAD 2.0 practice: answer when the best span's score beats the no-answer reply's
  by more than a threshold calibrated on a validation split (`calibrate_no_answer_threshold`) and stored
  beside the model (`grounding.json`). Without a stored threshold the margin is 0: the likelier reply wins.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.files import DataError
from data.passages import STOPWORDS, question_terms
from data.prompt_format import (
    ANSWER_INSTRUCTION, DEFAULT_SQUAD_LAYOUT, NO_ANSWER_REPLY, PASSAGE_LABEL, generation_prompt, reading_comprehension_message,
    squad_instruction_of, squad_layout_of,
)
from data.sft import fit_passage

GROUNDING_FILE = "grounding.json"
PRIOR_RESCORED_SPANS = 16  # spans rescored by their prior: the best by the question's score, length and proximity
RESCORED_LENGTH_BONUS = 0.5  # per token, in picking those spans
RESCORED_PROXIMITY_WEIGHT = 6.0  # per unit of proximity to the question, in picking them
PROXIMITY_WINDOW = 15  # words on either side of a span in which the question's terms count, the nearer the more
WORD_START = "\u0120"  # the byte-level BPE mark of a leading space


@dataclass
class GroundedSettings:
    max_answer_tokens: int = 16
    start_candidates: int = 16
    starts_near_question: int = 16
    prior_weight: float = 0.5
    proximity_weight: float = 12.0
    length_bonus: float = 0.5
    no_answer_threshold: float = 0.0
    allow_no_answer: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / GROUNDING_FILE
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(self.to_json(), encoding="utf-8")
            tmp.replace(path)
        except OSError as error:
            raise DataError(f"cannot store the grounding settings in {path} ({error.strerror}); "
                            "copy the model directory somewhere writable first.") from None
        return path

    @classmethod
    def for_model(cls, model_dir: str | Path, **overrides) -> "GroundedSettings":
        """The settings stored beside a model (if any), with explicit overrides (None = keep). A weight or the
        near-question starts a stored file lacks are 0: its threshold was calibrated without them."""
        path = Path(model_dir) / GROUNDING_FILE
        stored = {}
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise DataError(f"{path} is not valid JSON ({error}); delete it or calibrate again.") from None
        if not isinstance(stored, dict):
            raise DataError(f"{path} must hold a JSON object of grounding settings; delete it or calibrate again.")
        known = {k: v for k, v in stored.items() if k in cls.__dataclass_fields__}
        if path.is_file():
            known = {"prior_weight": 0.0, "proximity_weight": 0.0, "length_bonus": 0.0, "starts_near_question": 0, **known}
        for name, value in known.items():
            default = cls.__dataclass_fields__[name].default
            wanted = bool if isinstance(default, bool) else (int, float) if isinstance(default, float) else int
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, wanted) or value != value:
                raise DataError(f"{path}: {name} must be {'true or false' if wanted is bool else 'a number'}, got {value!r}; "
                                "delete it or calibrate again.")
        known.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**known)


WEIGHT_HELP = {  # the settings calibration chooses besides the threshold, as the command lines describe them
    "prior_weight": "share of a reply's likelihood without the question that is taken off its score (0 = off, faster)",
    "proximity_weight": "weight of the question's words near a span (0 = off)",
    "length_bonus": "score added per token of a span (0 = off)",
}


def add_weight_arguments(parser) -> None:
    """`--prior_weight`, `--proximity_weight` and `--length_bonus` on a command line, each overriding the stored choice."""
    for name, description in WEIGHT_HELP.items():
        default = GroundedSettings.__dataclass_fields__[name].default
        parser.add_argument(f"--{name}", type=float, default=None,
                            help=f"override grounded decoding's {description}; stored by calibration, else {default:g}")


def weight_overrides(args) -> dict[str, float | None]:
    """The weights a command line fixed (None: not given)."""
    return {name: getattr(args, name) for name in WEIGHT_HELP}


@dataclass
class GroundedAnswer:
    answer: str                 # the span, or NO_ANSWER_REPLY
    answered: bool
    span: str                   # the best span even when the reply abstains
    span_score: float           # log P(" {span}<|endoftext|>" | prompt), less prior_weight x its prior, plus
                                # proximity_weight x its proximity to the question's terms and length_bonus x its tokens
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


def proximity_to_question(passage: str, question: str, spans: list[tuple[int, int]]) -> list[float]:
    """For each span (start, end characters of the passage): the share of the question's terms found among the
    `PROXIMITY_WINDOW` words on either side of it, each term weighted by log(1 + 1/its count in the passage), so
    that a rare word says more (the sliding window of the SQuAD paper's baseline), and by its nearness: a term d
    words away counts 1 - d/(PROXIMITY_WINDOW + 1), at its nearest occurrence. A term the passage lacks weighs
    as much as a rare one: a passage missing the question's words is a worse place to answer from."""
    words = [(m.group().lower(), m.start()) for m in re.finditer(r"\w+", passage)]
    counts = Counter(word for word, _ in words)
    weights = {term: math.log1p(1 / counts.get(term, 1)) for term in question_terms(question)}
    total = sum(weights.values())
    starts = [start for _, start in words]
    proximities = []
    for start, end in spans:
        first, after = bisect_left(starts, start), bisect_left(starts, end)
        nearness = {}
        for distance in range(PROXIMITY_WINDOW, 0, -1):  # farthest first, so that the nearest occurrence is kept
            for index in (first - distance, after + distance - 1):
                if 0 <= index < len(words) and words[index][0] in weights:
                    nearness[words[index][0]] = 1 - distance / (PROXIMITY_WINDOW + 1)
        proximities.append(sum(weights[term] * share for term, share in nearness.items()) / total if total else 0.0)
    return proximities


def _first_reply_token(model, prompt_ids: list[int]):
    """One forward pass over the prompt: the first reply token's log-probabilities and the filled KV cache."""
    output = model(torch.tensor([prompt_ids], device=model.device), use_cache=True, logits_to_keep=1)
    return torch.log_softmax(output.logits[0, -1].float(), dim=-1).cpu(), output.cache


def _ended_reply_scores(model, first, cache, prompt_length: int, rows: list[list[int]], eos: int) -> list[list[float]]:
    """For each row of reply tokens and each k: log P(row[:k+1] + <|endoftext|> | prompt), in one batched pass.
    Only the rows' own positions are projected onto the vocabulary, not the padding of shorter rows."""
    width = max(len(row) for row in rows)
    batch = torch.full((len(rows), width + 1), eos, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, : len(row)] = torch.tensor(row)
    cache.batch_repeat_interleave(len(rows))
    attention_mask = torch.ones(len(rows), prompt_length + width, dtype=torch.long)  # padding only trails the rows
    hidden = model.transformer(batch[:, :width].to(model.device), attention_mask=attention_mask.to(model.device), cache=cache,
                               use_cache=True).last_hidden_state
    own = torch.arange(width)[None, :] < torch.tensor([len(row) for row in rows])[:, None]
    logprobs = torch.log_softmax(model.lm_head(hidden[own.to(hidden.device)]).float(), dim=-1).cpu()
    following = logprobs.gather(1, batch[:, 1:][own][:, None])[:, 0].tolist()  # log P(row[k+1]) at position k
    ended = logprobs[:, eos].tolist()
    scores, position = [], 0
    for row in rows:
        cumulative, row_scores = float(first[row[0]]), []
        for k in range(len(row)):
            row_scores.append(cumulative + ended[position + k])
            cumulative += following[position + k]
        scores.append(row_scores)
        position += len(row)
    return scores


def _distinct_answer_like(spans: list[tuple], passage_ids: list[int], question: str) -> list[tuple]:
    """The spans (first token, last token, score, text, char start, proximity) worth choosing from: each distinct reply
    once, at its occurrence nearest the question's words (the same tokens score the same wherever they stand, so a
    repeated word would take several of the rescored places), and only replies with a word that is neither a
    function word nor one of the question's: an answer is never only `the` or `is`, nor the question's own words
    back. When no span has such a word, all of them are kept, each distinct one once."""
    terms = set(question_terms(question))
    nearest: dict[tuple[int, ...], tuple] = {}
    for span in spans:
        key = tuple(passage_ids[span[0]:span[1] + 1])
        if key not in nearest or span[5] > nearest[key][5]:
            nearest[key] = span
    distinct = list(nearest.values())
    return [span for span in distinct if holds_an_answer_word(span[3], terms)] or distinct


def holds_an_answer_word(text: str, terms: set[str]) -> bool:
    """Whether a reply has a word that is neither a function word nor one of the question's `terms`."""
    return any(word not in STOPWORDS and word not in terms for word in re.findall(r"\w+", text.lower()))


@dataclass
class ScoredReplies:
    """A passage's candidate replies to one question, with what each is scored by, ready to be chosen from."""
    spans: list[tuple[str, int, float, float, int, float]]  # (text, char start in the passage, score, prior or 0,
                                                           #  its tokens, proximity to the question's terms)
    no_answer: tuple[float, float]                         # (score, prior or 0)

    def answer(self, settings: GroundedSettings) -> GroundedAnswer:
        """The best reply by `score - prior_weight x prior`, for a span plus `proximity_weight x proximity +
        length_bonus x its tokens` (what the no-answer reply lacks: it is not a span)."""
        score, prior = self.no_answer
        no_answer_score = score - settings.prior_weight * prior
        if not self.spans:
            return GroundedAnswer(NO_ANSWER_REPLY, False, "", -math.inf, no_answer_score, -1)
        best_score, span, char_start = max(
            (score - settings.prior_weight * prior + settings.proximity_weight * proximity + settings.length_bonus * tokens,
             text, start)
            for text, start, score, prior, tokens, proximity in self.spans)
        answered = not settings.allow_no_answer or best_score - no_answer_score > settings.no_answer_threshold
        return GroundedAnswer(span if answered else NO_ANSWER_REPLY, answered, span, best_score, no_answer_score, char_start)


@torch.no_grad()
def score_replies(model, tokenizer, passage: str, question: str, settings: GroundedSettings,
                  with_prior: bool | None = None) -> ScoredReplies:
    """Every candidate span (whole words of the passage) and the no-answer reply, scored; with the prior
    (default: when `prior_weight` asks for it), only the `PRIOR_RESCORED_SPANS` best spans are kept, each
    also scored after the passage alone. The prompt must fit the context."""
    layout, instruction = squad_layout_of(model), squad_instruction_of(model, settings.allow_no_answer)
    prompt = generation_prompt([{"role": "user", "content": reading_comprehension_message(passage, question, layout, instruction)}])
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    prompt_ids = encoding["input_ids"]
    if len(prompt_ids) + reply_budget(tokenizer, settings) > int(model.config.n_positions):
        raise ValueError("the passage and question leave no room for the answer in the context; shorten the passage")
    passage_start = prompt.index(PASSAGE_LABEL) + len(PASSAGE_LABEL)
    passage_end = passage_start + len(passage.strip())
    positions = [i for i, (s, e) in enumerate(encoding["offset_mapping"]) if e > passage_start and s < passage_end]
    passage_ids = [prompt_ids[i] for i in positions]
    passage_offsets = [encoding["offset_mapping"][i] for i in positions]
    can_start, can_end = _word_boundaries(tokenizer.convert_ids_to_tokens(passage_ids))
    eos = tokenizer.eos_token_id

    first, cache = _first_reply_token(model, prompt_ids)
    word_starts = sorted((i for i, ok in enumerate(can_start) if ok), key=lambda i: float(first[passage_ids[i]]), reverse=True)
    starts = word_starts[: settings.start_candidates]
    if settings.starts_near_question:
        # The model ranks where an answer starts poorly where the question points (the SQuAD baseline's strength):
        # the words nearest the question's words start candidates too, ties going to the model's order.
        word_ends = [next(j for j in range(i, len(can_end)) if can_end[j]) for i in word_starts]
        nearness = proximity_to_question(passage.strip(), question, [
            (max(passage_offsets[i][0], passage_start) - passage_start, passage_offsets[j][1] - passage_start)
            for i, j in zip(word_starts, word_ends)])
        nearest = sorted(range(len(word_starts)), key=lambda n: -nearness[n])[: settings.starts_near_question]
        starts += [word_starts[n] for n in sorted(nearest) if word_starts[n] not in starts]
    no_answer_ids = tokenizer(" " + NO_ANSWER_REPLY, add_special_tokens=False)["input_ids"]
    rows = [passage_ids[i:i + settings.max_answer_tokens] for i in starts] + [no_answer_ids]
    scores = _ended_reply_scores(model, first, cache, len(prompt_ids), rows, eos)
    spans = [(i, i + k, score) for i, row_scores in zip(starts, scores) for k, score in enumerate(row_scores) if can_end[i + k]]
    texts = []
    for a, b, _ in spans:
        char_start = max(passage_offsets[a][0], passage_start)
        text = prompt[char_start:passage_offsets[b][1]].strip()
        texts.append((text, prompt.index(text, char_start) - passage_start))
    proximities = proximity_to_question(passage.strip(), question, [(start, start + len(text)) for text, start in texts])
    candidates = _distinct_answer_like([(a, b, score, text, start, proximity) for (a, b, score), (text, start), proximity
                                        in zip(spans, texts, proximities)], passage_ids, question)
    no_answer, priors = scores[-1][-1], [0.0] * (len(candidates) + 1)
    if bool(settings.prior_weight) if with_prior is None else with_prior:
        # How likely a reply is after the passage alone: subtracting it removes the model's taste for replies it
        # likes whatever is asked (surface-form competition), leaving what the question adds. Only the best spans
        # are rescored: one short batch instead of a second pass over every candidate.
        candidates = sorted(candidates, key=lambda s: s[2] + RESCORED_LENGTH_BONUS * (s[1] - s[0] + 1)
                            + RESCORED_PROXIMITY_WEIGHT * s[5], reverse=True)
        candidates = candidates[:PRIOR_RESCORED_SPANS]
        prior_prompt = generation_prompt([{"role": "user", "content": reading_comprehension_message(passage, "", layout, instruction)}])
        prior_ids = tokenizer(prior_prompt, add_special_tokens=False)["input_ids"]
        prior_first, prior_cache = _first_reply_token(model, prior_ids)
        prior_rows = [passage_ids[a:b + 1] for a, b, *_ in candidates] + [no_answer_ids]
        priors = [row[-1] for row in _ended_reply_scores(model, prior_first, prior_cache, len(prior_ids), prior_rows, eos)]
    return ScoredReplies([(text, start, score, prior, b - a + 1, proximity)
                          for (a, b, score, text, start, proximity), prior in zip(candidates, priors)],
                         (no_answer, priors[-1]))


def answer_from_passage(model, tokenizer, passage: str, question: str, settings: GroundedSettings) -> GroundedAnswer:
    """The best-scoring passage span for the question (or the no-answer reply); the prompt must fit the context."""
    return score_replies(model, tokenizer, passage, question, settings).answer(settings)


def fit_to_context(passage: str, question: str, tokenizer, reply_tokens: int, context: int,
                   layout: str = DEFAULT_SQUAD_LAYOUT, instruction: str = ANSWER_INSTRUCTION) -> str | None:
    """The passage cut from its start so that the prompt and a reply of `reply_tokens` fit the context; None if
    the question alone does not leave that room."""
    placeholder_reply = " ".join(["x"] * reply_tokens)
    return fit_passage(passage, question, placeholder_reply, tokenizer, context, anchor=None, layout=layout, instruction=instruction)


def score_passage_replies(model, tokenizer, passage: str, question: str, settings: GroundedSettings,
                          with_prior: bool | None = None) -> ScoredReplies | None:
    """`score_replies` on the passage cut to fit the context; None when the question alone leaves no room."""
    fitted = fit_to_context(passage, question, tokenizer, reply_budget(tokenizer, settings), int(model.config.n_positions),
                            squad_layout_of(model), squad_instruction_of(model, settings.allow_no_answer))
    return None if fitted is None else score_replies(model, tokenizer, fitted, question, settings, with_prior)


def answer_from_passages(model, tokenizer, passages: list[str], question: str,
                         settings: GroundedSettings) -> tuple[int, GroundedAnswer] | None:
    """Answer from each passage and keep the most confident one: the largest margin over the no-answer reply.

    Returns (index of the chosen passage, its answer), whose `answered` is False when no passage's margin
    passes the threshold; None when the question does not fit the context even without a passage.
    """
    best: tuple[int, GroundedAnswer] | None = None
    for position, passage in enumerate(passages):
        scored = score_passage_replies(model, tokenizer, passage, question, settings)
        if scored is None:
            return None
        answer = scored.answer(settings)
        if best is None or answer.margin > best[1].margin:
            best = (position, answer)
    return best


def calibrate_no_answer_threshold(margins: list[float], span_f1: list[float], has_answer: list[bool],
                                  min_no_answer: float | None = None) -> tuple[float, float]:
    """The threshold on margin (span score - no-answer score) that maximises mean F1, as SQuAD 2.0 tunes it.

    A question is answered when its margin exceeds the threshold; it then scores its span's F1, else 1 if
    it had no answer and 0 if it had one. Returns the threshold and the F1 (0-100) it reaches. With
    `min_no_answer` (e.g. 0.7), the threshold instead maximises the F1 on answerable questions among those
    that abstain on at least that share of the unanswerable ones.
    """
    order = sorted(range(len(margins)), key=lambda i: margins[i])
    answerable = sum(has_answer)
    unanswerable = len(margins) - answerable

    def objective(answered_f1: float, abstained_unanswerable: int) -> float:
        if min_no_answer is None:
            return answered_f1 + abstained_unanswerable
        if abstained_unanswerable < min_no_answer * unanswerable:
            return -math.inf
        return answered_f1

    # Threshold below every margin: everything answered.
    answered_f1 = sum(span_f1[i] for i in order if has_answer[i])
    abstained = 0
    best_score, best_threshold = objective(answered_f1, abstained), (margins[order[0]] - 1.0 if order else 0.0)
    for position, i in enumerate(order):  # raise the threshold to margin i: question i now abstains
        if has_answer[i]:
            answered_f1 -= span_f1[i]
        else:
            abstained += 1
        tied_with_next = position + 1 < len(order) and margins[order[position + 1]] == margins[i]
        score = objective(answered_f1, abstained)
        if score > best_score and not tied_with_next:
            best_score, best_threshold = score, margins[i]
    total = len(margins) if min_no_answer is None else answerable
    return best_threshold, 100.0 * best_score / max(total, 1)
