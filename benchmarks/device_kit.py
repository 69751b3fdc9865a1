#!/usr/bin/env python
"""Pack what a GPU lease needs and the GPU machine lacks into one ignored folder, `.device_kit/`.

    python benchmarks/device_kit.py [--shared ../shared/data] [--kit .device_kit] [--python_version 3.12]

Then, on the device machine (the `device` tool's `run`, `carry: [".device_kit"]`, one call):

    bash benchmarks/device_session.sh

Design decisions:
- The GPU machine reaches no network and `../shared` does not travel, so everything comes in the kit; the working
  tree and the kit travel together under 64 MiB, so the kit refuses to grow past `KIT_LIMIT`.
- Wheels only for what that machine's image lacks or holds too old (`DEVICE_PACKAGES`; its torch, accelerate,
  pyarrow, pandas, tokenizers and huggingface_hub serve as they are), at the versions installed here, so the
  device runs the versions this repository's tests ran with. Their SHA-256 sums, and the data archive's, go in
  `SHA256SUMS`, which the session checks before it installs or reads anything.
- The data keep the shared folder's layout (`data.tar.xz`), so every benchmark takes the unpacked folder as its
  `--shared`: the Wikipedia sample, the SQuAD parts and unseen articles, DailyDialog's dialogues, the Alpaca-format
  instructions and BLiMP (67,000 pairs in 1.6 MB compressed).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The GPU image (KINDS.md, read 2026-11): transformers 5.17 (this repository needs >= 5.24), no datasets or evaluate;
# fsspec at the version datasets accepts.
DEVICE_PACKAGES = ("transformers", "datasets", "evaluate", "dill", "multiprocess", "fsspec")
DATA_FILES = ("wiki/enwiki_pages_sample.jsonl.xz", "squad/dev-v1.1.part.json", "squad/dev-v2.0.part.json",
              "squad/unseen-v1.1.json", "squad/unseen-v2.0.json", "dailydialog/train/dialogues_train.txt",
              "instructions/alpaca_eval_outputs.alpaca.json", "instructions/code_alpaca_2k.alpaca.json",
              "instructions/self_instruct_seed.alpaca.json", "blimp")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
KIT_LIMIT = 56 * 2**20  # bytes: the rest of the 64 MiB is the working tree's


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(folder: Path, python_version: str) -> list[Path]:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in DEVICE_PACKAGES]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)
    return sorted(folder.glob("*.whl"))


def pack_data(shared: Path, archive: Path) -> None:
    missing = [name for name in DATA_FILES if not (shared / name).exists()]
    if missing:
        raise SystemExit(f"{shared} lacks {', '.join(missing)}: give the shared data folder with --shared.")
    with tarfile.open(archive, "w:xz") as tar:
        for name in DATA_FILES:
            tar.add(shared / name, arcname=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--kit", default=".device_kit", help="written afresh; keep it ignored by git")
    parser.add_argument("--python_version", default="3.12", help="the device's Python (3.12 on the H200 image)")
    args = parser.parse_args()
    kit = Path(args.kit)
    building = kit.with_name(kit.name + ".partial")  # the kit appears whole or not at all
    shutil.rmtree(building, ignore_errors=True)
    (building / "wheels").mkdir(parents=True)
    try:
        pack_data(Path(args.shared), building / "data.tar.xz")  # first: a wrong --shared is refused at once
        wheels = download_wheels(building / "wheels", args.python_version)
        files = {path.relative_to(building): path.stat().st_size for path in [*wheels, building / "data.tar.xz"]}
        size = sum(files.values())
        if size > KIT_LIMIT:
            raise SystemExit(f"the kit would take {size / 2**20:.1f} MiB, over the {KIT_LIMIT / 2**20:.0f} MiB it may: "
                             "nothing written.")
        (building / "SHA256SUMS").write_text("".join(f"{sha256(building / name)}  {name}\n" for name in files))
    except subprocess.CalledProcessError:
        shutil.rmtree(building)
        raise SystemExit("pip could not download the wheels (its message is above): nothing written.") from None
    except BaseException:
        shutil.rmtree(building)
        raise
    shutil.rmtree(kit, ignore_errors=True)
    building.rename(kit)
    for name, bytes_ in files.items():
        print(f"{bytes_ / 2**20:8.2f} MiB  {name}")
    print(f"{size / 2**20:8.2f} MiB  in all, in {kit}")


if __name__ == "__main__":
    main()
