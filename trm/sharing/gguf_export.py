"""Export a model directory to GGUF for llama.cpp and Ollama: `python -m trm.sharing.gguf_export MODEL_DIR [--outtype q8_0]`.

Design decisions:
- The conversion is llama.cpp's own `convert_hf_to_gguf.py`, taken from the `llama-cpp-python` source
  distribution on PyPI (version pinned below). Nothing of it runs before it is verified: the archive is fetched
  as a file, by the URL PyPI's simple index (PEP 691 JSON) lists for it, never through `pip download` (which
  would run the sdist's build backend to read its metadata), and its sha256 must equal the one stored here
  before anything is unpacked. Only the converter, its `conversion` package and its `gguf-py` library are
  unpacked into `cache/llama.cpp/`, with a manifest of their hashes that is checked before every use. Nothing
  is copied into this repository and no C++ is built.
- The converter and `gguf-py` run only in child processes: no code from the archive is imported here.
- The converter reads the context as `n_ctx`, which TRM's configs carry; a model saved without it is
  converted from a linked copy whose config has it (the model directory is never changed). The copy's chat
  template has no `{% generation %}` marks (they exist for TRL's assistant masks; several Jinja runtimes reject
  them), so the GGUF carries the same format without them. A shape llama.cpp cannot load (an MLP width other
  than 4 x n_embd) is refused before converting.
- The GGUF file is written under a temporary name, read back with the converter's own `gguf` library,
  checked against the model (architecture, context, vocabulary size, EOS id, chat template) and only then
  renamed into place: a file that does not match is never left behind.
- Beside it, an Ollama `Modelfile`: the prompt format as Ollama's Go template, the stop sequences and the
  context length, so `ollama create NAME -f Modelfile` runs the model with the format it was trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from data.prompt_format import CHAT_TEMPLATE, EOS, ollama_template
from trm.cli import run_main

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz as PyPI lists it (https://pypi.org/simple/llama-cpp-python/).
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SIMPLE_INDEX = "https://pypi.org/simple/llama-cpp-python/"
CACHE = Path(__file__).resolve().parents[2] / "cache" / "llama.cpp"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MANIFEST = "trm-manifest.json"


class ExportError(RuntimeError):
    """The converter could not be fetched, verified or run, or its output does not match the model."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sdist_url(index: str = SIMPLE_INDEX) -> str:
    """The download URL PyPI lists for the pinned sdist (its JSON simple index, PEP 691)."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    request = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.loads(response.read())["files"]
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"could not read PyPI's index of llama-cpp-python ({error}).") from None
    listed = next((f for f in files if f.get("filename") == name), None)
    if listed is None:
        raise ExportError(f"PyPI lists no {name}.")
    if listed.get("hashes", {}).get("sha256") != SDIST_SHA256:
        raise ExportError(f"PyPI lists {name} with another sha256 than the one this project trusts; not downloading it.")
    return listed["url"]


def fetch_sdist(cache: Path) -> Path:
    """The pinned sdist in `cache`, downloaded if needed; its sha256 is checked before it is used, every time."""
    archive = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(f".tmp-{archive.name}-{os.getpid()}")
        try:
            with urllib.request.urlopen(sdist_url(), timeout=600) as response, open(partial, "wb") as handle:
                shutil.copyfileobj(response, handle)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise ExportError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} from PyPI ({error}).") from None
        os.replace(partial, archive)
    found = sha256_of(archive)
    if found != SDIST_SHA256:
        archive.unlink()
        raise ExportError(f"{archive.name} has sha256 {found}, not the pinned {SDIST_SHA256}: removed it, nothing of it was "
                          "unpacked or run; run the export again to download it afresh.")
    return archive


def _manifest(root: Path) -> dict:
    return {str(path.relative_to(root)): sha256_of(path) for path in sorted(root.rglob("*"))
            if path.is_file() and path.name != MANIFEST}


def converter_dir(cache: Path = CACHE) -> Path:
    """The unpacked llama.cpp converter, verified against the manifest written when it was unpacked."""
    top = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    root = cache / top / "vendor" / "llama.cpp"
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")) == _manifest(root):
        return root
    archive = fetch_sdist(cache)
    wanted = tuple(f"{top}/vendor/llama.cpp/{name}" for name in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/"))
    staging = cache / f".tmp-unpack-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
        tar.extractall(staging, members=members, filter="data")
    unpacked = staging / top / "vendor" / "llama.cpp"
    (unpacked / MANIFEST).write_text(json.dumps(_manifest(unpacked), indent=1), encoding="utf-8")
    shutil.rmtree(cache / top, ignore_errors=True)  # a changed or half-unpacked copy
    os.replace(staging / top, cache / top)
    shutil.rmtree(staging)
    return root


READ_METADATA = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gguf
fields = gguf.GGUFReader(sys.argv[2]).fields
def value(key):
    return fields[key].contents() if key in fields else None
print(json.dumps({
    "architecture": value("general.architecture"), "context_length": value("gpt2.context_length"),
    "vocabulary": len(value("tokenizer.ggml.tokens") or []), "eos_token_id": value("tokenizer.ggml.eos_token_id"),
    "chat_template": value("tokenizer.chat_template"), "file_type": value("general.file_type"),
}))
"""


def gguf_metadata(path: Path, converter: Path) -> dict:
    """The fields of a GGUF file that must match the model, read by the converter's own `gguf` library in a child process."""
    result = subprocess.run([sys.executable, "-I", "-c", READ_METADATA, str(converter / "gguf-py"), str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"could not read {path} back ({(result.stderr.strip().splitlines() or ['no message'])[-1]}).")
    return json.loads(result.stdout)


def plain_chat_template() -> str:
    """The chat template without `{% generation %}` marks: the same text, for runtimes that do not know the tag."""
    return CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def expected_metadata(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    has_template = (model_dir / "chat_template.jinja").is_file()
    return {
        "architecture": "gpt2", "context_length": config["n_positions"], "vocabulary": config["vocab_size"],
        "eos_token_id": config["eos_token_id"], "chat_template": plain_chat_template() if has_template else None,
    }


def write_modelfile(gguf_path: Path, context: int) -> Path:
    """An Ollama Modelfile beside the GGUF file: its template renders the same prompt as the chat template."""
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{ollama_template()}"""', f'PARAMETER stop "{EOS}"',
             'PARAMETER stop "User:"', f"PARAMETER num_ctx {context}", "PARAMETER temperature 0.7", "PARAMETER top_k 50",
             "PARAMETER top_p 0.95", "PARAMETER repeat_penalty 1.1", ""]
    path = gguf_path.with_name("Modelfile")
    tmp = path.with_name(".tmp-Modelfile")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


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
            if item.is_file() and item.name not in ("config.json", "chat_template.jinja") and not item.name.endswith(".gguf"):
                (source / item.name).symlink_to(item.resolve())
        (source / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}), encoding="utf-8")
        if (model_dir / "chat_template.jinja").is_file():
            (source / "chat_template.jinja").write_text(plain_chat_template(), encoding="utf-8")
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
    write_modelfile(outfile, config["n_positions"])
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
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run it with llama.cpp: llama-cli -m {path}\n"
          f"and {path.with_name('Modelfile')} for Ollama: cd {path.parent} && ollama create {path.parent.name} -f Modelfile")


if __name__ == "__main__":
    run_main(main)
