#!/usr/bin/env python
"""Does TRL train a TRM model with the same loss masks as `run_sft.py`? (TRL is not a dependency: `pip install trl`.)

    python benchmarks/trl_compatibility.py MODEL_DIR

Tokenises and collates a few conversations with TRL's `SFTTrainer(assistant_only_loss=True)`, which takes the loss
mask from the chat template's `{% generation %}` marks stored with every TRM model, and compares the ids and
labels of TRL's batches with `data.sft.encode_messages` (what phase 2 trains on). Prints one line per conversation and exits 1 on any
difference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.sft import IGNORE_INDEX, encode_messages  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from trm.generation import load_model  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Name three primary colours."}, {"role": "assistant", "content": "Red, yellow and blue."}],
    [{"role": "system", "content": "You are TRM."}, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "I am fine, thank you."}],
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name_or_path")
    args = parser.parse_args()
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, stored = load_model(args.model_name_or_path)
    tokenizer = load_tokenizer(model_max_length=int(model.config.n_positions))  # the chat template TRM saves today
    if "{% generation %}" not in (stored.chat_template or ""):
        print(f"{args.model_name_or_path} was saved before its chat template carried generation marks; using today's template")
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(output_dir=output_dir, assistant_only_loss=True, max_length=int(model.config.n_positions),
                           report_to=[], use_cpu=True, packing=False)
        trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"messages": m} for m in CONVERSATIONS]))
        batches = [trainer.data_collator([row]) for row in trainer.train_dataset]  # what TRL's training step receives
    differences = 0
    for messages, batch in zip(CONVERSATIONS, batches):
        ids, labels = encode_messages(messages, tokenizer)
        same = batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels
        differences += not same
        print(f"{'same' if same else 'DIFFERENT'}: {len(ids)} tokens, {sum(t != IGNORE_INDEX for t in labels)} with loss "
              f"({len(messages)} messages)")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
