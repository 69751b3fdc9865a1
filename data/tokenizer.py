"""The GPT-2 tokenizer, offline and exact.

Design decisions:
- The original GPT-2 BPE files (`encoder.json`, `vocab.bpe`) ship inside the repository and are checked
  against their published SHA-256 before use, so every run tokenises exactly as OpenAI's GPT-2 does,
  with or without network. The tokenizer is never retrained (the user's rule).
- The fast tokenizer is built from `vocab=`/`merges=` objects: in transformers 5 the `vocab_file=` form
  silently yields a one-token tokenizer, so the result is also checked on a known string.
- `<|endoftext|>` (50256) is the only special token: it separates documents in phase 1, ends every
  reply in phase 2 and doubles as the padding token (padding positions never carry a label).
- The prompt format of `data.prompt_format` is attached as the chat template, so every saved model
  directory carries the one format that training, generation, chat and evaluation share.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from transformers import GPT2TokenizerFast

from data.prompt_format import CHAT_TEMPLATE

TOKENIZER_DIR = Path(__file__).resolve().parent / "gpt2_tokenizer"
FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
VOCAB_SIZE = 50257
EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 50256
CONTEXT_LENGTH = 256


def _verified_bytes(name: str) -> bytes:
    path = TOKENIZER_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 tokenizer file {path} is missing; restore it from the repository.")
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != FILE_SHA256[name]:
        raise ValueError(f"GPT-2 tokenizer file {path} has sha256 {digest}, expected {FILE_SHA256[name]}.")
    return payload


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads(_verified_bytes("encoder.json"))
    lines = _verified_bytes("vocab.bpe").decode("utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a "#version" header
    return vocab, merges


def load_tokenizer(model_max_length: int = CONTEXT_LENGTH) -> GPT2TokenizerFast:
    """Return the verified GPT-2 tokenizer (50,257 tokens, `<|endoftext|>` = 50256)."""
    vocab, merges = _vocab_and_merges()
    tokenizer = GPT2TokenizerFast(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer("Hello world")["input_ids"]
    if len(tokenizer) != VOCAB_SIZE or tokenizer.eos_token_id != EOS_TOKEN_ID or ids != [15496, 995]:
        raise RuntimeError(
            f"The GPT-2 tokenizer was built wrongly (size {len(tokenizer)}, 'Hello world' -> {ids}); "
            "check the installed transformers/tokenizers versions."
        )
    return tokenizer
