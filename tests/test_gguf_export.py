"""`make export-gguf`: llama.cpp's own converter (fetched from PyPI), and a file whose metadata matches the model."""

import json

import pytest
import torch

from models.gpt2 import build_model
from trm import gguf_export

from conftest import TINY_CONFIG


def _save(folder, tokenizer, config_path, config_json=None, scale=1.0):
    if config_json is not None:
        config_path.write_text(json.dumps(config_json))
    model = build_model(config_path, seed=0).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture()
def llama_shape(tmp_path):
    return {**TINY_CONFIG, "n_inner": 4 * TINY_CONFIG["n_embd"]}  # llama.cpp's GPT-2 loader assumes this MLP width


def test_export_writes_a_gguf_file_matching_the_model(tmp_path, tokenizer, llama_shape):
    folder = tmp_path / "model"
    _save(folder, tokenizer, tmp_path / "shape.json", llama_shape)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_ctx"}))  # an older save
    path = gguf_export.export(folder, outtype="f32")
    metadata = gguf_export.gguf_metadata(path, gguf_export.converter_dir())
    assert metadata["architecture"] == "gpt2" and metadata["context_length"] == 64
    assert metadata["vocabulary"] == 50257 and metadata["eos_token_id"] == 50256
    assert "Assistant:" in metadata["chat_template"]
    assert not list(folder.glob(".tmp-*")) and "n_ctx" not in json.loads((folder / "config.json").read_text())


def test_a_file_that_does_not_match_is_not_left_behind(tmp_path, tokenizer, llama_shape, tiny_config_path, monkeypatch):
    folder = tmp_path / "model"
    _save(folder, tokenizer, tmp_path / "shape.json", llama_shape)
    real = gguf_export.expected_metadata
    monkeypatch.setattr(gguf_export, "expected_metadata", lambda model_dir: {**real(model_dir), "context_length": 1024})
    with pytest.raises(gguf_export.ExportError, match="context_length: 64 != 1024"):
        gguf_export.export(folder, outtype="f32")
    assert not list(folder.glob("*.gguf")) and not list(folder.glob(".tmp-*"))
    with pytest.raises(FileNotFoundError, match="not a trained model directory"):
        gguf_export.export(tmp_path)
    narrow = tmp_path / "narrow"
    _save(narrow, tokenizer, tiny_config_path)  # TINY_CONFIG's MLP is 2 x n_embd wide
    with pytest.raises(gguf_export.ExportError, match="4 x n_embd"):
        gguf_export.export(narrow, outtype="f32")


def test_llama_cpp_greedy_output_matches_transformers(tmp_path, tokenizer, llama_shape):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    folder = tmp_path / "model"
    # Well-separated logits: no near-ties for the two runtimes to break differently.
    model = _save(folder, tokenizer, tmp_path / "shape.json", llama_shape, scale=30.0)
    llm = llama_cpp.Llama(model_path=str(gguf_export.export(folder, outtype="f32")), n_ctx=64, verbose=False)
    for prompt in ("The river", "User: Hello\nAssistant:", "In 1905, Albert Einstein"):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                  pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        tokens = []
        for token in llm.generate(ids[0].tolist(), temp=0.0, repeat_penalty=1.0, top_k=1, reset=True):
            tokens.append(token)
            if len(tokens) == len(expected):
                break
        assert tokens == expected, prompt
