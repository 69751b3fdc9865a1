"""`make full-recipe` with tiny limits: every stage runs, the report holds every number, a rerun redoes nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import run_full_recipe
from conftest import ROOT



def _squad(path, count):
    paragraphs = []
    for i in range(count):
        context = f"The town of Vel{i} lies on the river Ora. Its mayor is Anna{i}."
        paragraphs.append({"context": context, "qas": [
            {"id": f"{i}a", "question": f"Who is the mayor of Vel{i}?", "answers": [{"text": f"Anna{i}", "answer_start": context.index("Anna")}]},
            {"id": f"{i}b", "question": f"Who founded Vel{i}?", "answers": [], "is_impossible": True}]})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Towns", "paragraphs": paragraphs}]}))
    return path


def _tiny_recipe_argv(tmp_path, wiki_jsonl, tiny_config_path, output) -> list[str]:
    """The whole recipe at toy size on files written here (phase 1: 6 steps, phase 2: 6 steps, 4 questions)."""
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(80)]))
    dialogues = tmp_path / "dialogues.txt"
    dialogues.write_text("".join(f"Hello , I am {i} . __eou__ Nice to meet you ! __eou__\n" for i in range(40)))
    squad_train, squad_test = _squad(tmp_path / "train-v2.0.json", 30), _squad(tmp_path / "test-v2.0.json", 4)
    blimp = tmp_path / "blimp"
    blimp.mkdir(exist_ok=True)
    (blimp / "agreement.jsonl").write_text("".join(json.dumps({"sentence_good": f"The cat {i} sleeps.", "sentence_bad": f"The cat {i} sleep.",
                                                                "field": "morphology", "UID": "agreement"}) + "\n" for i in range(6)))
    common = "--precision fp32 --report_to none --disable_tqdm true --logging_steps 2 --eval_steps 3 --save_steps 3 --max_steps 6"
    return [
        "--output_dir", str(output), "--eval_limit", "4", "--blimp", str(blimp),
        "--squad_file", str(squad_test), "--squad_v2_file", str(squad_test),
        "--phase1_args", f"--config_name {tiny_config_path} --train_file {wiki_jsonl} --block_size 32 --min_document_chars 20 "
                         f"--validation_split_percentage 10 --data_cache_dir {tmp_path / 'cache'} {common}",
        "--phase2_args", f"--alpaca_file {alpaca} --dailydialog_file {dialogues} --squad_v2_file {squad_train} "
                         f"--squad_file {squad_train} --max_seq_length 64 --validation_split_percentage 20 --data_cache_dir {tmp_path / 'cache'} "
                         f"--per_device_train_batch_size 4 {common}",
    ]


def test_full_recipe_runs_every_stage_writes_the_report_and_resumes_without_redoing(tmp_path, wiki_jsonl, tiny_config_path, capsys):
    argv = _tiny_recipe_argv(tmp_path, wiki_jsonl, tiny_config_path, tmp_path / "full")
    report = run_full_recipe.main(argv)
    phase1, phase2 = report["phase1"], report["phase2"]
    assert 0 < phase1["tokens_seen"] <= 6 * 8 * 4 * 32 and phase1["validation_loss"] < 11 and phase1["bits_per_byte"] > 0
    assert phase1["blimp"]["pairs"] == 6 and 0 <= phase1["blimp"]["mean"] <= 100
    assert phase1["copying"]["copy_loss"] > 0 and phase1["wall_s"] > 0 and phase1["tokens_per_second"] > 0
    assert phase2["validation_loss"] > 0 and 0 <= phase2["instructions"]["ended_by_itself"] <= 1
    assert set(report["squad"]) == {"squad_v1.1 free", "squad_v1.1 grounded", "squad_v2.0 free", "squad_v2.0 grounded"}
    markdown = (tmp_path / "full" / "report.md").read_text()
    assert "held-out bits per byte" in markdown and "BLiMP" in markdown and "squad_v2.0 grounded" in markdown
    assert json.loads((tmp_path / "full" / "report.json").read_text()) == json.loads(json.dumps(report))

    capsys.readouterr()
    again = run_full_recipe.main(argv)
    assert "$ " not in capsys.readouterr().out  # every stage was done: nothing ran again
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(report))


def _kill_group_when(command, output, ready, timeout=600):
    """Start `command` in its own process group; once `ready(output)` holds, SIGKILL the whole group."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not ready(output):
        assert process.poll() is None, f"the recipe ended before the kill point: {process.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _complete_checkpoint(folder, step):
    from trm.training import checkpoint_problem

    return (folder / f"checkpoint-{step}").is_dir() and checkpoint_problem(folder / f"checkpoint-{step}") is None


def _quality(report):
    """What a report says about the models (wall times and throughput differ from run to run)."""
    p1, p2 = report["phase1"], report["phase2"]
    return {"phase1": [p1["validation_loss"], p1["held_out_loss"], p1["bits_per_byte"], p1["copying"], p1["blimp"]["mean"]],
            "phase2": [p2["validation_loss"], p2["copying"], p2["instructions"]], "squad": report["squad"]}


@pytest.mark.slow
def test_a_recipe_killed_at_every_stage_boundary_ends_with_the_report_of_an_uninterrupted_run(
        tmp_path, wiki_jsonl, tiny_config_path):
    argv = _tiny_recipe_argv(tmp_path, wiki_jsonl, tiny_config_path, tmp_path / "reference")
    reference = run_full_recipe.main(argv)
    output = tmp_path / "killed"
    command = [sys.executable, "run_full_recipe.py", *_tiny_recipe_argv(tmp_path, wiki_jsonl, tiny_config_path, output)]
    for ready in (lambda out: _complete_checkpoint(out / "phase1", 6),       # between the last checkpoint and the model
                  lambda out: (out / "phase1" / "training_log.json").is_file(),  # phase 1 done, its evaluation not begun
                  lambda out: (out / "stages" / "phase1_eval.json").is_file(),   # phase-1 evaluation stored
                  lambda out: _complete_checkpoint(out / "phase2", 6),
                  lambda out: (out / "phase2" / "training_log.json").is_file()):
        _kill_group_when(command, output, ready)
    # What a parent stopped before it wrote any bookkeeping leaves behind: finished stages, no stages/ folder.
    shutil.rmtree(output / "stages")
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    again = json.loads((output / "report.json").read_text())
    assert _close(_quality(again), _quality(reference)), (_quality(again), _quality(reference))


def _close(a, b, tolerance=1e-4) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tolerance
    return a == b
