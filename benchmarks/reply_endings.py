#!/usr/bin/env python
"""What repetition control does to replies on prompts a model never saw: how many end by themselves, and how good they are.

    python benchmarks/reply_endings.py MODEL_DIR --dailydialog_file dialogues_validation.txt [--report F.json]

Prompts: the project's 50 fixed instructions (`data/samples/eval_instructions.txt`) and the first turns of
the first 50 dialogues of a DailyDialog file the model was not tuned on (its validation split). Each
setting answers every prompt; the table reports, per prompt set: the share of replies that ended with
`<|endoftext|>` by themselves, the share with a repeated word 3-gram (degenerate loops), mean length in
tokens, and for dialogues the token F1 against the reference second turn (a weak but real quality signal).
Repetition controls apply to the reply alone, as everywhere in TRM (`trm.generation`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.instruction_sources import detokenize_dialogue  # noqa: E402
from run_eval import write_json_atomically  # noqa: E402
from trm.generation import SamplingSettings, generate_reply, load_model  # noqa: E402
from trm.metrics.squad.squad import f1 as f1_score  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Every setting names both controls: the defaults of SamplingSettings are themselves one of the rows.
SETTINGS = {
    "greedy": dict(greedy=True, repetition_penalty=1.0, no_repeat_ngram_size=0),
    "greedy, repetition_penalty 1.1": dict(greedy=True, repetition_penalty=1.1, no_repeat_ngram_size=0),
    "greedy, repetition_penalty 1.3": dict(greedy=True, repetition_penalty=1.3, no_repeat_ngram_size=0),
    "greedy, no_repeat_ngram_size 3": dict(greedy=True, repetition_penalty=1.0, no_repeat_ngram_size=3),
    "greedy, rp 1.1 + no_repeat_ngram_size 3": dict(greedy=True, repetition_penalty=1.1, no_repeat_ngram_size=3),
    "sampled (t 0.7), repetition_penalty 1.1": dict(repetition_penalty=1.1, no_repeat_ngram_size=0),
    "sampled (t 0.7), rp 1.1 + no_repeat_ngram_size 3": dict(repetition_penalty=1.1, no_repeat_ngram_size=3),
}


def dialogue_prompts(path: str, count: int) -> list[tuple[str, str]]:
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        turns = [detokenize_dialogue(t) for t in line.split("__eou__") if t.strip()]
        if len(turns) >= 2:
            pairs.append((turns[0], turns[1]))
        if len(pairs) == count:
            break
    return pairs


def has_repeated_trigram(text: str) -> bool:
    words = text.split()
    return any(n > 1 for n in Counter(zip(words, words[1:], words[2:])).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path")
    parser.add_argument("--dailydialog_file", required=True)
    parser.add_argument("--count", type=int, default=50, help="prompts per set")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--settings", help=f"comma-separated row numbers (1-{len(SETTINGS)}) to run; default all")
    parser.add_argument("--report", default="cache/reply_endings.json")
    args = parser.parse_args()
    rows = list(SETTINGS.items())
    if args.settings:
        try:
            rows = [rows[int(number) - 1] for number in args.settings.split(",")]
        except (ValueError, IndexError):
            parser.error(f"--settings takes row numbers from 1 to {len(SETTINGS)}, got {args.settings!r}.")
    model, tokenizer = load_model(args.model_name_or_path)
    instructions = [l.strip() for l in (ROOT / "data/samples/eval_instructions.txt").read_text().splitlines() if l.strip()]
    sets = {"instructions": [(p, None) for p in instructions[: args.count]],
            "dialogue first turns": dialogue_prompts(args.dailydialog_file, args.count)}
    results = []
    print(f"{'setting':<50} {'set':<22} {'ended':>6} {'loops':>6} {'tokens':>7} {'F1':>5} {'s/reply':>8}")
    for name, overrides in rows:
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, **overrides)
        for set_name, prompts in sets.items():
            torch.manual_seed(0)
            ended, loops, tokens, f1, started = 0, 0, 0, 0.0, time.perf_counter()
            replies = []
            for prompt, reference in prompts:
                reply, did_end = generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], settings)
                ended += did_end
                loops += has_repeated_trigram(reply)
                tokens += len(tokenizer(reply)["input_ids"])
                f1 += f1_score(reply, reference) if reference else 0.0
                replies.append({"prompt": prompt, "reply": reply, "ended": did_end})
            n = len(prompts)
            row = {"setting": name, "set": set_name, "prompts": n, "ended_by_itself": ended / n,
                   "repeated_trigram": loops / n, "mean_tokens": tokens / n,
                   "reference_f1": 100 * f1 / n if set_name.startswith("dialogue") else None,
                   "seconds_per_reply": (time.perf_counter() - started) / n, "replies": replies}
            results.append(row)
            f1_text = f"{row['reference_f1']:.1f}" if row["reference_f1"] is not None else "-"
            print(f"{name:<50} {set_name:<22} {row['ended_by_itself']:>6.0%} {row['repeated_trigram']:>6.0%} "
                  f"{row['mean_tokens']:>7.1f} {f1_text:>5} {row['seconds_per_reply']:>8.2f}", flush=True)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(Path(args.report), {"model": args.model_name_or_path, "results": results})
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
