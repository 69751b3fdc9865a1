#!/usr/bin/env python
"""Talk to a TRM model: one reply (`--prompt`) or an interactive multi-turn chat read from standard input.

    python run_chat.py outputs/phase2                       # chat; /reset clears the history, /exit quits
    python run_chat.py outputs/phase2 --prompt "Name three primary colours."
    echo "Hello!" | python run_chat.py outputs/phase2       # scripted: one turn per input line
    python run_chat.py outputs/phase2 --passage_file article.txt   # questions answered from the passage

In the chat, `/passage TEXT` answers the following questions from TEXT (grounded: a span of it, or the
no-answer reply; `/passage` alone returns to free chat), and `/ask QUESTION` answers from the passage
index (`--index`, built by run_index.py) and shows the source.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer

from data.files import DataError, checked_text, read_text
from data.passages import split_passages
from trm.cli import run_main
from trm.generation import SamplingSettings, context_length, fit_history, generate_reply, load_model
from trm.reading.grounded import GroundedSettings, answer_from_passages
from trm.recipe import RecipeError
from trm.reading.retrieval import PassageIndex, ask


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path", help="model directory written by run_sft.py (or run_clm.py)")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="an optional first system message")
    defaults = SamplingSettings()
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy decoding")
    parser.add_argument("--top_k", type=int, default=defaults.top_k)
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--no_repeat_ngram_size", type=int, default=defaults.no_repeat_ngram_size)
    parser.add_argument("--passage_file", help="answer every message from this text (grounded decoding)")
    parser.add_argument("--index", default="cache/index.sqlite", help="passage index for /ask (run_index.py)")
    parser.add_argument("--ask_top_k", type=int, default=5, help="passages /ask retrieves and answers from")
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def grounded_reply(model, tokenizer, passage: str, question: str) -> str:
    """A span of the passage (split into windows if it is long) that answers the question, or the no-answer reply."""
    settings = GroundedSettings.for_model(model.name_or_path)
    chosen = answer_from_passages(model, tokenizer, split_passages(passage, tokenizer) or [passage], question, settings)
    if chosen is None:
        return f"(that question is too long for the {context_length(model)}-token context; try a shorter one)"
    return chosen[1].answer


def ask_reply(model, tokenizer, index_path: str, question: str, top_k: int) -> str:
    index = PassageIndex(index_path, read_only=True)
    try:
        result = ask(model, tokenizer, index, question, GroundedSettings.for_model(model.name_or_path), top_k)
    finally:
        index.close()
    if result.passage is None:
        return f"{result.answer} (no indexed passage shares a word with the question)"
    return f"{result.answer}\n  source: [{result.passage.title}] {result.passage.text}"


MAX_PASSAGE_CHARS = 20_000  # ~40 windows of ~120 tokens: about 10 s of grounded answering on a 2-core CPU


def capped_passage(text: str, source: str) -> str:
    if len(text) > MAX_PASSAGE_CHARS:
        raise DataError(f"{source} holds {len(text):,} characters; a passage may hold at most {MAX_PASSAGE_CHARS:,} "
                        "(index longer texts with make index and use /ask).")
    return text


def stdin_lines():
    """Lines of standard input decoded strictly; None for a line that is not UTF-8 (the chat says so and goes on)."""
    if not hasattr(sys.stdin, "buffer"):  # already text (a script or test handing in a stream)
        yield from sys.stdin
        return
    for raw in sys.stdin.buffer:
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_name_or_path)
    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                                args.no_repeat_ngram_size)
    max_prompt_tokens = context_length(model) - settings.max_new_tokens
    if settings.max_new_tokens < 1 or max_prompt_tokens <= 0:
        raise RecipeError(f"--max_new_tokens must be between 1 and the context length {context_length(model)} - 1.")
    if args.prompt is not None:
        checked_text(args.prompt, "--prompt")
    passage = capped_passage(read_text(args.passage_file), args.passage_file) if args.passage_file else None
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print("Chatting with", args.model_name_or_path, "- /passage TEXT, /ask QUESTION, /reset clears the history, /exit quits.")
        print("you> ", end="", flush=True)
    lines = [args.prompt] if args.prompt is not None else stdin_lines()
    for line in lines:
        if line is None:
            print("(that line is not valid UTF-8 text; skipped)")
            continue
        message = line.strip()
        command, _, rest = message.partition(" ")
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            history = list(base)
            print("(history cleared)")
        elif command == "/passage":
            try:
                passage = capped_passage(rest.strip(), "/passage") or None
            except DataError as error:  # the chat goes on
                print(f"({error})")
                continue
            print("(answering from the passage)" if passage else "(back to free chat)")
        elif command == "/ask":
            try:
                print("assistant>", ask_reply(model, tokenizer, args.index, rest, args.ask_top_k) if rest.strip() else "(usage: /ask QUESTION)")
            except (FileNotFoundError, DataError) as error:  # the chat goes on: a missing index is not the end of it
                print(f"({error})")
        elif passage:
            print("assistant>", grounded_reply(model, tokenizer, passage, message))
        else:
            conversation = fit_history(history + [{"role": "user", "content": message}], tokenizer, max_prompt_tokens)
            if conversation is None:
                too_long = f"that message is too long for the {context_length(model)}-token context"
                if args.prompt is not None:
                    raise DataError(f"{too_long} with room for {settings.max_new_tokens} new tokens; shorten it.")
                print(f"({too_long}; try a shorter one)")
                continue
            print("assistant>", end="", flush=True)
            reply, ended = generate_reply(model, tokenizer, conversation, settings, streamer=streamer)
            if not ended:
                print("(reply cut at max_new_tokens)")
            history = conversation + [{"role": "assistant", "content": reply or "..."}]
        if interactive:
            print("you> ", end="", flush=True)


if __name__ == "__main__":
    run_main(main)
