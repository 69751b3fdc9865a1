"""`make export-gguf`: llama.cpp's own converter (fetched from PyPI), and a file whose metadata matches the model."""

import pytest

from models.gpt2 import build_model
from trm import gguf_export


@pytest.fixture()
def saved_model(tmp_path, tokenizer, tiny_config_path):
    folder = tmp_path / "model"
    build_model(tiny_config_path, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_export_writes_a_gguf_file_matching_the_model(saved_model):
    path = gguf_export.export(saved_model, outtype="f32")
    metadata = gguf_export.gguf_metadata(path, gguf_export.converter_dir())
    assert metadata["architecture"] == "gpt2" and metadata["context_length"] == 64
    assert metadata["vocabulary"] == 50257 and metadata["eos_token_id"] == 50256
    assert "Assistant:" in metadata["chat_template"]
    assert not list(saved_model.glob(".tmp-*"))


def test_a_file_that_does_not_match_is_not_left_behind(saved_model, monkeypatch):
    real = gguf_export.expected_metadata
    monkeypatch.setattr(gguf_export, "expected_metadata", lambda folder: {**real(folder), "context_length": 1024})
    with pytest.raises(gguf_export.ExportError, match="context_length: 64 != 1024"):
        gguf_export.export(saved_model, outtype="f32")
    assert not list(saved_model.glob("*.gguf")) and not list(saved_model.glob(".tmp-*"))
    with pytest.raises(FileNotFoundError, match="not a trained model directory"):
        gguf_export.export(saved_model.parent)
