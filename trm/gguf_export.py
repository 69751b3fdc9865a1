"""Export a model directory to GGUF for llama.cpp: `python -m trm.gguf_export MODEL_DIR [--outtype q8_0]`.

Design decisions:
- The conversion is llama.cpp's own `convert_hf_to_gguf.py`. It is taken from the `llama-cpp-python` source
  distribution on PyPI (version pinned below): pip downloads it once into `cache/llama.cpp/`, and only the
  converter, its `conversion` package and its `gguf-py` library are unpacked. Nothing is copied into this
  repository and no C++ is built.
- The converter reads the context as `n_ctx`, which TRM's configs carry; a model saved without it is
  converted from a linked copy whose config has it (the model directory is never changed). The chat
  template's `{% generation %}` marks are ignored by llama.cpp's template engine. A shape llama.cpp cannot
  load (an MLP width other than 4 x n_embd) is refused before converting.
- The GGUF file is written under a temporary name, read back with the converter's own `gguf` library,
  checked against the model (architecture, context, vocabulary size, EOS id, chat template) and only then
  renamed into place: a file that does not match is never left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from trm.cli import run_main

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE = Path(__file__).resolve().parent.parent / "cache" / "llama.cpp"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class ExportError(RuntimeError):
    """The converter could not be fetched or run, or its output does not match the model."""


def converter_dir(cache: Path = CACHE) -> Path:
    """The unpacked llama.cpp converter (downloaded from PyPI on first use)."""
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not archive.is_file():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--no-deps",
             "--no-binary", ":all:", "--quiet", "-d", str(cache)], capture_output=True, text=True)
        if result.returncode != 0 or not archive.is_file():
            reason = (result.stderr.strip().splitlines() or ["no archive"])[-1]
            raise ExportError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} from PyPI for its GGUF converter ({reason}).")
    top = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    wanted = tuple(f"{top}/vendor/llama.cpp/{name}" for name in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/"))
    staging = cache / f".tmp-unpack-{os.getpid()}"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
        tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(cache / top, ignore_errors=True)  # a half-unpacked copy from an interrupted run
    os.replace(staging / top, cache / top)
    shutil.rmtree(staging)
    return root


def gguf_metadata(path: Path, converter: Path) -> dict:
    """The fields of a GGUF file that must match the model, read with the converter's own `gguf` library."""
    sys.path.insert(0, str(converter / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    fields = gguf.GGUFReader(str(path)).fields

    def value(key):
        return fields[key].contents() if key in fields else None

    return {
        "architecture": value("general.architecture"), "context_length": value("gpt2.context_length"),
        "vocabulary": len(value("tokenizer.ggml.tokens") or []), "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "chat_template": value("tokenizer.chat_template"), "file_type": value("general.file_type"),
    }


def expected_metadata(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    template = model_dir / "chat_template.jinja"
    return {
        "architecture": "gpt2", "context_length": config["n_positions"], "vocabulary": config["vocab_size"],
        "eos_token_id": config["eos_token_id"], "chat_template": template.read_text(encoding="utf-8") if template.is_file() else None,
    }


def export(model_dir: str | Path, outfile: str | Path | None = None, outtype: str = "q8_0", cache: Path = CACHE) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} is not a trained model directory (config.json and model.safetensors).")
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}.")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise ExportError(f"{model_dir}: n_inner {config['n_inner']} is not 4 x n_embd ({4 * config['n_embd']}), "
                          "which llama.cpp's GPT-2 loader assumes; this shape cannot run there.")
    outfile = Path(outfile) if outfile else model_dir / f"{model_dir.name}-{outtype}.gguf"
    converter = converter_dir(cache)
    tmp = outfile.with_name(f".tmp-{outfile.name}")
    with tempfile.TemporaryDirectory() as staging:
        # The converter reads the context as n_ctx, which models saved before TRM wrote it lack: it gets a copy of
        # the config with n_ctx, and links to everything else.
        source = Path(staging) / model_dir.name
        source.mkdir()
        for item in model_dir.iterdir():
            if item.is_file() and item.name != "config.json" and not item.name.endswith(".gguf"):
                (source / item.name).symlink_to(item.resolve())
        (source / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}), encoding="utf-8")
        result = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(source), "--outfile",
                                 str(tmp), "--outtype", outtype], capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise ExportError(f"llama.cpp's converter failed on {model_dir} ({reason}).")
    found, expected = gguf_metadata(tmp, converter), expected_metadata(model_dir)
    wrong = [f"{key}: {found[key]!r} != {value!r}" for key, value in expected.items() if found[key] != value]
    if wrong:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"the GGUF file does not match {model_dir}: {'; '.join(wrong)}.")
    os.replace(tmp, outfile)
    return outfile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--outfile", help="default: MODEL_DIR/<name>-<outtype>.gguf")
    parser.add_argument("--outtype", default="q8_0", choices=OUTTYPES)
    args = parser.parse_args(argv)
    try:
        path = export(args.model_dir, args.outfile, args.outtype)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run it with llama.cpp: llama-cli -m {path}")


if __name__ == "__main__":
    run_main(main)
