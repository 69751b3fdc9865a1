"""`make export-gguf`: llama.cpp's own converter (fetched from PyPI), and a file whose metadata matches the model."""

import json
import os
import re
import tarfile

import pytest
import torch

from data.prompt_format import generation_prompt, ollama_template
from models.gpt2 import build_model
from trm.sharing import gguf_export

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
    assert "Assistant:" in metadata["chat_template"] and "generation %" not in metadata["chat_template"]
    assert (folder / "chat_template.jinja").read_text().count("{% generation %}") == 1  # the Hub directory keeps it for TRL
    assert not list(folder.glob(".tmp-*")) and "n_ctx" not in json.loads((folder / "config.json").read_text())
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}\n") and "PARAMETER num_ctx 64" in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile


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


def render_go_template(template: str, messages: list[dict]) -> str:
    """Go's text/template semantics for the constructs a Modelfile TEMPLATE uses here: `range .Messages`,
    `if/else if eq .Role "..."`, `end`, `.Content` (and `{{-`/`-}}` trimming, which must not be needed)."""
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)

    def parse(position):
        nodes = []
        while position < len(tokens):
            token = tokens[position]
            action = re.fullmatch(r"{{-?\s*(.*?)\s*-?}}", token)
            if not action:
                nodes.append(("text", token))
                position += 1
                continue
            assert not token.startswith("{{-") and not token.endswith("-}}"), "trim marks would eat the format's newlines"
            body = action.group(1)
            if body in ("end",) or body.startswith("else"):
                return nodes, position
            if body == "range .Messages":
                inner, position = parse(position + 1)
                nodes.append(("range", inner))
                position += 1
            elif body.startswith("if "):
                branches, condition = [], body[3:]
                while True:
                    inner, position = parse(position + 1)
                    branches.append((condition, inner))
                    closing = re.fullmatch(r"{{-?\s*(.*?)\s*-?}}", tokens[position]).group(1)
                    if closing == "end":
                        break
                    condition = closing[len("else if "):] if closing.startswith("else if ") else "true"
                nodes.append(("if", branches))
                position += 1
            else:
                assert body == ".Content", body
                nodes.append(("content", None))
                position += 1
        return nodes, position

    def run(nodes, message=None):
        out = []
        for kind, value in nodes:
            if kind == "text":
                out.append(value)
            elif kind == "content":
                out.append(message["content"])
            elif kind == "range":
                out += [run(value, m) for m in messages]
            else:
                for condition, inner in value:
                    role = re.fullmatch(r'eq \.Role "(\w+)"', condition)
                    if condition == "true" or (role and message["role"] == role.group(1)):
                        out.append(run(inner, message))
                        break
        return "".join(out)

    return run(parse(0)[0])


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are TRM."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
     {"role": "user", "content": "Another?"}],
])
def test_the_modelfile_template_renders_the_chat_templates_prompt(tokenizer, messages):
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_go_template(ollama_template(), messages) == expected == generation_prompt(messages)


def test_a_tampered_converter_archive_is_refused_before_anything_is_unpacked(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / f"llama_cpp_python-{gguf_export.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    payload = tmp_path / "payload"
    (payload / "vendor" / "llama.cpp").mkdir(parents=True)
    (payload / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").write_text("open('PWNED', 'w')\n")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(payload, arcname=f"llama_cpp_python-{gguf_export.LLAMA_CPP_PYTHON_VERSION}")
    with pytest.raises(gguf_export.ExportError, match="not the pinned"):
        gguf_export.converter_dir(cache)
    assert not archive.exists() and [p.name for p in cache.iterdir()] == []  # removed, nothing unpacked


def test_a_changed_unpacked_converter_is_unpacked_again_from_the_verified_archive(tmp_path):
    real = gguf_export.converter_dir()  # downloads and verifies the pinned archive once
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = f"llama_cpp_python-{gguf_export.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    os.link(gguf_export.CACHE / archive, cache / archive)
    root = gguf_export.converter_dir(cache)
    script = root / "convert_hf_to_gguf.py"
    original = script.read_text()
    script.write_text(original + "\nopen('PWNED', 'w')\n")
    assert gguf_export.converter_dir(cache) == root and script.read_text() == original
    assert (real / "convert_hf_to_gguf.py").read_text() == original


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
