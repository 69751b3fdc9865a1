"""Talking to a trained model: loading it, fitting a conversation into the context, generating a reply.

Design decisions:
- Prompts come from `data.prompt_format.generation_prompt`, the function that also formats the
  training data, so chat, one-shot generation and evaluation see exactly what training taught.
- Replies stop at `<|endoftext|>` through the model's generation config (its EOS), with no extra
  stopping rule; whether a reply ended by itself is reported, because that is a quality signal.
- Greedy loops are the usual reason a reply does not end; a 3-gram may not repeat by default
  (`no_repeat_ngram_size`), chosen by measurement on unseen prompts (`benchmarks/reply_endings.py`).
  TRM applies it, and the repetition penalty, to the reply alone: `transformers` counts the prompt too,
  which forbids copying any three tokens of a passage (a SQuAD answer, a retrieved fact) and, where the
  instruction names the no-answer reply, abstaining. The saved generation config keeps the plain keys
  (what `generate()` and `pipeline` read); their semantics there are `transformers`' own.
- A reply can be barred from starting with given tokens (`banned_first_tokens`): evaluation uses it to make a
  model answer a question known to be answerable instead of giving the no-answer reply.
- History is trimmed oldest exchange first until the prompt plus `max_new_tokens` fits the context, in
  time linear in the conversation's length (the server trims whatever a client sends).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, SuppressTokensAtBeginLogitsProcessor,
)
from transformers.utils import logging as transformers_logging

from data.files import DataError
from data.prompt_format import generation_prompt, render


GPT2_VOCABULARY = 50257


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    # Chosen by benchmarks/reply_endings.py: 3 ends 98-100% of replies on unseen prompts (78-94% without).
    no_repeat_ngram_size: int = 3
    greedy: bool = False
    banned_first_tokens: tuple[int, ...] = ()

    def sampling_kwargs(self) -> dict:
        """The settings as plain `generate` keys: what a saved generation config holds."""
        common = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                  "no_repeat_ngram_size": self.no_repeat_ngram_size}
        if self.greedy or self.temperature <= 0:
            return {"do_sample": False, **common}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, **common}

    def generate_kwargs(self, prompt_length: int) -> dict:
        """`generate` keys for a prompt of `prompt_length` tokens, the repetition controls applied to the reply alone."""
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(self.repetition_penalty), prompt_ignore_length=prompt_length))
        if self.no_repeat_ngram_size > 0:
            processors.append(ReplyNoRepeatNGram(self.no_repeat_ngram_size, prompt_length))
        if self.banned_first_tokens:
            processors.append(SuppressTokensAtBeginLogitsProcessor(self.banned_first_tokens, prompt_length))
        # The plain keys off, so the model's saved generation config does not add prompt-wide versions of both.
        return {**self.sampling_kwargs(), "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "logits_processor": processors}


class ReplyNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """`transformers`' n-gram ban over the tokens after the prompt only: the prompt's n-grams stay allowed."""

    def __init__(self, ngram_size: int, prompt_length: int):
        super().__init__(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return super().__call__(input_ids[:, self.prompt_length:], scores)


def from_pretrained(loader, folder: Path):
    """`loader.from_pretrained(folder)` that never runs code from the directory (`trust_remote_code=False`, so a
    config naming custom code is refused instead of asking on stdin), with every problem in one sentence: a damaged
    directory (truncated weights, invalid JSON), another architecture than GPT-2, weights missing from the file
    (which transformers would fill with random values), a tokenizer other than GPT-2's."""
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar over a 76-tensor file is noise in a chat or a script's output
    try:
        if loader is AutoTokenizer:
            loaded, missing = loader.from_pretrained(str(folder), trust_remote_code=False), set()
        else:
            loaded, info = loader.from_pretrained(str(folder), trust_remote_code=False, output_loading_info=True)
            missing = set(info["missing_keys"])
    except Exception as error:  # damage surfaces as OSError, ValueError, safetensors' own error, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{folder} is not a readable model directory ({reason[:300]}); train or copy it again.") from None
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    if loader is AutoTokenizer:
        if len(loaded) != GPT2_VOCABULARY or loaded("Hello world")["input_ids"] != [15496, 995]:
            raise DataError(f"{folder}: its tokenizer is not GPT-2's ({len(loaded):,} tokens); TRM models use GPT-2's 50,257.")
        return loaded
    if loaded.config.model_type != "gpt2":
        raise DataError(f"{folder} holds a {loaded.config.model_type} model; TRM loads GPT-2 models (GPT2LMHeadModel) only.")
    if missing:
        raise DataError(f"{folder}: its weights file lacks {len(missing)} of the model's tensors (e.g. {sorted(missing)[0]}); "
                        "it is incomplete: train or copy it again.")
    return loaded


def load_model(path: str | Path):
    """A TRM model directory (or any GPT-2 directory) and its tokenizer, loaded offline for inference."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model directory (no config.json); train one with make pretrain / make sft.")
    model = from_pretrained(AutoModelForCausalLM, folder)
    tokenizer = from_pretrained(AutoTokenizer, folder)
    model.eval()
    return model, tokenizer


def context_length(model) -> int:
    return int(model.config.n_positions)


def fit_history(messages: list[dict], tokenizer, max_prompt_tokens: int) -> list[dict] | None:
    """Drop the oldest exchanges until the prompt fits; None if even the last user turn alone does not.

    Each exchange is tokenised once (the format's pieces end in a newline or `<|endoftext|>`, where GPT-2's
    tokens break, so lengths add up), then the fit is confirmed on the whole prompt: linear in the
    conversation's length, not quadratic, whatever a client sends."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    exchanges = [turns[i:i + 2] for i in range(0, len(turns), 2)]
    lengths = [len(tokenizer(render(exchange)[0])["input_ids"]) for exchange in exchanges]
    total = len(tokenizer(generation_prompt(system))["input_ids"]) + sum(lengths)  # the system text and "Assistant:"
    for first in range(len(exchanges)):
        if total <= max_prompt_tokens:
            candidate = system + turns[2 * first:]
            if len(tokenizer(generation_prompt(candidate))["input_ids"]) <= max_prompt_tokens:
                return candidate
        total -= lengths[first]
    return None


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, settings: SamplingSettings, streamer=None,
                  stopping_criteria=None) -> tuple[str, bool]:
    """Continue `prompt`; return the new text (special tokens removed) and whether it ended with `<|endoftext|>`."""
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs, **settings.generate_kwargs(inputs["input_ids"].shape[1]), streamer=streamer, stopping_criteria=stopping_criteria,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
    ended = bool(new_tokens) and new_tokens[-1] == tokenizer.eos_token_id
    return tokenizer.decode(new_tokens, skip_special_tokens=True), ended


def generate_reply(model, tokenizer, messages: list[dict], settings: SamplingSettings, streamer=None,
                   stopping_criteria=None) -> tuple[str, bool]:
    """Generate the next assistant reply; return it and whether it ended with `<|endoftext|>` by itself."""
    text, ended = generate_text(model, tokenizer, generation_prompt(messages), settings, streamer, stopping_criteria)
    return text.strip(), ended
