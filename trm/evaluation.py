"""Evaluation of a model directory: perplexity and bits per byte, SQuAD EM/F1, instruction following.

Design decisions:
- Copying (`copying_loss`): loss on the second copy of a repeated random token sequence, the usual
  probe for induction heads; reported for every model directory and at every evaluation during training.
- Perplexity text goes through the phase-1 cleaning and packing, so numbers on a raw file are
  comparable with the validation loss of training. Blocks do not overlap; the first token of each
  block is context only. Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the
  predicted tokens, which makes models with different tokenizers comparable.
- SQuAD prompts are built by the same helpers as the training data; passages too long for the context
  are cut from the start (the answer position is unknown at test time). A question too long to fit even
  without its passage is counted and scored as unanswered. A reply equal to the fixed no-answer reply
  counts as "no answer". Scores come from the local `evaluate` metric in `trm/metrics/squad`, offline.
- SQuAD is scored with free greedy generation or with grounded decoding (`trm.reading.grounded`); its operating point
  (the prior and proximity weights and the length bonus, then the no-answer threshold) is calibrated on SQuAD v2.0
  questions by `calibrate_grounding_on`, every combination of weights judged from one scoring pass per question.
  SQuAD v1.1 questions are known to be answerable: grounded decoding gives them a span always, and free decoding
  asks a no-answer reply again with that reply's first token barred (its first token only: "The" starts answers
  too, and SQuAD's scoring drops articles), reporting how often the model abstained of its own accord. Barring
  its first two tokens ("The passage") instead did worse in a trial: the model then writes "The answer ...".
- Instruction following: each fixed instruction is answered greedily; a reply "in format" is non-empty,
  ends with `<|endoftext|>` by itself and does not start another turn. Prompt plus reply never exceed
  the context: an instruction too long for it is counted in the report instead of crashing the run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from data.cleaning import clean_text
from data.files import DataError, SkipCounter, is_text, read_records
from data.hub import HUB_SOURCES
from data.instruction_sources import squad_rows
from data.prompt_format import (
    ASSISTANT_PREFIX, NO_ANSWER_REPLY, USER_PREFIX, reading_comprehension_message, squad_instruction_of, squad_layout_of,
)
from models.gpt2 import chunked_lm_loss
from trm.generation import SamplingSettings, fit_history, generate_reply
from trm.reading.grounded import (
    GroundedAnswer, GroundedSettings, ScoredReplies, calibrate_no_answer_threshold, fit_to_context, score_passage_replies,
)
from trm.metrics.squad.squad import f1 as squad_f1

SQUAD_METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "squad"
WEIGHT_CHOICES = {  # the weights of grounded decoding (`trm.reading.grounded.WEIGHT_HELP`) calibration chooses among, smaller first
    "prior_weight": (0.0, 0.25, 0.5, 0.75, 1.0),
    "proximity_weight": (0.0, 3.0, 6.0, 12.0),
    "length_bonus": (0.0, 0.25, 0.5, 1.0),
}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of each token id (GPT-2 tokens are byte-level: one character per byte; specials count 0)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    lengths = np.array([len(token) for token in tokens], dtype=np.int64)
    lengths[tokenizer.all_special_ids] = 0
    return lengths


@torch.no_grad()
def blocks_perplexity(model, blocks: list[list[int]], tokenizer) -> dict:
    """Summed next-token loss over blocks of token ids; returns perplexity and bits per byte."""
    byte_lengths = token_byte_lengths(tokenizer)
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    model.eval()
    for block in blocks:
        ids = torch.tensor([block], dtype=torch.long)
        total_nll += float(chunked_lm_loss(model, ids, ids, torch.ones_like(ids), num_items_in_batch=1))
        total_tokens += len(block) - 1
        total_bytes += int(byte_lengths[block[1:]].sum())
    loss = total_nll / max(total_tokens, 1)
    return {
        "tokens": total_tokens, "bytes": total_bytes, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
    }


@torch.no_grad()
def copying_loss(model, half: int = 64, rows: int = 8, seed: int = 0, token_range: tuple[int, int] = (256, 10_000)) -> dict:
    """Can the model copy from its context? Random token sequences, each followed by itself again.

    The first copy is unpredictable (loss near ln(vocabulary) for any model); the second is predictable only
    by copying from the first, which induction heads do. Their appearance during pretraining shows as
    `copy_loss` falling far below `random_loss`; extractive answering (SQuAD) needs it. Tokens are drawn
    from GPT-2 ids 256-9,999: ids follow BPE merge order, so these are common pieces whose embeddings a
    small model has trained (copying ids it never saw says little).
    """
    half = min(half, int(model.config.n_positions) // 2)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(*token_range, (rows, half), generator=generator)
    ids = torch.cat([tokens, tokens], dim=1).to(model.device)
    first, second = ids.clone(), ids.clone()
    first[:, half:] = -100
    second[:, : half + 1] = -100  # the first token of the second copy cannot be known to repeat yet
    was_training = model.training
    model.eval()
    losses = {"random_loss": float(chunked_lm_loss(model, ids, first)), "copy_loss": float(chunked_lm_loss(model, ids, second))}
    model.train(was_training)
    return losses


def text_blocks(paths: list[str], tokenizer, block_size: int, limit: int | None) -> tuple[list[list[int]], dict]:
    """Clean, tokenise and cut text files into non-overlapping blocks (the last one may be shorter)."""
    skipped = SkipCounter()
    stream: list[int] = []
    documents = 0
    for path in paths:
        for record in read_records(path, skipped):
            if limit is not None and documents >= limit:
                break
            text = clean_text(record.get("text") or "") if isinstance(record.get("text", ""), str) else ""
            if not text:
                skipped["records without text"] += 1
                continue
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            documents += 1
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    return [b for b in blocks if len(b) > 1], {"documents": documents, "skipped": dict(skipped)}


def squad_data_name(path: str, source: str) -> dict:
    """What a SQuAD score was measured on, for reports and cards: the Hub dataset and split, or the file's name."""
    if path == "hub":
        return {"dataset": HUB_SOURCES[source].name, "split": HUB_SOURCES[source].eval_split}
    return {"file": Path(path).name}


def squad_questions(path: str, limit: int | None, source: str = "squad") -> list[dict]:
    """Questions of a SQuAD file, or of `source`'s evaluation split on the Hub (`path` = hub)."""
    rows = []
    for row in squad_rows(path, SkipCounter(), source, split=HUB_SOURCES[source].eval_split):
        if isinstance(row.get("context"), str) and isinstance(row.get("question"), str) and row["context"] and row["question"] \
                and is_text(row["context"]) and is_text(row["question"]):
            rows.append({"id": row.get("id"), "title": row.get("title", ""), "context": row["context"], "question": row["question"],
                         "answers": [a["text"] for a in row.get("answers") or [] if isinstance(a, dict) and a.get("text")]})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def grounded_squad_scores(model, tokenizer, rows: list[dict], settings: GroundedSettings,
                          with_prior: bool | None = None) -> list[ScoredReplies | None]:
    """The scored replies to SQuAD rows; None for a question too long to fit the context with any passage."""
    return [score_passage_replies(model, tokenizer, row["context"], row["question"], settings, with_prior) for row in rows]


def grounded_squad_answers(model, tokenizer, rows: list[dict], settings: GroundedSettings) -> list[GroundedAnswer | None]:
    """Grounded answers to SQuAD rows; None for a question too long to fit the context with any passage."""
    return [None if scored is None else scored.answer(settings) for scored in grounded_squad_scores(model, tokenizer, rows, settings)]


def best_f1(prediction: str, references: list[str]) -> float:
    return max((squad_f1(prediction, reference) for reference in references), default=float(not prediction))


def free_squad_answer(model, tokenizer, row: dict, max_new_tokens: int, may_abstain: bool = True,
                      must_answer: bool = False) -> str | None:
    """A generated answer; `may_abstain` says whether the question may lack an answer (v2.0), which the prompt
    then says too, as in training; `must_answer` bars the reply from starting as the no-answer reply does."""
    layout, instruction = squad_layout_of(model), squad_instruction_of(model, may_abstain)
    passage = fit_to_context(row["context"], row["question"], tokenizer, max_new_tokens, int(model.config.n_positions), layout,
                             instruction)
    if passage is None:
        return None
    messages = [{"role": "user", "content": reading_comprehension_message(passage, row["question"], layout, instruction)}]
    banned = tuple(tokenizer(" " + NO_ANSWER_REPLY)["input_ids"][:1]) if must_answer else ()
    settings = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True, repetition_penalty=1.0, banned_first_tokens=banned)
    return generate_reply(model, tokenizer, messages, settings)[0]


def free_squad_reply(model, tokenizer, row: dict, max_new_tokens: int, may_abstain: bool) -> tuple[str | None, str | None]:
    """The model's own reply and the reply scored. A question known to be answerable (v1.1) is answered as
    grounded decoding answers it, with something: a no-answer reply to it is asked again with that reply's first
    token barred."""
    reply = free_squad_answer(model, tokenizer, row, max_new_tokens, may_abstain)
    if reply == NO_ANSWER_REPLY and not may_abstain:
        return reply, free_squad_answer(model, tokenizer, row, max_new_tokens, may_abstain, must_answer=True)
    return reply, reply


def squad_evaluation(model, tokenizer, path: str, limit: int | None, decoding: str = "free",
                     grounded: GroundedSettings | None = None, max_new_tokens: int = 32, source: str = "squad") -> dict:
    """SQuAD EM/F1 of free greedy generation or of grounded span decoding (`trm.reading.grounded`). For v1.1,
    `abstained` is how often the model gave the no-answer reply of its own accord (`free_squad_reply`); `f1`
    scores the answers it gave when asked again."""
    import evaluate

    rows = squad_questions(path, limit, source)
    if decoding == "grounded":
        answers = grounded_squad_answers(model, tokenizer, rows, grounded or GroundedSettings())
        replies = [None if a is None else a.answer for a in answers]
        own_replies = replies
    else:
        may_abstain = source == "squad_v2"
        pairs = [free_squad_reply(model, tokenizer, row, max_new_tokens, may_abstain) for row in rows]
        own_replies, replies = [own for own, _ in pairs], [scored for _, scored in pairs]
    predictions = ["" if reply is None or reply == NO_ANSWER_REPLY else reply for reply in replies]
    metric = evaluate.load(str(SQUAD_METRIC_DIR))
    scores = metric.compute(predictions=predictions, references=[row["answers"] for row in rows])
    examples = [{"id": row["id"], "question": row["question"], "reply": reply, "answers": row["answers"]}
                for row, reply in zip(rows[:20], replies)]
    # Where the score goes: how often the model abstains, and how good the answers it does give are.
    answered = [best_f1(reply, row["answers"]) for reply, row in zip(replies, rows) if reply not in (None, NO_ANSWER_REPLY)]
    return {**scores, **squad_data_name(path, source), "decoding": decoding, "questions_too_long": replies.count(None),
            "abstained": 100.0 * own_replies.count(NO_ANSWER_REPLY) / max(1, len(rows)),
            "answered_f1": 100.0 * sum(answered) / len(answered) if answered else None, "examples": examples}


def weights_name(weights: dict[str, float]) -> str:
    """How reports name a combination of grounded decoding's weights."""
    return ", ".join(f"{name.replace('_weight', '').replace('_', ' ')} {value:g}" for name, value in weights.items())


def weight_choices(**fixed: float | None) -> dict[str, tuple[float, ...]]:
    """`WEIGHT_CHOICES`, with each weight given a value (not None) fixed at it."""
    return {name: values if fixed.get(name) is None else (fixed[name],) for name, values in WEIGHT_CHOICES.items()}


def span_f1_by_weights(scored: list[tuple[ScoredReplies, dict]], settings: GroundedSettings,
                       choices: dict[str, tuple[float, ...]] = WEIGHT_CHOICES) -> list[tuple[dict[str, float], float]]:
    """Mean F1 (0-100) of the best span (never abstaining) over the answerable (scored replies, row) pairs, for each
    combination of the weights' choices, smaller weights first (the earlier weights vary slowest)."""
    always = replace(settings, allow_no_answer=False)
    answerable = [(s, row) for s, row in scored if row["answers"]]
    results = []
    for values in itertools.product(*choices.values()):
        weights = dict(zip(choices, values))
        chosen = replace(always, **weights)
        results.append((weights, 100.0 * sum(best_f1(s.answer(chosen).span, row["answers"]) for s, row in answerable)
                        / max(1, len(answerable))))
    return results


def best_weights(span_f1: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """The combination with the best span F1; of equals, the first (the smaller weights)."""
    return max(span_f1, key=lambda pair: pair[1])[0]


def calibrate_grounding(model, tokenizer, path: str, limit: int | None, settings: GroundedSettings,
                        min_no_answer: float | None = None, choices: dict[str, tuple[float, ...]] = WEIGHT_CHOICES) -> dict:
    """Grounded answers on a SQuAD v2.0 file, then the weights and the no-answer threshold for them."""
    return calibrate_grounding_on(model, tokenizer, squad_questions(path, limit, "squad_v2"), settings, path, min_no_answer, choices)


def calibrate_grounding_on(model, tokenizer, rows: list[dict], settings: GroundedSettings, name: str,
                           min_no_answer: float | None = None, choices: dict[str, tuple[float, ...]] = WEIGHT_CHOICES) -> dict:
    """Grounded decoding's operating point on SQuAD v2.0 rows (`context`, `question`, `answers`): the weights whose
    best spans score the highest F1 on the answerable rows (ties: the smaller weights; a prior weight of 0 is the
    cheaper decoding), then the no-answer threshold at them that maximises F1, or, with `min_no_answer`, the one
    that answers most while abstaining on that share of the unanswerable rows."""
    with_prior = any(choices["prior_weight"])
    scored = [(s, row) for s, row in zip(grounded_squad_scores(model, tokenizer, rows, settings, with_prior), rows) if s is not None]
    if not any(row["answers"] for _, row in scored) or all(row["answers"] for _, row in scored):
        raise DataError(f"{name}: calibration needs answerable and unanswerable questions (SQuAD v2.0).")
    span_f1 = span_f1_by_weights(scored, settings, choices)
    weights = best_weights(span_f1)
    chosen = replace(settings, **weights)
    answers = [(s.answer(chosen), row) for s, row in scored]
    threshold, _ = calibrate_no_answer_threshold(
        [a.margin for a, _ in answers], [best_f1(a.span, row["answers"]) for a, row in answers],
        [bool(row["answers"]) for _, row in answers], min_no_answer)
    answered = [a.margin > threshold for a, _ in answers]
    f1 = [best_f1(a.span, row["answers"]) if ok else float(not row["answers"]) for ok, (a, row) in zip(answered, answers)]
    unanswerable = [ok for ok, (_, row) in zip(answered, answers) if not row["answers"]]
    return {"questions": len(answers), **weights, "no_answer_threshold": threshold,
            "f1_at_threshold": 100.0 * sum(f1) / len(answers), "no_answer_share": 100.0 * unanswerable.count(False) / len(unanswerable),
            "answered_share": 100.0 * sum(answered) / len(answers), "min_no_answer": min_no_answer,
            "has_answer_span_f1_by_weights": {weights_name(w): round(v, 2) for w, v in span_f1}}


def instruction_evaluation(model, tokenizer, instructions: list[str], max_new_tokens: int = 128) -> dict:
    """Greedy replies to instructions; one too long for the context with room for the reply is counted, not run."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True)
    max_prompt_tokens = int(model.config.n_positions) - max_new_tokens
    answers, too_long = [], 0
    for instruction in instructions:
        messages = fit_history([{"role": "user", "content": instruction}], tokenizer, max_prompt_tokens)
        if messages is None:
            too_long += 1
            continue
        reply, ended = generate_reply(model, tokenizer, messages, settings)
        in_format = ended and bool(reply) and USER_PREFIX.strip() not in reply and ASSISTANT_PREFIX not in reply
        answers.append({"instruction": instruction, "reply": reply, "ended_by_itself": ended, "in_format": in_format})
    count = max(len(answers), 1)
    return {
        "instructions": len(answers),
        "too_long_for_the_context": too_long,
        "ended_by_itself": sum(a["ended_by_itself"] for a in answers) / count,
        "in_format": sum(a["in_format"] for a in answers) / count,
        "answers": answers,
    }
