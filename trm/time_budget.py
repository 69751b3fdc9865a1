"""Time budgets: a run that stops when told (`max_train_minutes`), a run planned to end within `train_hours`,
the phase-1 model shape chosen to fill that budget (`config_name: auto`), and phase-2 data sized to fill it
(`fill_train_hours`).

Design decisions:
- The pace is measured, never assumed: the same recipe runs on a 2-core server, the user's 6-core Zen 2 and a GPU.
  `TrainingTimePlan` times the run's own steps and re-plans its last step while the learning rate is stable, so a
  warmup-stable-decay schedule always ends decayed inside the budget (details on the class).
- Phase 2's data is fixed before its first step, so filling a budget needs the pace earlier: a few length-grouped
  batches of the prepared examples, forward and backward through the chunked loss on a copy of the model, on the
  run's device and precision (`seconds_per_token`). Every capped source's cap is then raised by one common factor,
  which keeps the recipe's balance (a source that runs out stays whole), to the largest whose epochs fit the
  budget less `FILL_RESERVE` for evaluations, calibration and the optimizer steps the probe leaves out. Caps are
  only raised: a budget too short for the recipe's mix shortens the run instead (`TrainingTimePlan`); the log
  gives the measured pace, the factor, the caps and the hours planned.
- Phase 1's time is spent on the model, since its data and epochs are capped: `config_name: auto` times a few
  training passes of each shape of `shape_ladder` (cheapest first) on random blocks of the run's shape, on its
  device and precision, and takes the costliest whose epochs fit the budget less the same reserve (the cheapest
  when none does; the time plan then shortens its run). Measuring stops at the first shape that does not fit.
- A plan is made once, by the main process of a fresh run, and kept in the output directory (`shape_plan.json`,
  `data_plan.json`, beside `time_plan.json`); a resumed run, and every other process of a multi-process run, reads
  it instead of measuring again, so all train the same model on the same examples (`shared_plan`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from data.files import DataError
from data.sft import training_caps, within_caps
from models.gpt2 import build_model, chunked_lm_loss, use_fused_gelu

logger = logging.getLogger(__name__)
FILL_RESERVE = 0.15  # share of a filled budget kept for evaluations, calibration and optimizer steps
DATA_PLAN = "data_plan.json"
SHAPE_PLAN = "shape_plan.json"
SHAPE_LADDER = ("configs/gpt2-tiny.json", "configs/gpt2-tiny-8layer.json", "configs/gpt2-tiny-10layer.json",
                "configs/gpt2-tiny-12layer.json", "configs/gpt2-tiny-16layer.json")  # width 256, deeper and costlier in turn: `config_name: auto` picks one
SPARE_TIME_ADVICE = {"pretraining": "--config_name auto would spend it on a larger model shape",
                     "instruction_tuning": "--fill_train_hours true would spend it on more data"}


class TimeBudgetCallback(TrainerCallback):
    """Stop after `minutes` of training in this process: evaluate, save a checkpoint, and let the run finish
    its model as at the end of a run. Equal-time comparisons and bounded GPU leases use it."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.started >= self.seconds:
            logger.warning("max_train_minutes reached at step %d: evaluating, saving and stopping.", state.global_step)
            control.should_evaluate = args.eval_strategy != "no"
            control.should_save = True
            control.should_training_stop = True


class TrainingTimePlan(TrainerCallback):
    """`train_hours`: the run measures its own pace here and plans its last step so that the whole run, its
    evaluations included, ends within the budget; never beyond the steps the epoch cap allows.

    The plan is made after the first few optimizer steps (sooner when measuring them would spend the budget) and
    revised at every step while the learning rate is still warming up or stable (the pace of a busy machine
    changes); once the planned decay has begun it is fixed, so warmup-stable-decay always ends decayed at the
    planned step. Time spent evaluating is measured apart from training time. The plan is kept in
    `<output_dir>/time_plan.json`; a resumed run keeps it. When the whole run fits with more than a fifth of the
    budget to spare, the log says so."""

    def __init__(self, hours: float, output_dir: str, trainer_ref: list, spare_advice: str):
        self.budget_s, self.path, self.trainer_ref = 3600.0 * hours, Path(output_dir) / "time_plan.json", trainer_ref
        self.spare_advice = spare_advice
        self.started, self.cap, self.fixed, self.reported = time.perf_counter(), 0, False, False
        self.clock: tuple[float, int, float] | None = None  # (time, step, evaluation seconds) after the first step

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.cap = time.perf_counter(), state.max_steps
        if self.path.is_file():  # a resumed run goes on with the plan it was given
            self._apply(state, min(self.cap, json.loads(self.path.read_text(encoding="utf-8"))["max_steps"]))
            self.fixed = True

    def _apply(self, state, max_steps: int) -> None:
        if max_steps != state.max_steps:
            state.max_steps = max_steps
            self.trainer_ref[0].replan_schedule(max_steps)

    def _decay_started(self, state) -> bool:
        share = self.trainer_ref[0]._decay_share
        decay_steps = math.ceil(share * state.max_steps) if share else 0
        return state.global_step >= state.max_steps - decay_steps

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer_ref[0]
        if self.clock is None:  # the pace is measured from the end of the first step, which carries one-time costs
            self.clock = (time.perf_counter(), state.global_step, trainer.eval_seconds)
            return
        clock_time, clock_step, clock_eval = self.clock
        done = state.global_step - clock_step
        if self.fixed or done < 1:
            return
        if self._decay_started(state):
            self.fixed = True
            return
        now = time.perf_counter()
        elapsed = now - self.started
        pace = (now - clock_time - (trainer.eval_seconds - clock_eval)) / done
        measuring = max(3, min(20, self.cap // 100))  # steps that make the first plan's pace; fewer if the budget ends first
        if done < measuring and elapsed + (measuring - done) * pace < self.budget_s:
            return
        if trainer.evaluations:
            eval_each = trainer.eval_seconds / trainer.evaluations
        else:  # not measured yet: a forward pass over the validation split, about a third of a training step per example
            examples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
            eval_each = pace * len(trainer.eval_dataset or []) / examples_per_step / 3
        every = state.eval_steps if args.eval_strategy == "steps" and state.eval_steps else math.inf
        per_step = pace + eval_each / every  # a step, and its share of the evaluations along the way
        affordable = state.global_step + int(max(0.0, self.budget_s - elapsed - eval_each) / per_step)
        planned = max(state.global_step + 1, min(self.cap, affordable))
        if not self.reported:
            self.reported = True
            whole_h = (self.cap * per_step + eval_each) / 3600
            spare = self.budget_s / 3600 - whole_h
            if planned < self.cap:
                logger.warning("train_hours %g: at %.3f s per step here, the run is planned to end at step %d of the %d the "
                               "epoch cap allows, decayed and saved within the budget (revised while the rate is stable).",
                               self.budget_s / 3600, pace, planned, self.cap)
            else:
                logger.warning("train_hours %g: the whole run (%d steps, all that max_steps and the epoch cap allow) takes about %.2f h here%s.",
                               self.budget_s / 3600, self.cap, whole_h,
                               f", leaving {spare:.2f} h of the budget unused" + (f": {self.spare_advice}" if self.spare_advice else "")
                               if spare > self.budget_s / 3600 / 5 else "")
        if planned != state.max_steps:
            self._apply(state, planned)
            if state.is_world_process_zero:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"max_steps": planned, "seconds_per_step": pace, "seconds_per_evaluation": eval_each,
                                           "train_hours": self.budget_s / 3600, "epoch_cap_steps": self.cap}, indent=2), encoding="utf-8")
                os.replace(tmp, self.path)


def seconds_per_token(model, rows: list[dict], collator, batch_size: int, device: torch.device, bf16: bool,
                      batches: int = 3, seed: int = 0) -> float:
    """Seconds per (non-padding) token of training steps on `rows`, grouped by length as training batches them:
    the mean over `batches` forward+backward passes after one warm-up, on a copy of `model`."""
    sample = random.Random(seed).sample(rows, min(len(rows), batch_size * (batches + 1)))
    sample.sort(key=lambda row: len(row["input_ids"]))
    model = use_fused_gelu(copy.deepcopy(model)).to(device).train()
    seconds, tokens = 0.0, 0
    for index in range(0, len(sample), batch_size):
        batch = {k: v.to(device) for k, v in collator(sample[index:index + batch_size]).items()}
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = chunked_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:  # the first batch is the warm-up
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if not tokens:
        raise DataError("fill_train_hours needs at least two batches of training examples to measure the pace; give more data.")
    return seconds / tokens


def fill_target_seconds(hours: float) -> float:
    """The training seconds a filled budget of `hours` may plan: the rest is kept for what probes leave out."""
    return 3600.0 * hours * (1 - FILL_RESERVE)


def caps_filling_budget(caps: dict[str, int | None], available: dict[str, int], tokens_per_question: dict[str, float],
                        epochs: float, pace: float, budget_s: float) -> tuple[dict[str, int | None], float]:
    """Each capped source's cap times the largest common factor (at least 1) whose `epochs` over the kept questions
    take at most the budget less the reserve at `pace` seconds per token; a cap never exceeds what its source has.
    Returns (caps, factor)."""
    target = fill_target_seconds(budget_s / 3600.0)

    def kept(factor: float) -> dict[str, int]:
        return {s: available[s] if caps[s] is None else min(available[s], math.floor(caps[s] * factor)) for s in caps}

    def cost(factor: float) -> float:
        return epochs * pace * sum(n * tokens_per_question[s] for s, n in kept(factor).items())

    top = max([available[s] / caps[s] for s in caps if caps[s]], default=1.0)  # where every source is whole
    if top <= 1.0 or cost(1.0) >= target:
        return dict(caps), 1.0
    low, high = (top, top) if cost(top) <= target else (1.0, top)
    for _ in range(60 if low < high else 0):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(middle) <= target else (low, middle)
    chosen = kept(low)
    return {s: None if caps[s] is None else chosen[s] for s in caps}, low


def shared_plan(path: Path, make, resume: str | None, training_args, what: str) -> dict:
    """The JSON plan in `path`: made by `make()` in the main process of a fresh run (or where none was kept), read
    by a resumed run and by every other process."""
    if training_args.process_index == 0 and not (resume and path.is_file()):
        plan = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    with training_args.main_process_first(desc=what):
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DataError(f"{path} holds no {what} ({error}); delete it, or start a fresh --output_dir.") from None
    if not isinstance(plan, dict):
        raise DataError(f"{path} holds no {what}; delete it, or start a fresh --output_dir.")
    return plan


def fill_phase2_budget(model, datasets_, report: dict, data_args, hours: float, training_args, bf16: bool,
                       resume: str | None, collator) -> tuple[object, dict]:
    """`fill_train_hours`: the training rows of an uncapped preparation that fill `hours` at this machine's pace,
    and their report, as planned in `<output_dir>/data_plan.json`."""
    def make() -> dict:
        caps, account = _plan_caps(model, datasets_["train"], report, data_args, hours, training_args, bf16, collator)
        logger.warning("%s", account)
        return {"caps": caps, "account": account}

    plan = shared_plan(Path(training_args.output_dir) / DATA_PLAN, make, resume, training_args, "phase-2 data plan")
    if not isinstance(plan.get("caps"), dict):
        raise DataError(f"{Path(training_args.output_dir) / DATA_PLAN} holds no phase-2 caps; delete it, or start a fresh --output_dir.")
    return within_caps(datasets_, report, plan["caps"])


def costliest_fitting_shape(ladder: list[str], tokens: int, hours: float, pace_of) -> tuple[str, dict[str, float]]:
    """The last shape of `ladder` (cheapest first) whose `tokens` of training at `pace_of(shape)` seconds per token
    fit `hours` less `FILL_RESERVE`, or the first when none fits; and the paces measured, which stop at the first
    shape that does not fit."""
    target = fill_target_seconds(hours)
    chosen, paces = ladder[0], {}
    for shape in ladder:
        paces[shape] = pace_of(shape)
        if tokens * paces[shape] > target:
            break
        chosen = shape
    return chosen, paces


def plan_phase1_shape(ladder: list[str], train_blocks: int, block_size: int, hours: float, training_args, bf16: bool,
                      resume: str | None, collator) -> str:
    """`config_name: auto`: the shape of `ladder` whose whole run (the epochs of `train_blocks`, or `max_steps`)
    fills `hours` at this machine's pace, as planned in `<output_dir>/shape_plan.json`."""
    batch_size = training_args.per_device_train_batch_size
    if training_args.max_steps > 0:
        tokens = training_args.max_steps * batch_size * training_args.gradient_accumulation_steps * max(1, training_args.world_size) * block_size
    else:
        tokens = math.ceil(training_args.num_train_epochs * train_blocks * block_size)

    def pace_of(shape: str) -> float:
        model = build_model(shape, seed=training_args.seed)
        generator = torch.Generator().manual_seed(training_args.seed)
        blocks = torch.randint(0, model.config.vocab_size, (4 * batch_size, block_size), generator=generator)
        return seconds_per_token(model, [{"input_ids": row} for row in blocks.tolist()], collator, batch_size,
                                 training_args.device, bf16)

    def make() -> dict:
        chosen, paces = costliest_fitting_shape(ladder, tokens, hours, pace_of)
        measured = "; ".join(f"{Path(shape).stem} {1 / pace:,.0f} tokens/s ({tokens * pace / 3600:.2f} h)"
                             for shape, pace in paces.items())
        fits = tokens * paces[chosen] <= fill_target_seconds(hours)
        account = (f"config_name auto: the run trains {tokens:,} tokens; measured here per shape: {measured}; "
                   + (f"training {chosen}, the costliest that fits the {hours:g} h budget less {FILL_RESERVE:.0%} for evaluations."
                      if fits else f"none fits the {hours:g} h budget: training {chosen}, the cheapest, for as long as the budget allows."))
        logger.warning("%s", account)
        return {"config_name": chosen, "seconds_per_token": paces, "account": account}

    plan = shared_plan(Path(training_args.output_dir) / SHAPE_PLAN, make, resume, training_args, "phase-1 shape plan")
    if plan.get("config_name") not in ladder:
        raise DataError(f"{Path(training_args.output_dir) / SHAPE_PLAN} names no shape of shape_ladder; delete it, or start a fresh --output_dir.")
    return plan["config_name"]


def _plan_caps(model, train, report: dict, data_args, hours: float, training_args, bf16: bool, collator) -> tuple[dict, str]:
    sample = train.select(range(min(len(train), 2000))).select_columns(["input_ids", "labels"])  # the rows are shuffled
    pace = seconds_per_token(model, [dict(row) for row in sample], collator, training_args.per_device_train_batch_size,
                             training_args.device, bf16)
    available = {s: report[s]["train"]["questions"] for s in report}
    per_question = {s: report[s]["train"]["tokens"] / max(1, available[s]) for s in report}
    epochs = training_args.num_train_epochs
    caps, factor = caps_filling_budget(training_caps(data_args), available, per_question, epochs, pace, 3600.0 * hours)
    kept = {s: available[s] if caps[s] is None else min(caps[s], available[s]) for s in caps}
    planned_h = epochs * pace * sum(kept[s] * per_question[s] for s in kept) / 3600
    mix = ", ".join(f"{s} {kept[s]:,}" + (" (all)" if kept[s] == available[s] else "") for s in kept)
    account = (f"fill_train_hours: {1 / pace:,.0f} training tokens/s measured here; caps x{factor:.2f} of the recipe's: {mix}; "
               f"{epochs:g} epochs take about {planned_h:.2f} h of the {hours:g} h budget (the rest is kept for evaluations).")
    return caps, account
