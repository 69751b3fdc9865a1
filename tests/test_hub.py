"""The Hub path through the real `datasets` code: a local stand-in of the Hub's file API on 127.0.0.1 serves
repositories in their real layouts, and the real entry points run against it in child processes
(`HF_ENDPOINT`, a fresh `HF_HOME`). Nothing here patches `load_dataset`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from hub_standin import HubStandIn

pytestmark = pytest.mark.filterwarnings("ignore")


def _parquet(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def _squad_rows(prefix: str, count: int, unanswerable: bool) -> list[dict]:
    rows = []
    for i in range(count):
        context = f"The town of {prefix}{i} lies on the river Ora. Its mayor is Anna{i}."
        rows.append({"id": f"{prefix}{i}a", "title": "Towns", "context": context, "question": f"Who is the mayor of {prefix}{i}?",
                     "answers": {"text": [f"Anna{i}"], "answer_start": [context.index("Anna")]}})
        if unanswerable:
            rows.append({"id": f"{prefix}{i}b", "title": "Towns", "context": context, "question": f"Who founded {prefix}{i}?",
                         "answers": {"text": [], "answer_start": []}})
    return rows


def _squad_repo(unanswerable: bool) -> dict:
    return {"main": {
        "README.md": b"---\nlicense: cc-by-sa-4.0\n---\n# SQuAD\n",
        "plain_text/train-00000-of-00001.parquet": _parquet(_squad_rows("Train", 40, unanswerable)),
        "plain_text/validation-00000-of-00001.parquet": _parquet(_squad_rows("Val", 3, unanswerable)),
    }}


def default_phase2_repositories() -> dict:
    """The phase-2 recipe's Hub sources as they are laid out on the Hub (DailyDialog: a script on main, its
    parquet export on refs/convert/parquet)."""
    dialogues = [{"dialog": [f"Hello , I am {i} . ", "Nice to meet you ! "], "act": [1, 2], "emotion": [0, 0]} for i in range(60)]
    return {
        "tatsu-lab/alpaca": {"main": {
            "README.md": b"---\nlicense: cc-by-nc-4.0\n---\n# Alpaca\n",
            "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet": _parquet(
                [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}", "text": ""} for i in range(80)]),
        }},
        "rajpurkar/squad": _squad_repo(unanswerable=False),
        "rajpurkar/squad_v2": _squad_repo(unanswerable=True),
        "li2017dailydialog/daily_dialog": {
            "main": {"README.md": b"# DailyDialog\n", "daily_dialog.py": b"import datasets\n"},
            "refs/convert/parquet": {
                "default/train/0000.parquet": _parquet(dialogues),
                "default/validation/0000.parquet": _parquet(dialogues[:5]),
                "default/test/0000.parquet": _parquet(dialogues[:5]),
            },
        },
    }


def _run(hub: HubStandIn, tmp_path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    return subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


SFT_TINY = ["--precision", "fp32", "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "2", "--eval_steps", "2",
            "--save_steps", "2", "--logging_steps", "1", "--max_seq_length", "64", "--per_device_train_batch_size", "4",
            "--validation_split_percentage", "20"]


def test_default_sft_recipe_loads_every_hub_source_and_a_second_run_reuses_the_prepared_data(tmp_path, model_dir):
    with HubStandIn(default_phase2_repositories()) as hub:
        command = ["run_sft.py", "recipes/phase2_instruction_tuning.yaml", "--model_name_or_path", str(model_dir),
                   "--data_cache_dir", str(tmp_path / "cache"), *SFT_TINY]
        first = _run(hub, tmp_path, *command, "--output_dir", str(tmp_path / "phase2"))
        assert first.returncode == 0, first.stderr[-3000:]
        assert (tmp_path / "phase2" / "model.safetensors").is_file()
        mix = first.stderr[first.stderr.index("Phase-2 mix:"):]
        for source in ("alpaca", "squad", "squad_v2", "dailydialog"):
            assert f"\n{source} " in mix
        assert any("refs%2Fconvert%2Fparquet" in request for request in hub.requests_seen)
        card = (tmp_path / "phase2" / "README.md").read_text()
        assert "li2017dailydialog/daily_dialog" in card and "rajpurkar/squad_v2" in card
        assert "httpx" not in first.stderr  # third-party request logs stay quiet

        hub.requests_seen.clear()
        second = _run(hub, tmp_path, *command, "--output_dir", str(tmp_path / "phase2-again"))
        assert second.returncode == 0, second.stderr[-3000:]
        assert "phase-2 data from cache" in second.stderr
        assert hub.requests_seen == []  # nothing prepared again: not even the preflight went to the Hub


WIKIPEDIA_CARD = b"""---
configs:
- config_name: 20231101.simple
  data_files:
  - split: train
    path: 20231101.simple/train-*
---
# Wikipedia
"""

PREPARE = """
import json, sys
from data.pretraining import PretrainingDataArguments, prepare_pretraining_data
from trm.cli import run_main
def main():
    args = PretrainingDataArguments(data_cache_dir=sys.argv[1], block_size=32, min_document_chars=20,
                                    validation_split_percentage=10.0, preprocessing_num_workers=1)
    print(json.dumps(prepare_pretraining_data(args)[1]))
run_main(main)
"""


def test_phase1_reads_simple_wikipedia_in_its_hub_layout_and_refuses_dialogue_in_it(tmp_path):
    pages = [{"id": str(i), "url": f"https://simple.wikipedia.org/wiki/{i}", "title": f"Page {i}",
              "text": f"Page {i} is an article about the number {i}. It is a page of plain running text."} for i in range(80)]
    layout = lambda rows: {"wikimedia/wikipedia": {"main": {  # noqa: E731
        "README.md": WIKIPEDIA_CARD, "20231101.simple/train-00000-of-00001.parquet": _parquet(rows)}}}
    with HubStandIn(layout(pages)) as hub:
        result = _run(hub, tmp_path, "-c", PREPARE, str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["documents_kept"] == 80 and stats["source"] == "wikimedia/wikipedia (20231101.simple)"
    dialogue = {"id": "x", "url": "u", "title": "t", "text": "A __eou__ B __eou__ C __eou__"}
    with HubStandIn(layout(pages + [dialogue])) as hub:
        result = _run(hub, tmp_path / "other", "-c", PREPARE, str(tmp_path / "cache-other"))
    assert result.returncode == 2 and "refused:" in result.stderr and "row 80" in result.stderr, result.stderr[-3000:]


def test_a_script_only_or_missing_repository_is_one_sentence_naming_the_cause(tmp_path):
    repositories = {"someone/scripted": {"main": {"README.md": b"# scripted\n", "scripted.py": b"import datasets\n"}}}
    with HubStandIn(repositories) as hub:
        for name, cause in (("someone/scripted", "loading-script repository"), ("nobody/missing", "does not exist on the Hub")):
            result = _run(hub, tmp_path, "run_clm.py", "recipes/phase1_pretraining.yaml", "--dataset_name", name,
                          "--dataset_config_name", "null", "--data_cache_dir", str(tmp_path / "cache"),
                          "--output_dir", str(tmp_path / name.replace("/", "_")))
            assert result.returncode == 2, result.stderr[-3000:]
            message = result.stderr.strip().splitlines()[-1]
            assert message.startswith("error: ") and cause in message and name in message
            assert "Traceback" not in result.stderr and "offline" not in message


def test_full_recipe_with_a_broken_phase2_source_stops_before_phase1(tmp_path, wiki_jsonl, tiny_config_path):
    repositories = default_phase2_repositories()
    del repositories["li2017dailydialog/daily_dialog"]["refs/convert/parquet"]  # a repository without its export
    with HubStandIn(repositories) as hub:
        result = _run(hub, tmp_path, "run_full_recipe.py", "--output_dir", str(tmp_path / "full"),
                      "--phase1_args", f"--config_name {tiny_config_path} --train_file {wiki_jsonl} --data_cache_dir {tmp_path / 'cache'}",
                      "--phase2_args", f"--data_cache_dir {tmp_path / 'cache'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "phase 2: dailydialog: could not load li2017dailydialog/daily_dialog@refs/convert/parquet" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "full" / "phase1").exists()  # nothing started


def test_eval_squad_v2_hub_scores_the_v2_validation_split_and_the_card_says_so(tmp_path, model_dir):
    (model_dir / "README.md").write_text("---\nlicense: mit\n---\n# model\n")
    with HubStandIn(default_phase2_repositories()) as hub:
        result = _run(hub, tmp_path, "run_eval.py", str(model_dir), "--squad_v2_file", "hub", "--decoding", "free",
                      "--report", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "report.json").read_text())["squad_v2.0 free"]
    assert (scores["dataset"], scores["split"], scores["total"]) == ("rajpurkar/squad_v2", "validation", 6)
    assert {example["id"][:3] for example in scores["examples"]} == {"Val"}  # never the training split
    card = (model_dir / "README.md").read_text()
    assert "dataset:\n      name: SQuAD v2.0 (validation)\n      type: rajpurkar/squad_v2\n      split: validation" in card
