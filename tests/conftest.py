"""Shared fixtures: the real tokenizer, a tiny GPT-2 shape, small data files in the original formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
EOS = 50256
SAMPLES = ROOT / "data" / "samples"

TINY_CONFIG = {
    "model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2,
    "n_inner": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
    "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256,
}

WIKI_DOCS = [
    "The river flows through the old town.[1] It is long and wide.\n\nThe bridge over the river was built in 1850.",
    "A CAT IS A SMALL ANIMAL. Cats like to sleep in the sun and play with string.\nCategory:Animals Category:Pets",
    "Paris is the capital city of France. Many people visit the city every year to see its museums.",
    "The moon goes around the Earth. It takes about a month to go around once.{{citation}} }}",
    "Trees grow from seeds. Their leaves use sunlight to make food for the tree.\n-   Oak\n-   Pine",
] * 1


@pytest.fixture(scope="session")
def tokenizer():
    from data.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture()
def tiny_config_path(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture()
def wiki_jsonl(tmp_path) -> Path:
    """A small Wikipedia-like JSON-lines file with many distinct documents."""
    path = tmp_path / "wiki.jsonl"
    lines = []
    for i in range(60):
        for doc in WIKI_DOCS:
            lines.append(json.dumps({"title": f"t{i}", "text": f"Article {i}. " + doc}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def model_preferring(token_id: int, strength: float) -> GPT2LMHeadModel:
    """A tiny GPT-2 whose every next-token distribution peaks at `token_id` (via the tied embedding)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_CONFIG)).eval()
    with torch.no_grad():
        direction = torch.randn(TINY_CONFIG["n_embd"])
        direction /= direction.norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[token_id] = direction * strength
    return model


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    """A saved model directory whose every reply is the end token at once."""
    from trm.training import default_generation_config

    model = model_preferring(EOS, strength=50.0)
    model.generation_config = default_generation_config(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"
