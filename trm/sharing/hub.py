"""Upload a trained model directory to the Hugging Face Hub: `python -m trm.sharing.hub MODEL_DIR USER/NAME [--private]`.

The directory is already in Hub format; checkpoints, TensorBoard runs and temporary files stay local.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trm.cli import run_main

LOCAL_ONLY = [
    "checkpoint-*", "checkpoint-*/**", "runs/**", ".tmp-*", "*.tmp", "**/*.tmp", "log.csv", ".lock", "run_settings.json",
    "optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin",  # pickled training state: never published
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("hub_id", help="repository id, e.g. your-name/trm-gpt2-tiny")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(args.model_dir)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a trained model directory (config.json and model.safetensors).")
    from huggingface_hub import create_repo, upload_folder

    create_repo(args.hub_id, private=args.private, exist_ok=True)
    commit = upload_folder(repo_id=args.hub_id, folder_path=str(folder), ignore_patterns=LOCAL_ONLY)
    print(f"uploaded {folder} to {commit}")


if __name__ == "__main__":
    run_main(main)
