#!/usr/bin/env python
"""Talk to a TRM model: one reply (`--prompt`) or an interactive multi-turn chat read from standard input.

    python run_chat.py outputs/phase2                       # chat; /reset clears the history, /exit quits
    python run_chat.py outputs/phase2 --prompt "Name three primary colours."
    echo "Hello!" | python run_chat.py outputs/phase2       # scripted: one turn per input line
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer

from trm.cli import run_main
from trm.generation import SamplingSettings, context_length, fit_history, generate_reply, load_model


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
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_name_or_path)
    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    max_prompt_tokens = context_length(model) - settings.max_new_tokens
    if max_prompt_tokens <= 0:
        raise ValueError(f"max_new_tokens must be below the context length {context_length(model)}.")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print("Chatting with", args.model_name_or_path, "- /reset clears the history, /exit quits.")
        print("you> ", end="", flush=True)
    lines = [args.prompt] if args.prompt is not None else sys.stdin
    for line in lines:
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            history = list(base)
            print("(history cleared)")
            continue
        conversation = fit_history(history + [{"role": "user", "content": message}], tokenizer, max_prompt_tokens)
        if conversation is None:
            print(f"(that message is too long for the {context_length(model)}-token context; try a shorter one)")
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
