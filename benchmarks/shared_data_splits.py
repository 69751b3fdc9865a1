#!/usr/bin/env python
"""The data files behind the README's phase-2 numbers, made from the shared data folder.

    python benchmarks/shared_data_splits.py ../shared/data cache/splits

- `alpaca_merged.json`: the three Alpaca-format files of `instructions/` as one JSON list.
- `squad_v1_train.json` / `squad_v1_heldout.json` and `squad_v2_*`: the SQuAD dev parts split by article.
  An article is held out when the MD5 of its title is 0 mod 5, so v1.1 and v2.0 (which share articles)
  hold out the same ones and no passage is both trained on and scored.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run_eval import write_json_atomically  # noqa: E402

ALPACA_FILES = ("alpaca_eval_outputs", "code_alpaca_2k", "self_instruct_seed")
SQUAD_FILES = {"v1": "dev-v1.1.part.json", "v2": "dev-v2.0.part.json"}


def held_out(title: str) -> bool:
    return int(hashlib.md5(title.encode()).hexdigest(), 16) % 5 == 0


def main(shared: str, out: str) -> None:
    shared_dir, out_dir = Path(shared), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for name in ALPACA_FILES:
        records += json.loads((shared_dir / "instructions" / f"{name}.alpaca.json").read_text())
    write_json_atomically(out_dir / "alpaca_merged.json", records)
    print(f"alpaca_merged.json: {len(records)} records")
    for version, name in SQUAD_FILES.items():
        document = json.loads((shared_dir / "squad" / name).read_text())
        for split, keep in (("train", False), ("heldout", True)):
            articles = [a for a in document["data"] if held_out(a["title"]) == keep]
            write_json_atomically(out_dir / f"squad_{version}_{split}.json", {**document, "data": articles})
            questions = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
            print(f"squad_{version}_{split}.json: {len(articles)} articles, {questions} questions")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
