"""Time budgets filled: phase 2's caps grown by one common factor, phase 1's shape chosen from a ladder, and runs that
keep the plan they were given."""

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

from data.files import DataError
from trm.time_budget import FILL_RESERVE, SHAPE_PLAN, caps_filling_budget, costliest_fitting_shape, plan_phase1_shape


def _budget_for(seconds: float) -> float:
    return seconds / (1 - FILL_RESERVE)


def test_every_cap_grows_by_one_factor_until_the_epochs_fill_the_budget():
    caps = {"alpaca": 10, "squad": 20, "chat": None}
    available = {"alpaca": 100, "squad": 30, "chat": 5}
    per_question = {"alpaca": 1.0, "squad": 1.0, "chat": 1.0}
    # 2 epochs at 1 s per token: 151 s afford 75 whole questions: chat's 5, squad's 30 (all of it), alpaca 40 (x4.0 to x4.1).
    grown, factor = caps_filling_budget(caps, available, per_question, 2, 1.0, _budget_for(151))
    assert grown == {"alpaca": 40, "squad": 30, "chat": None} and 4.0 <= factor < 4.1
    # Twice as long per alpaca question: the same seconds afford half as many of them beyond the others.
    grown, _ = caps_filling_budget(caps, available, {**per_question, "alpaca": 2.0}, 2, 1.0, _budget_for(2 * (2 * 20 + 35)))
    assert grown["alpaca"] == 20 and grown["squad"] == 30


def test_a_budget_is_never_a_reason_to_cut_below_the_recipes_caps_nor_beyond_what_a_source_has():
    caps, available, per_question = {"alpaca": 10, "squad": 20}, {"alpaca": 100, "squad": 30}, {"alpaca": 1.0, "squad": 1.0}
    assert caps_filling_budget(caps, available, per_question, 2, 1.0, _budget_for(10)) == (caps, 1.0)
    everything, factor = caps_filling_budget(caps, available, per_question, 2, 1.0, _budget_for(10_000))
    assert everything == {"alpaca": 100, "squad": 30} and factor == 10.0


def test_a_resumed_run_trains_on_the_caps_its_plan_holds_without_measuring_again(tmp_path, tokenizer):
    from data.sft import SftDataArguments, prepare_sft_data
    from trm.time_budget import DATA_PLAN, fill_phase2_budget

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Task {i}.", "input": "", "output": f"Done {i}."} for i in range(40)]))
    args = SftDataArguments(alpaca_file=str(alpaca), data_cache_dir=str(tmp_path / "cache"), fill_train_hours=True)
    pool, report = prepare_sft_data(args, tokenizer)
    output_dir = tmp_path / "phase2"
    output_dir.mkdir()
    (output_dir / DATA_PLAN).write_text(json.dumps({"caps": {"alpaca": 9}, "account": "planned before the kill"}))
    training_args = SimpleNamespace(output_dir=str(output_dir), process_index=0, main_process_first=lambda desc: nullcontext())
    kept, kept_report = fill_phase2_budget(None, pool, report, args, 1.0, training_args, False, "checkpoint-4", None)
    assert len(kept["train"]) == kept_report["alpaca"]["train"]["examples"] == 9


def test_the_shape_is_the_costliest_whose_run_fits_and_shapes_beyond_it_are_not_measured():
    paces = {"s6": 1.0, "s8": 2.0, "s12": 3.0, "s24": 6.0}
    measured = []

    def pace_of(shape):
        measured.append(shape)
        return paces[shape]

    ladder = list(paces)
    # 100 tokens: s8 needs 200 s, s12 300 s; a budget of 250 s for training affords s8 only.
    assert costliest_fitting_shape(ladder, 100, _budget_for(250) / 3600, pace_of)[0] == "s8"
    assert measured == ["s6", "s8", "s12"]  # s24 was never timed
    assert costliest_fitting_shape(ladder, 100, _budget_for(600) / 3600, pace_of)[0] == "s24"
    chosen, timed = costliest_fitting_shape(ladder, 100, _budget_for(50) / 3600, pace_of)
    assert chosen == "s6" and list(timed) == ["s6"]  # none fits: the cheapest, which the time plan then shortens


def test_a_resumed_run_keeps_the_shape_its_plan_holds_and_a_foreign_plan_is_refused(tmp_path):
    ladder = ["configs/gpt2-tiny.json", "configs/gpt2-tiny-12layer.json"]
    args = SimpleNamespace(output_dir=str(tmp_path), process_index=0, main_process_first=lambda desc: nullcontext(),
                           max_steps=-1, num_train_epochs=3, per_device_train_batch_size=8, seed=42)
    (tmp_path / SHAPE_PLAN).write_text(json.dumps({"config_name": ladder[1]}))
    # collator None: measuring would fail, so the shape can only come from the plan
    assert plan_phase1_shape(ladder, 100, 256, 6.0, args, False, "checkpoint-250", None) == ladder[1]
    (tmp_path / SHAPE_PLAN).write_text(json.dumps({"config_name": "configs/gpt2-wide-384.json"}))
    with pytest.raises(DataError, match="names no shape of shape_ladder"):
        plan_phase1_shape(ladder, 100, 256, 6.0, args, False, "checkpoint-250", None)


def _drive_time_plan(tmp_path, monkeypatch, seconds_per_step: float, budget_s: float, cap: int) -> SimpleNamespace:
    """TrainingTimePlan over a run whose steps take `seconds_per_step` on a fake clock, as the Trainer calls it;
    returns the state at the end, with the steps at which the plan changed."""
    import trm.time_budget as time_budget

    clock = [0.0]
    monkeypatch.setattr(time_budget.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(_decay_share=0.2, eval_seconds=0.0, evaluations=0, eval_dataset=[], replans=[])
    trainer.replan_schedule = lambda steps: trainer.replans.append((state.global_step, steps))
    state = SimpleNamespace(max_steps=cap, global_step=0, eval_steps=1000, is_world_process_zero=True)
    args = SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1, world_size=1, eval_strategy="steps")
    plan = time_budget.TrainingTimePlan(budget_s / 3600, str(tmp_path), [trainer], "")
    plan.on_train_begin(args, state, None)
    while state.global_step < state.max_steps:
        clock[0] += seconds_per_step
        state.global_step += 1
        plan.on_step_end(args, state, None)
    state.replans, state.seconds = trainer.replans, clock[0]
    return state


def test_a_budget_shorter_than_measuring_the_pace_is_planned_at_once_and_kept(tmp_path, monkeypatch):
    # 0.9 s per step (a saturated machine) and 3 s: waiting for the usual 5 measured steps would spend the budget.
    state = _drive_time_plan(tmp_path, monkeypatch, seconds_per_step=0.9, budget_s=3.0, cap=576)
    assert state.replans[0] == (2, 3)  # planned after the first measured step: 3 steps of 0.9 s fit 3 s
    assert state.max_steps == 3 and state.seconds <= 3.0
    assert json.loads((tmp_path / "time_plan.json").read_text())["max_steps"] == 3
    # A budget with room for the measurement still waits for it, then plans all it affords.
    (tmp_path / "roomy").mkdir()
    state = _drive_time_plan(tmp_path / "roomy", monkeypatch, seconds_per_step=0.1, budget_s=30.0, cap=576)
    assert state.replans[0][0] == 6 and 295 <= state.max_steps <= 300 and state.seconds <= 30.0
