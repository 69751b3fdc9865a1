"""End-to-end runs of both phases on a tiny model: learning, saving, reloading, resuming, refusing."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import run_clm
import run_sft
from trm.recipe import RecipeError
from trm.rules import RuleViolation

from conftest import write_recipe


def _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path, **training):
    return write_recipe(tmp_path / "phase1.yaml", {
        "model": {"config_name": str(tiny_config_path), "sample_prompts": ["The river"], "sample_max_new_tokens": 5,
                  "precision": "fp32"},  # `auto` times this machine: runs compared with each other need one arithmetic
        "data": {"train_file": [str(wiki_jsonl)], "block_size": 32, "validation_split_percentage": 10.0,
                 "data_cache_dir": str(tmp_path / "cache"), "preprocessing_num_workers": 1, "min_document_chars": 20},
        "training": {
            "output_dir": str(tmp_path / "phase1"), "use_cpu": True, "max_steps": 40, "per_device_train_batch_size": 8,
            "learning_rate": 1e-2, "warmup_steps": 2, "eval_strategy": "steps", "eval_steps": 20, "eval_on_start": True,
            "save_strategy": "steps", "save_steps": 20, "logging_steps": 5, "report_to": [], "disable_tqdm": True,
            "include_num_input_tokens_seen": True, **training,
        },
    })


@pytest.fixture()
def phase1_model(tmp_path, wiki_jsonl, tiny_config_path):
    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path)
    metrics = run_clm.main([str(recipe)])
    return tmp_path / "phase1", metrics, recipe


def test_phase1_learns_saves_and_reloads(phase1_model):
    output_dir, metrics, _ = phase1_model
    history = json.loads((output_dir / "training_log.json").read_text())
    eval_losses = [record["eval_loss"] for record in history if "eval_loss" in record]
    assert eval_losses[0] > 10.0 and eval_losses[-1] < eval_losses[0] - 2.0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "loss_curve.png", "log.csv", "samples.jsonl"):
        assert (output_dir / name).is_file(), name
    assert not list(output_dir.glob(".tmp-*"))
    assert any("tokens_per_second" in record for record in history)
    assert all("eval_copy_loss" in record for record in history if "eval_loss" in record)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 64
    card = (output_dir / "README.md").read_text()
    assert "| precision | fp32 |" in card and str(output_dir.parent) not in card  # no local paths in a card
    from huggingface_hub import ModelCard

    card_data = ModelCard.load(output_dir / "README.md").data
    assert card_data.license == "other" and "trained-from-scratch" in card_data.tags  # local text of unknown origin
    assert {r.metric_type for r in card_data.eval_results} == {"loss", "perplexity"}

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    model.eval()
    ids = torch.tensor([tokenizer("The river flows through the old town.")["input_ids"]])
    again = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
        loss = model(ids, labels=ids).loss.item()
    assert abs(loss - metrics["eval_loss"]) < 3.0


def test_resume_continues_from_the_saved_step(phase1_model, caplog):
    output_dir, _, recipe = phase1_model
    with pytest.raises(FileExistsError, match="--resume"):
        run_clm.main([str(recipe)])
    # A save cut short by kill -9 leaves a newer folder holding some files: resume skips it.
    partial = output_dir / "checkpoint-50"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / "trainer_state.json").write_text('{"global_step": 5')
    with pytest.raises(FileNotFoundError, match="cannot be resumed from"):
        run_clm.main([str(recipe), "--resume_from_checkpoint", str(partial)])
    (output_dir / ".tmp-final-99999").mkdir()  # a final save killed midway
    metrics = run_clm.main([str(recipe), "--resume", "--max_steps", "60", "--learning_rate", "5e-3"])
    assert not (output_dir / ".tmp-final-99999").exists()
    assert "checkpoint-50 (missing model.safetensors" in caplog.text
    assert "not applied: learning_rate 0.01 -> 0.005" in caplog.text  # the checkpoint's schedule goes on
    state = json.loads((output_dir / "checkpoint-60" / "trainer_state.json").read_text())
    steps = [record["step"] for record in state["log_history"] if "loss" in record]
    # The resumed run carries on the first run's log from step 40: every step logged once, none repeated.
    assert state["global_step"] == 60
    assert steps == list(range(5, 65, 5))
    assert metrics["epoch"] > 0
    with pytest.raises(FileExistsError, match="end of a finished run"):
        run_clm.main([str(recipe), "--resume", "--max_steps", "60"])


def test_a_run_killed_between_its_last_checkpoint_and_its_final_model_is_finished_by_resume(phase1_model, caplog):
    output_dir, metrics, recipe = phase1_model
    # What a kill during the final evaluation or save leaves: checkpoint-40 (the last step), no final model.
    for name in ("training_log.json", "model.safetensors", "config.json", "README.md", "loss_curve.png"):
        (output_dir / name).unlink()
    finished = run_clm.main([str(recipe), "--resume"])
    assert "finishing the run from it" in caplog.text
    assert finished["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)  # the same model, evaluated again
    history = json.loads((output_dir / "training_log.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == list(range(5, 45, 5))  # no step trained twice
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "README.md").is_file()
    with pytest.raises(FileExistsError, match="end of a finished run"):  # now it is finished
        run_clm.main([str(recipe), "--resume"])


def test_phase1_refuses_too_many_epochs_and_pretrained_weights(tmp_path, wiki_jsonl, tiny_config_path):
    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path)
    with pytest.raises(RuleViolation, match="capped at 3"):
        run_clm.main([str(recipe), "--num_train_epochs", "4"])
    with pytest.raises(RuleViolation, match="random weights"):
        run_clm.main([str(recipe), "--model_name_or_path", "gpt2"])


def _sft_recipe(tmp_path, model_dir):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(120)]))
    dialogues = tmp_path / "dialogues_train.txt"
    dialogues.write_text("".join(f"Hello , I am {i} . __eou__ Nice to meet you ! __eou__\n" for i in range(60)))
    return write_recipe(tmp_path / "phase2.yaml", {
        "model": {"model_name_or_path": str(model_dir), "precision": "fp32"},
        "data": {"alpaca_file": str(alpaca), "dailydialog_file": str(dialogues), "validation_split_percentage": 10.0,
                 "max_seq_length": 64, "data_cache_dir": str(tmp_path / "cache")},
        "training": {
            "output_dir": str(tmp_path / "phase2"), "use_cpu": True, "max_steps": 30, "num_train_epochs": 2,
            "per_device_train_batch_size": 8, "learning_rate": 5e-3, "eval_strategy": "steps", "eval_steps": 15, "eval_on_start": True,
            "save_strategy": "steps", "save_steps": 15, "logging_steps": 5, "report_to": [], "disable_tqdm": True,
            "load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False,
            "train_sampling_strategy": "group_by_length", "remove_unused_columns": False,
        },
    })


def test_phase2_tunes_the_phase1_model_and_refuses_bad_configs(phase1_model, tmp_path):
    model_dir, _, _ = phase1_model
    recipe = _sft_recipe(tmp_path, model_dir)
    with pytest.raises(RuleViolation, match="capped at 2"):
        run_sft.main([str(recipe), "--num_train_epochs", "3"])
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        run_sft.main([str(recipe), "--model_name_or_path", str(tmp_path / "nowhere")])
    with pytest.raises(RuleViolation, match="phase-1 model"):
        run_sft.main([str(recipe), "--model_name_or_path", "null"])
    with pytest.raises(RecipeError, match="batch_ramp_steps is for phase 1"):
        run_sft.main([str(recipe), "--batch_ramp_steps", "0.1"])
    with pytest.raises(RecipeError, match="choose phase 1's starting weights"):
        run_sft.main([str(recipe), "--sinusoidal_positions", "0.1"])

    callback_warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: callback_warnings.append(record.getMessage())
    logging.getLogger("transformers.trainer_callback").addHandler(handler)
    try:
        metrics = run_sft.main([str(recipe)])
    finally:
        logging.getLogger("transformers.trainer_callback").removeHandler(handler)
    assert not [w for w in callback_warnings if "early stopping" in w]  # the evaluations per source, after training, stop nothing
    output_dir = tmp_path / "phase2"
    history = json.loads((output_dir / "training_log.json").read_text())
    eval_losses = [record["eval_loss"] for record in history if "eval_loss" in record]
    assert eval_losses[-1] < eval_losses[0] - 1.0
    assert metrics["eval_loss"] == pytest.approx(min(eval_losses), abs=1e-3)  # the best checkpoint was kept
    per_source = [metrics[f"eval_{source}_loss"] for source in ("alpaca", "dailydialog")]
    assert min(per_source) <= metrics["eval_loss"] <= max(per_source) and per_source[0] != per_source[1]
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    messages = [{"role": "user", "content": "Say the number 7."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "User: Say the number 7.\nAssistant:"
    from huggingface_hub import ModelCard

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.datasets == ["tatsu-lab/alpaca", "li2017dailydialog/daily_dialog"]
    assert card.data.license == "other" and "trained-from-scratch" not in card.data.tags  # phase 1 read unknown local text
    assert str(tmp_path) not in card.content


def test_phase2_fills_its_time_budget_with_more_of_every_source_and_says_so(tmp_path, tokenizer, caplog):
    from conftest import TINY_CONFIG
    from transformers import GPT2Config, GPT2LMHeadModel

    from data.sft import SftDataArguments, prepare_sft_data

    model_dir = tmp_path / "phase1"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**TINY_CONFIG)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = _sft_recipe(tmp_path, model_dir)
    filled = [str(recipe), "--fill_train_hours", "true", "--alpaca_max_examples", "10", "--dailydialog_max_examples", "10"]
    with pytest.raises(RecipeError, match="fill_train_hours"):
        run_sft.main(filled + ["--max_steps", "-1"])  # no train_hours
    with pytest.raises(RecipeError, match="max_steps"):
        run_sft.main(filled + ["--train_hours", "0.02"])  # max_steps would decide the length, not the data
    with caplog.at_level(logging.WARNING, logger="trm.time_budget"):
        run_sft.main([str(recipe), "--train_hours", "0.02", "--output_dir", str(tmp_path / "unfilled")])
    assert "budget unused: --fill_train_hours true would spend it on more data" in caplog.text  # not "a larger shape"
    run_sft.main(filled + ["--train_hours", "0.02", "--max_steps", "-1", "--num_train_epochs", "1"])
    plan = json.loads((tmp_path / "phase2" / "data_plan.json").read_text())
    _, pool = prepare_sft_data(SftDataArguments(alpaca_file=str(tmp_path / "alpaca.json"), validation_split_percentage=10.0,
                                                dailydialog_file=str(tmp_path / "dialogues_train.txt"), max_seq_length=64,
                                                data_cache_dir=str(tmp_path / "cache"), fill_train_hours=True), tokenizer)
    kept = {source: min(plan["caps"][source], pool[source]["train"]["examples"]) for source in ("alpaca", "dailydialog")}
    assert all(n > 10 for n in kept.values()) and "training tokens/s measured here" in plan["account"]
    card = (tmp_path / "phase2" / "README.md").read_text()
    assert f"alpaca {kept['alpaca']:,}, dailydialog {kept['dailydialog']:,}" in card  # what was trained, not the recipe's caps


def test_phase2_calibrates_its_no_answer_threshold_on_held_out_squad_v2_articles(tmp_path, tokenizer):
    from conftest import TINY_CONFIG
    from test_sft_data import _squad_articles
    from transformers import GPT2Config, GPT2LMHeadModel

    from trm.evaluation import calibrate_grounding_on
    from trm.generation import load_model
    from trm.reading.grounded import GroundedSettings

    model_dir = tmp_path / "phase1"  # a context long enough for a passage, a question and a grounded reply
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**{**TINY_CONFIG, "n_positions": 128})).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = _sft_recipe(tmp_path, model_dir)
    squad_v2 = _squad_articles(tmp_path / "v2.json", 12)
    metrics = run_sft.main([str(recipe), "--squad_v2_file", str(squad_v2), "--max_steps", "4", "--eval_steps", "4",
                            "--save_steps", "4", "--validation_split_percentage", "25", "--max_seq_length", "128"])
    output_dir = tmp_path / "phase2"
    stored = GroundedSettings.for_model(output_dir)
    assert stored.no_answer_threshold == metrics["calibration_no_answer_threshold"]
    for name in ("prior_weight", "proximity_weight", "length_bonus"):
        assert getattr(stored, name) == metrics[f"calibration_{name}"]
    assert metrics["calibration_questions"] >= 6 and 0 <= metrics["calibration_answered_share"] <= 100
    # The stored threshold is the one that maximises F1 on those held-out questions for the saved model.
    from data.sft import SftDataArguments, prepare_sft_data
    from data.tokenizer import load_tokenizer

    args = SftDataArguments(alpaca_file=str(tmp_path / "alpaca.json"), dailydialog_file=str(tmp_path / "dialogues_train.txt"),
                            squad_v2_file=str(squad_v2), validation_split_percentage=25.0, max_seq_length=128,
                            data_cache_dir=str(tmp_path / "cache"))
    rows = [dict(row) for row in prepare_sft_data(args, load_tokenizer(model_max_length=128))[0]["calibration"]]
    model, tokenizer = load_model(output_dir)
    again = calibrate_grounding_on(model, tokenizer, rows, GroundedSettings(), "held out", min_no_answer=0.7)
    assert again["no_answer_share"] >= 70.0  # the operating point phase 2 stores
    assert again["no_answer_threshold"] == pytest.approx(stored.no_answer_threshold, abs=1e-4)
    for name in ("prior_weight", "proximity_weight", "length_bonus"):
        assert again[name] == getattr(stored, name)
    assert "grounded decoding (grounding.json)" in (output_dir / "README.md").read_text()


def test_phase1_stops_early_when_validation_loss_stops_improving(tmp_path, wiki_jsonl, tiny_config_path):
    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path, eval_on_start=False, eval_steps=5, save_steps=5,
                            learning_rate=0.0, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                            greater_is_better=False)
    run_clm.main([str(recipe), "--early_stopping_patience", "1"])
    history = json.loads((tmp_path / "phase1" / "training_log.json").read_text())
    assert max(record["step"] for record in history) == 10  # of max_steps 40: best at 5, no improvement at 10



def test_a_time_budget_ends_the_run_evaluated_saved_and_finished(tmp_path, wiki_jsonl, tiny_config_path):
    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path, eval_on_start=False)
    run_clm.main([str(recipe), "--max_train_minutes", "1e-9"])  # spent after the first step
    history = json.loads((tmp_path / "phase1" / "training_log.json").read_text())
    assert max(record["step"] for record in history) == 1  # of max_steps 40
    assert any("eval_loss" in record and record["step"] == 1 for record in history)
    assert (tmp_path / "phase1" / "checkpoint-1").is_dir() and (tmp_path / "phase1" / "model.safetensors").is_file()
    with pytest.raises(RecipeError, match="max_train_minutes must be above 0"):
        run_clm.main([str(recipe), "--max_train_minutes", "0", "--output_dir", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()  # refused before any work


def test_train_hours_plans_the_run_to_end_decayed_and_saved_within_its_budget(tmp_path, wiki_jsonl, tiny_config_path):
    import csv

    budget_hours = 3 / 3600  # three seconds: far less than the 3 epochs (576 steps, ~7 s on a quiet 2-core machine)
    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path, max_steps=-1, num_train_epochs=3, eval_on_start=False,
                            per_device_train_batch_size=1,
                            eval_steps=1000, save_steps=1000, logging_steps=1, lr_scheduler_type="warmup_stable_decay",
                            lr_scheduler_kwargs={"num_decay_steps": 0.2}, warmup_steps=0.02)
    metrics = run_clm.main([str(recipe), "--train_hours", str(budget_hours)])
    output_dir = tmp_path / "phase1"
    plan = json.loads((output_dir / "time_plan.json").read_text())
    history = json.loads((output_dir / "training_log.json").read_text())
    steps = [r for r in history if "loss" in r]
    assert steps[-1]["step"] == plan["max_steps"] and metrics["epoch"] < 3  # the budget, not the epoch cap, ended it
    rates = [r["learning_rate"] for r in steps]
    decay = math.ceil(0.2 * plan["max_steps"])  # the planned decay: the rate falls to the last step
    assert max(rates) <= 1.01e-2 and rates[-1] <= 0.5 * max(rates)  # half at most: a busy machine affords a 2-step decay
    assert rates[-decay:] == sorted(rates[-decay:], reverse=True) and rates[-1] <= 1.01 * max(rates) / decay
    # The plan fits the budget at the pace measured here; the real time follows it (loosely: a shared CI machine's pace
    # can change after the plan is fixed, at the start of the decay).
    assert plan["max_steps"] * plan["seconds_per_step"] <= 3600 * budget_hours
    assert metrics["train_runtime"] < 3 * 3600 * budget_hours + 5.0
    assert (output_dir / "model.safetensors").is_file()
    with open(output_dir / "log.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("loss")]
    assert all(row["elapsed_minutes"] for row in rows) and rows[-1]["eta_minutes"] and float(rows[-1]["eta_minutes"]) < 0.02
    with pytest.raises(RecipeError, match="train_hours must be above 0"):
        run_clm.main([str(recipe), "--train_hours", "0", "--output_dir", str(tmp_path / "other")])



def test_config_name_auto_trains_the_costliest_shape_of_the_ladder_that_fits_train_hours(tmp_path, wiki_jsonl, tiny_config_path):
    deeper = tmp_path / "tiny-4layer.json"
    deeper.write_text(json.dumps({**json.loads(tiny_config_path.read_text()), "n_layer": 4}))
    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path, max_steps=6, eval_on_start=False, eval_steps=100, save_steps=100)
    ladder = ["--config_name", "auto", "--shape_ladder", str(tiny_config_path), str(deeper)]
    with pytest.raises(RecipeError, match="config_name auto picks the shape that fills train_hours"):
        run_clm.main([str(recipe), *ladder])
    with pytest.raises(FileNotFoundError, match="missing.json not found"):  # every shape is checked before any work
        run_clm.main([str(recipe), *ladder, str(tmp_path / "missing.json"), "--train_hours", "100"])
    assert not (tmp_path / "phase1").exists()
    run_clm.main([str(recipe), *ladder, "--train_hours", "100"])  # every shape fits: the deeper one is trained
    plan = json.loads((tmp_path / "phase1" / "shape_plan.json").read_text())
    assert plan["config_name"] == str(deeper) and set(plan["seconds_per_token"]) == {str(tiny_config_path), str(deeper)}
    assert json.loads((tmp_path / "phase1" / "config.json").read_text())["n_layer"] == 4
    assert "tiny-4layer (config_name auto" in (tmp_path / "phase1" / "README.md").read_text()
    # A budget nothing fits: the cheapest shape, and the deeper one is never built to be timed.
    run_clm.main([str(recipe), *ladder, "--train_hours", "1e-9", "--output_dir", str(tmp_path / "short")])
    plan = json.loads((tmp_path / "short" / "shape_plan.json").read_text())
    assert plan["config_name"] == str(tiny_config_path) and list(plan["seconds_per_token"]) == [str(tiny_config_path)]
    assert json.loads((tmp_path / "short" / "config.json").read_text())["n_layer"] == 2


HEAP_SCRIPT = """
import sys, torch
from trm.training import keep_freed_memory_for_reuse

def mapping_of(address):
    for line in open("/proc/self/maps"):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else "anonymous", high - low
    return None, 0

applied = keep_freed_memory_for_reuse() if sys.argv[1] == "keep" else None
tensor = torch.ones(16 * 2**20)  # 64 MB, as large as a training step's gradient buffers
address = tensor.data_ptr()
name, size_in_use = mapping_of(address)
del tensor
print(applied, name, mapping_of(address)[1] == size_in_use)
"""


def test_large_freed_buffers_stay_in_the_heap_for_reuse():
    def run(mode):
        result = subprocess.run([sys.executable, "-c", HEAP_SCRIPT, mode], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent.parent)
        return result.stdout.split()

    applied, name, kept = run("keep")
    if applied != "True":
        pytest.skip("not glibc: the allocator setting does not apply")
    assert (name, kept) == ("[heap]", "True")  # served from the heap, and still there after it was freed
    _, default_name, default_kept = run("default")
    assert (default_name, default_kept) == ("anonymous", "False")  # glibc's default: its own mapping, unmapped on free


def test_sigterm_saves_and_stops_like_ctrl_c_and_a_second_signal_stops_at_once(capsys):
    import os
    import signal

    from transformers import TrainerControl

    from trm.training import GracefulInterruptCallback

    before = signal.getsignal(signal.SIGTERM)
    callback = GracefulInterruptCallback()
    callback.on_train_begin(None, None, None)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        control = TrainerControl()
        callback.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.code == 128 + signal.SIGINT
        assert "SIGINT again: stopped without saving" in capsys.readouterr().err
    finally:
        callback.on_train_end(None, None, None)
    assert signal.getsignal(signal.SIGTERM) is before


def test_bad_numbers_and_a_busy_output_dir_are_refused_before_any_work(tmp_path, wiki_jsonl, tiny_config_path):
    import fcntl

    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path)
    for flag, value, message in (("--learning_rate", "-1e-3", "learning_rate must not be negative"),
                                 ("--per_device_train_batch_size", "0", "per_device_train_batch_size must be at least 1"),
                                 ("--load_best_model_at_end", "true", "eval_strategy no leaves nothing"),
                                 ("--lr_scheduler_kwargs", '{"num_decay_steps": 0.2}', "belongs to warmup_stable_decay")):
        extra = ["--eval_strategy", "no", "--save_strategy", "no"] if flag == "--load_best_model_at_end" else []
        with pytest.raises(RecipeError, match=message):
            run_clm.main([str(recipe), f"{flag}={value}", *extra])
    assert not (tmp_path / "cache").exists()  # refused before data preparation
    output_dir = tmp_path / "phase1"
    output_dir.mkdir()
    with open(output_dir / ".lock", "w") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="another run is writing"):
            run_clm.main([str(recipe)])


def test_kill_9_mid_run_then_resume_finishes_the_run(tmp_path, wiki_jsonl, tiny_config_path):
    import os
    import signal
    import time

    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path, max_steps=60, save_steps=2, eval_steps=30,
                            eval_on_start=False, save_total_limit=2)
    root = Path(__file__).resolve().parent.parent
    log = open(tmp_path / "run.log", "w")
    run = subprocess.Popen([sys.executable, "run_clm.py", str(recipe)], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    output_dir = tmp_path / "phase1"
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None and len(list(output_dir.glob("checkpoint-*"))) < 2:
        time.sleep(0.05)
    assert run.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
    os.kill(run.pid, signal.SIGKILL)  # at whatever moment the run is in: a step, or the middle of a save
    run.wait()
    assert list(output_dir.glob("checkpoint-*")), "the run never saved a checkpoint"
    # The dead run's lock went with it; resuming picks the newest complete checkpoint and finishes.
    metrics = run_clm.main([str(recipe), "--resume"])
    state = json.loads((output_dir / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60 and metrics["epoch"] > 0
    assert (output_dir / "model.safetensors").is_file() and not list(output_dir.glob(".tmp-final-*"))


def test_the_loss_curve_is_redrawn_at_every_evaluation(tmp_path):
    from transformers import TrainerControl, TrainerState

    from trm.training import LossCurveCallback

    state = TrainerState()
    state.global_step = 20
    state.log_history = [{"step": 10, "loss": 7.0, "num_input_tokens_seen": 1000},
                         {"step": 20, "eval_loss": 6.5, "num_input_tokens_seen": 2000}]
    (tmp_path / "run").mkdir()
    LossCurveCallback(tmp_path / "run" / "loss_curve.png").on_evaluate(None, state, TrainerControl())
    first = (tmp_path / "run" / "loss_curve.png").read_bytes()
    assert first.startswith(b"\x89PNG")
    state.log_history.append({"step": 30, "eval_loss": 6.0, "num_input_tokens_seen": 3000})
    LossCurveCallback(tmp_path / "run" / "loss_curve.png").on_evaluate(None, state, TrainerControl())
    assert (tmp_path / "run" / "loss_curve.png").read_bytes() != first


def test_an_exponential_moving_average_is_evaluated_checkpointed_and_saved_as_the_model(tmp_path, wiki_jsonl, tiny_config_path):
    from safetensors.torch import load_file

    recipe = _phase1_recipe(tmp_path, wiki_jsonl, tiny_config_path, max_steps=10, eval_steps=5, save_steps=5, eval_on_start=False)
    metrics = run_clm.main([str(recipe), "--ema_decay", "0.8"])
    output_dir = tmp_path / "phase1"
    average = load_file(output_dir / "checkpoint-10" / "ema.safetensors")
    final, raw = load_file(output_dir / "model.safetensors"), load_file(output_dir / "checkpoint-10" / "model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(final[name], average[name]) and not torch.equal(final[name], raw[name])
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert type(model).__name__ == "GPT2LMHeadModel"  # the average is a plain GPT-2's weights
    assert (output_dir / "checkpoint-5" / "ema.safetensors").is_file() and metrics["eval_loss"] > 0
    with pytest.raises(RecipeError, match="ema_decay must be between 0 and 1"):
        run_clm.main([str(recipe), "--ema_decay", "1.5", "--output_dir", str(tmp_path / "other")])
