"""Training machinery shared by both phases: the Trainer subclass, callbacks, resume and the final save.

Design decisions:
- `Trainer` does the work. `TrmTrainer` changes four things: the loss is `models.gpt2.chunked_lm_loss`
  (same value and gradients as the stock loss, much less memory traffic; `loss_chunk_rows: 0` restores
  the stock loss), the MLP activation runs as one fused kernel (`models.gpt2.use_fused_gelu`), evaluation computes that loss without ever building the full logits, and each log line
  gains tokens/s and, for evaluations, perplexity.
- Several processes (torchrun) train as one: the chunked loss calls the model through its DDP wrapper, so
  gradients are synchronised, and it is scaled as the Trainer scales its own loss (`num_items_in_batch`
  counts the label tokens of every process). Data is prepared under `main_process_first`, and only the
  first process locks the output directory and writes the final model, card and logs.
- `settle_precision` applies `precision: auto|fp32|bf16` (`trm/precision.py`) before any data is prepared;
  under bf16 the loss runs inside the Trainer's autocast, because its output projection is outside the
  model's forward.
- Levers measured in the README ("The full recipe, measured") are settings, not forks: `use_muon` makes
  `create_optimizer` build `trm.optimizers.MuonWithAdamW`; `prompt_loss_weight` adds the prompt tokens to the
  training loss at that weight (evaluation stays on replies); `document_attention` collates packed blocks with
  position ids that restart at each `<|endoftext|>`, which `transformers` turns into a block-diagonal mask;
  `batch_ramp_steps` splits each early step into smaller optimizer updates inside `training_step`, so the
  Trainer's steps, epochs, schedule, checkpoints and resume stay those of the fixed batch; `decay_embeddings:
  false` takes the embeddings out of `get_decay_parameter_names`, which both optimizers read; `adamw_lr_ratio`
  gives Muon's AdamW half its own multiple of the rate.
- Callbacks, not a custom loop: early stopping (`EarlyStoppingCallback`), sample generations at each
  evaluation, a CSV copy of the logs, and Ctrl-C, which asks the Trainer to save a checkpoint and stop
  at the end of the current step (a second Ctrl-C aborts at once).
- Each step allocates and frees several 50 MB tensors (the tied embedding's gradients, the loss's logits
  buffer); glibc hands blocks that large back to the kernel on free, so every step page-faults them in
  again (~51,000 faults, ~5% of a phase-1 step, measured). `keep_freed_memory_for_reuse` tells glibc
  to keep them; elsewhere it changes nothing.
- `resume_from_checkpoint: auto` picks the newest checkpoint in `output_dir`, or starts fresh if there
  is none; the Trainer restores the model, optimizer, scheduler, RNG and data order from it. A run killed
  between its last checkpoint and its final model resumes by evaluating and saving that checkpoint.
- The final model is written as a Hub-format directory (safetensors, config, tokenizer with its chat
  template, generation config, model card, loss curve) into a temporary folder and then moved into
  `output_dir` file by file, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import GenerationConfig, Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from data.tokenizer import EOS_TOKEN_ID
from models.gpt2 import chunked_lm_loss, use_fused_gelu
from trm import rules
from trm.evaluation import copying_loss
from trm.generation import SamplingSettings
from trm.model_card import write_card
from trm.optimizers import build_muon_with_adamw
from trm.precision import PRECISIONS, PrecisionChoice, choose_precision, cpu_bf16_flags
from trm.recipe import RecipeError
from trm.time_budget import SHAPE_LADDER, SPARE_TIME_ADVICE, TimeBudgetCallback, TrainingTimePlan

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
AUTO_SHAPE = "auto"
FINAL_LOG = "training_log.json"  # written last by the final save: its presence means the model is complete


@dataclass
class ModelArguments:
    """Which model to train and how (names follow Hugging Face's example scripts)."""

    config_name: str | None = field(default="configs/gpt2-tiny-12layer.json", metadata={"help": "GPT2Config JSON (phase 1), or auto: the costliest shape of shape_ladder whose epochs fit train_hours here."})
    shape_ladder: list[str] = field(default_factory=lambda: list(SHAPE_LADDER), metadata={"help": "Phase 1, config_name auto: the shapes to choose from, cheapest first."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Model directory to start from (phase 2)."})
    base_model_id: str | None = field(default=None, metadata={"help": "Hub id of that model, if published: the card's base_model."})
    tokenizer_name: str | None = field(default="gpt2", metadata={"help": "Always the GPT-2 tokenizer."})
    loss_chunk_rows: int = field(default=256, metadata={"help": "Rows per chunk of the fused loss; 0 = stock loss."})
    precision: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 (autocast, fp32 weights); auto times both here."})
    use_muon: bool = field(default=False, metadata={"help": "torch.optim.Muon for the blocks' 2-D matrices, AdamW for the rest."})
    adamw_lr_ratio: float = field(default=1.0, metadata={"help": "With use_muon: the AdamW half's learning rate (embeddings, norms, biases) as a multiple of learning_rate, e.g. 3."})
    prompt_loss_weight: float = field(default=0.0, metadata={"help": "Phase 2: weight of the prompt tokens' loss in training (0: replies only)."})
    z_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the z-loss (log-normaliser squared) in training, e.g. 1e-4; evaluation reports plain cross-entropy."})
    ema_decay: float | None = field(default=None, metadata={"help": "Keep an exponential moving average of the weights (e.g. 0.999): evaluations and the final model use it."})
    zero_init_projections: bool = field(default=False, metadata={"help": "Phase 1: start each block's output projections (attention and MLP) at zero."})
    decay_embeddings: bool = field(default=True, metadata={"help": "Apply weight_decay to the token and position embeddings too (false: to the blocks' matrices only; decoupled decay shrinks every embedding row every step, its token seen or not)."})
    sinusoidal_positions: float = field(default=0.0, metadata={"help": "Phase 1: start the learned position embeddings at the Transformer's sinusoids of this root-mean-square size, e.g. 0.02 as GPT-2's random start (0: that random start)."})
    batch_ramp_steps: float = field(default=0.0, metadata={"help": "Phase 1: a small-batch start. Over this many steps (below 1: that share of the run) each step's sequences are split into several optimizer updates, a quarter of the step's batch each at first, growing linearly to the whole batch (0: off)."})
    document_attention: bool = field(default=False, metadata={"help": "Phase 1: attention and positions restart at each <|endoftext|> in a packed block."})
    max_train_minutes: float | None = field(default=None, metadata={"help": "Stop after this much training time: evaluate, save, finish the model (the schedule still plans the whole run; see train_hours)."})
    train_hours: float | None = field(default=None, metadata={"help": "Time budget of the whole run: its first steps measure this machine's speed, then the run (warmup-stable-decay included) is planned to end within it, never beyond the epoch cap."})
    early_stopping_patience: int = field(default=3, metadata={"help": "Evaluations without improvement before stopping."})
    sample_prompts: list[str] = field(default_factory=list, metadata={"help": "Texts continued at each evaluation."})
    sample_max_new_tokens: int = field(default=40, metadata={"help": "Length of the sample generations."})

    def __post_init__(self):
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise RecipeError(f"max_train_minutes must be above 0, got {self.max_train_minutes}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise RecipeError(f"ema_decay must be between 0 and 1, got {self.ema_decay}.")
        if self.batch_ramp_steps < 0:
            raise RecipeError(f"batch_ramp_steps must be 0 or more, got {self.batch_ramp_steps}.")
        if not self.adamw_lr_ratio > 0:
            raise RecipeError(f"adamw_lr_ratio must be above 0, got {self.adamw_lr_ratio}.")
        if self.adamw_lr_ratio != 1.0 and not self.use_muon:
            raise RecipeError(f"adamw_lr_ratio {self.adamw_lr_ratio:g} sets the AdamW half of Muon's optimizer apart and needs "
                              "use_muon true; with use_muon false pass --adamw_lr_ratio 1 as well.")
        if not self.sinusoidal_positions >= 0:
            raise RecipeError(f"sinusoidal_positions is the position table's starting size: 0 (off) or more, e.g. 0.1; "
                              f"got {self.sinusoidal_positions}.")
        if self.train_hours is not None and self.train_hours <= 0:
            raise RecipeError(f"train_hours must be above 0, got {self.train_hours}.")
        if self.config_name == AUTO_SHAPE and self.train_hours is None:
            raise RecipeError("config_name auto picks the shape that fills train_hours; set train_hours (make pretrain HOURS=6) "
                              "or name a config file.")
        if self.config_name == AUTO_SHAPE and not self.shape_ladder:
            raise RecipeError("config_name auto needs at least one shape in shape_ladder.")


class TrmTrainer(Trainer):
    """`Trainer` with the chunked loss and throughput/perplexity in the logs."""

    loss_is_scaled_for_ga = True  # the loss below is normalised by `num_items_in_batch` when given

    def __init__(self, *args, loss_chunk_rows: int = 256, use_muon: bool = False, prompt_loss_weight: float = 0.0,
                 z_loss_weight: float = 0.0, batch_ramp_steps: float = 0.0, decay_embeddings: bool = True,
                 adamw_lr_ratio: float = 1.0, **kwargs):
        if prompt_loss_weight < 0:
            raise RecipeError(f"prompt_loss_weight must be 0 or more, got {prompt_loss_weight}.")
        if prompt_loss_weight and loss_chunk_rows <= 0:
            raise RecipeError("prompt_loss_weight needs the chunked loss; set loss_chunk_rows above 0.")
        if z_loss_weight < 0 or (z_loss_weight and loss_chunk_rows <= 0):
            raise RecipeError(f"z_loss_weight must be 0 or more and needs the chunked loss (loss_chunk_rows above 0), got {z_loss_weight}.")
        super().__init__(*args, **kwargs)
        self.use_muon, self.prompt_loss_weight, self.z_loss_weight = use_muon, prompt_loss_weight, z_loss_weight
        self.decay_embeddings, self.adamw_lr_ratio = decay_embeddings, adamw_lr_ratio
        problem = batch_ramp_problem(self.args) if batch_ramp_steps else None
        if problem:
            logger.warning("batch_ramp_steps %g is off for this run: %s", batch_ramp_steps, problem)
        self.batch_ramp_steps = 0.0 if problem else batch_ramp_steps
        self._ramp_rows_pending, self._ramp_micro_batches = 0, 0  # where the current step's updates stand
        use_fused_gelu(self.accelerator.unwrap_model(self.model))
        # Both losses here shift labels by one. Trainer infers this from `config.loss_type`, which a freshly
        # built GPT2Config leaves unset; it would then count position 0 in `num_items_in_batch` and
        # under-report the loss by a factor (block - 1) / block.
        self._loss_shifts_labels = True
        self.loss_chunk_rows = loss_chunk_rows
        self._decay_share: float | None = None
        self._last_log: tuple[float, int] | None = None  # (time, tokens seen) at the previous training log
        self._clock: tuple[float, int] | None = None  # (time, step) when this process began training
        self.eval_seconds, self.evaluations = 0.0, 0  # time spent evaluating, apart from training (the time plan)

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.decay_embeddings:
            return names
        # By tensor, not name: the output projection is the token embedding under another name.
        embeddings = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
        parameters = dict(model.named_parameters(remove_duplicate=False))
        return [name for name in names if id(parameters.get(name)) not in embeddings]

    def create_optimizer(self, model=None):
        if not self.use_muon or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        self.optimizer = build_muon_with_adamw(model, self.args, self.get_decay_parameter_names(model), self.adamw_lr_ratio)
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        saved = Path(checkpoint or "") / "optimizer.pt"
        if not self.use_muon and saved.is_file():
            if set(torch.load(saved, map_location="cpu", weights_only=True)) == {"muon", "adamw"}:
                raise RecipeError(f"{checkpoint} was trained with use_muon true; resume it with --use_muon true, "
                                  "or start a fresh --output_dir.")
        return super()._load_optimizer_and_scheduler(checkpoint)

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        average = next((c for c in self.callback_handler.callbacks if isinstance(c, WeightAverage)), None)
        try:
            if average is None:
                return super().evaluate(*args, **kwargs)
            with average.swapped_in(self.accelerator.unwrap_model(self.model)):
                return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - started
            self.evaluations += 1

    def _scheduler_kwargs(self, num_training_steps: int) -> dict:
        # As `warmup_steps` does, a warmup-stable-decay `num_decay_steps` below 1 is a fraction of the run:
        # the recipe then names the decay share without knowing how many steps its data gives.
        kwargs = dict(self.args.lr_scheduler_kwargs or {})
        if self._decay_share is None and isinstance(kwargs.get("num_decay_steps"), float) and 0 < kwargs["num_decay_steps"] < 1:
            self._decay_share = kwargs["num_decay_steps"]
        if self._decay_share is not None:
            kwargs["num_decay_steps"] = math.ceil(self._decay_share * num_training_steps)
        return kwargs

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.args.lr_scheduler_kwargs = self._scheduler_kwargs(num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def replan_schedule(self, num_training_steps: int) -> None:
        """Give the learning-rate schedule a new length mid-run (the time budget): the same schedule type,
        warmup and decay share, its position kept, so warmup-stable-decay still ends decayed at the new last step."""
        from transformers import get_scheduler

        fresh = get_scheduler(self.args.lr_scheduler_type, optimizer=self.optimizer,
                              num_warmup_steps=self.args.get_warmup_steps(self.state.max_steps),
                              num_training_steps=num_training_steps,
                              scheduler_specific_kwargs=self._scheduler_kwargs(num_training_steps))
        self.lr_scheduler.lr_lambdas = fresh.lr_lambdas
        for group, base_lr, rate in zip(self.optimizer.param_groups, self.lr_scheduler.base_lrs, fresh.lr_lambdas):
            group["lr"] = base_lr * rate(self.lr_scheduler.last_epoch)  # the next step follows the new plan at once
        self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # and the logged rate says so

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_chunk_rows <= 0 or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The prepared model's forward carries the Trainer's autocast; the loss's output projection runs outside it.
        with self.accelerator.autocast():
            loss = chunked_lm_loss(
                model,
                inputs["input_ids"],
                inputs["labels"],
                attention_mask=inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"),
                num_items_in_batch=num_items_in_batch,
                chunk_rows=self.loss_chunk_rows,
                prompt_loss_weight=self.prompt_loss_weight if model.training else 0.0,  # evaluation: replies only
                z_loss_weight=self.z_loss_weight if model.training else 0.0,
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # `num_items_in_batch` counts the label tokens of every process, and gradients are averaged over
            # processes: scaled back as the Trainer's own loss is, N processes train exactly as one would.
            loss = loss * self.accelerator.num_processes
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, or during a batch ramp (`batch_ramp_steps`) several optimizer updates within it.

        A ramp update takes the next `update_rows` sequences of the step, in order, across micro-batches or
        within one, and its loss is normalised by its own share of the step's labels: packed blocks all carry
        the same number, so each update is exactly the step a run with that batch size would take. The
        Trainer's own optimizer step makes the last update; the loss returned keeps the step's usual scale."""
        step_rows = self.args.per_device_train_batch_size * self.current_gradient_accumulation_steps
        ramp = self.batch_ramp_steps  # as `warmup_steps`: below 1, a share of the (planned) run
        ramp_steps = int(ramp) if ramp >= 1 else math.ceil(ramp * self.state.max_steps)
        update_rows = ramp_update_rows(self.state.global_step, ramp_steps, step_rows)
        if update_rows >= step_rows:
            return super().training_step(model, inputs, num_items_in_batch)
        share = update_rows / step_rows
        update_items = None if num_items_in_batch is None else num_items_in_batch * share
        rows = inputs["input_ids"].shape[0]
        self._ramp_micro_batches += 1
        last_of_step = self._ramp_micro_batches == self.current_gradient_accumulation_steps
        reported, start = None, 0
        while start < rows:
            take = min(rows - start, update_rows - self._ramp_rows_pending)
            piece = {key: value[start:start + take] if torch.is_tensor(value) and value.dim() and value.shape[0] == rows else value
                     for key, value in inputs.items()}
            loss = super().training_step(model, piece, update_items) * share
            reported = loss if reported is None else reported + loss
            start, self._ramp_rows_pending = start + take, self._ramp_rows_pending + take
            if self._ramp_rows_pending == update_rows and not (last_of_step and start == rows):
                self._update_within_step(model)
        if last_of_step:
            self._ramp_rows_pending, self._ramp_micro_batches = 0, 0
        return reported

    def _update_within_step(self, model) -> None:
        """One optimizer update between the Trainer's own: clipped as the Trainer clips, at the step's learning rate.
        accelerate's optimizer wrapper steps only when the Trainer syncs gradients, so the optimizer it wraps steps."""
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        getattr(self.optimizer, "optimizer", self.optimizer).step()
        model.zero_grad()
        self._ramp_rows_pending = 0

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The stock prediction step always asks for the outputs, i.e. the full logits; evaluation needs the loss only.
        if not prediction_loss_only or self.loss_chunk_rows <= 0:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = round(math.exp(min(logs["eval_loss"], 50.0)), 3)
            copying = copying_loss(self.accelerator.unwrap_model(self.model))
            logs["eval_copy_loss"] = round(copying["copy_loss"], 4)  # falls once the model can copy from its context
        if "loss" in logs:
            logs.update(self.elapsed_and_eta())
        if "loss" in logs and self.state.num_input_tokens_seen:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
            # The first log after a (re)start has no interval to measure over.
            if self._last_log is not None and tokens > self._last_log[1]:
                logs["tokens_per_second"] = round((tokens - self._last_log[1]) / (now - self._last_log[0]), 1)
                self._set_progress_postfix(logs["tokens_per_second"])
            self._last_log = (now, tokens)
        super().log(logs, start_time)

    def elapsed_and_eta(self) -> dict:
        """Minutes since this process began training and minutes left to the planned last step, at the pace so far."""
        now = time.perf_counter()
        if self._clock is None:
            self._clock = (now, self.state.global_step)
        started, first_step = self._clock
        done = self.state.global_step - first_step
        left = max(0, self.state.max_steps - self.state.global_step)
        eta = (now - started) / done * left if done > 0 else None
        return {"elapsed_minutes": round((now - started) / 60, 2), **({"eta_minutes": round(eta / 60, 2)} if eta is not None else {})}

    def _set_progress_postfix(self, tokens_per_second: float) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.set_postfix(tok_s=f"{tokens_per_second:,.0f}", refresh=False)


def ramp_update_rows(step: int, ramp_steps: int, step_rows: int) -> int:
    """Sequences per optimizer update at `step` of a batch ramp: from a quarter of the step's `step_rows`, growing
    linearly over `ramp_steps` to all of them, rounded down to a divisor of `step_rows` (so a step's updates are
    equal) but never below the quarter."""
    if step >= ramp_steps:
        return step_rows
    sizes = [rows for rows in range(math.ceil(step_rows / 4), step_rows + 1) if step_rows % rows == 0]
    target = sizes[0] + (step_rows - sizes[0]) * step / ramp_steps
    return max(rows for rows in sizes if rows <= target)


def batch_ramp_problem(args) -> str | None:
    """Why a batch ramp cannot run as the Trainer would (updates between its own steps need one process without a
    loss scaler, and a step of 2 sequences or more), or None."""
    if args.world_size > 1:
        return "it trains in one process only (its updates inside a step would use unsynchronised gradients)."
    if args.fp16:
        return "fp16's loss scaler steps only with the Trainer; bf16 or fp32 keep the ramp."
    if args.per_device_train_batch_size * args.gradient_accumulation_steps < 2:
        return "a step of one sequence cannot be split into smaller updates."
    return None


class WeightAverage(TrainerCallback):
    """`ema_decay`: an exponential moving average of the trainable weights (fp32), updated after every optimizer step,
    saved with each checkpoint (`ema.safetensors`, so `--resume` continues it), swapped in for every evaluation, and
    written as the final model (from the best checkpoint's average with load_best_model_at_end). The model stays a
    plain GPT2LMHeadModel: only the values saved differ."""

    FILE = "ema.safetensors"

    def __init__(self, decay: float, resume: str | None):
        self.decay, self.resume, self.shadow = decay, resume, {}

    def _parameters(self, model) -> dict:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = Path(self.resume or "") / self.FILE
        if self.resume and saved.is_file():
            from safetensors.torch import load_file

            self.shadow = load_file(str(saved))
        else:
            self.shadow = {name: p.detach().float().clone() for name, p in self._parameters(model).items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, parameter in self._parameters(model).items():
            self.shadow[name].lerp_(parameter.detach().float(), 1 - self.decay)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.shadow:
            from safetensors.torch import save_file

            save_file(self.shadow, str(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}" / self.FILE))

    @contextmanager
    def swapped_in(self, model):
        """The averaged weights in `model` for the duration of the block (nothing to swap before training began)."""
        parameters = self._parameters(model)
        if not self.shadow or set(self.shadow) != set(parameters):
            yield
            return
        kept = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in parameters.items():
                    parameter.copy_(kept[name])

    @torch.no_grad()
    def install(self, model, best_checkpoint: str | None) -> None:
        """Make the average the model's weights for good: the final evaluation and save see it."""
        if best_checkpoint and (Path(best_checkpoint) / self.FILE).is_file():
            from safetensors.torch import load_file

            self.shadow = load_file(str(Path(best_checkpoint) / self.FILE))
        if not self.shadow:  # finished from a checkpoint saved without an average: nothing to install
            return
        for name, parameter in self._parameters(model).items():
            parameter.copy_(self.shadow[name])
        self.shadow = {}  # evaluations from here on use the model as it is


class LossCurveCallback(TrainerCallback):
    """Redraws `<output_dir>/loss_curve.png` at every evaluation, so a 4-8 hour run shows its curve as it goes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, self.path, f"{self.path.parent.name} (step {state.global_step})")


class CsvLogCallback(TrainerCallback):
    """Appends every log record to `<output_dir>/log.csv` (one row per record, columns grow as needed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rows = []
        if self.path.exists():
            with self.path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        rows.append({"step": state.global_step, "tokens_seen": state.num_input_tokens_seen, **logs})
        columns = list(dict.fromkeys(key for row in rows for key in row))
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


class SampleGenerationCallback(TrainerCallback):
    """Continues a few fixed prompts at each evaluation, prints them and keeps them in `samples.jsonl`."""

    def __init__(self, tokenizer, prompts: list[str], max_new_tokens: int, path: str | Path):
        self.tokenizer, self.prompts, self.max_new_tokens, self.path = tokenizer, prompts, max_new_tokens, Path(path)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.prompts or model is None or not state.is_world_process_zero:
            return
        was_training = model.training
        model.eval()
        records = []
        with torch.no_grad():
            for prompt in self.prompts:
                inputs = self.tokenizer(prompt, return_tensors="pt").to(model.device)
                output = model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=True, top_k=50, temperature=0.8,
                    pad_token_id=self.tokenizer.eos_token_id,
                )
                text = self.tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                records.append({"step": state.global_step, "prompt": prompt, "completion": text})
                logger.info("sample @ step %d: %s|%s", state.global_step, prompt, text)
        with self.path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        model.train(was_training)


class GracefulInterruptCallback(TrainerCallback):
    """First Ctrl-C or SIGTERM (kill, systemd, Docker, job schedulers): save a checkpoint and stop after the
    current step. A second signal: stop at once, with one line, without saving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"{name} again: stopped without saving; --resume continues from the last checkpoint.", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.requested = True
        logger.warning("%s: saving a checkpoint after this step (send it again to stop at once without saving).", name)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}


CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing or unreadable), or None if it can."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is not valid JSON"
    return None


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N folder the Trainer can resume from; incomplete ones (a crash mid-save) are skipped."""
    folders = [f for f in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if f.is_dir() and f.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda f: int(f.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning("resume: skipping %s (%s; a save was interrupted)", folder, problem)
    if folders:
        raise FileNotFoundError(f"{output_dir} holds no checkpoint that can be resumed from (each misses files); "
                                "delete them to start again, or choose another --output_dir.")
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`auto` -> newest complete checkpoint in `output_dir` (or None); a path must be a complete checkpoint."""
    if resume_from_checkpoint in (None, "", "false", "False"):
        return None
    if resume_from_checkpoint == "auto":
        last = newest_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        logger.info("resume: %s", f"continuing from {last}" if last else "no checkpoint yet, starting fresh")
        return last
    if not os.path.isdir(resume_from_checkpoint):
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint} is not a checkpoint directory.")
    problem = checkpoint_problem(Path(resume_from_checkpoint))
    if problem:
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint} cannot be resumed from ({problem}).")
    return resume_from_checkpoint


def refuse_foreign_output_dir(output_dir: str, resume: str | None) -> None:
    """Starting fresh into a directory that already holds checkpoints would mix two runs."""
    if resume is None and any(Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")):
        raise FileExistsError(
            f"{output_dir} already holds checkpoints; continue with --resume, or choose another --output_dir."
        )


def check_training_arguments(args) -> None:
    """Settings the Trainer would only reject late, or with a traceback, refused in one sentence before any work."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise RecipeError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.learning_rate < 0:
        raise RecipeError(f"--learning_rate must not be negative, got {args.learning_rate}.")
    if "num_decay_steps" in (args.lr_scheduler_kwargs or {}) and args.lr_scheduler_type != "warmup_stable_decay":
        raise RecipeError(f"lr_scheduler_kwargs num_decay_steps belongs to warmup_stable_decay, not {args.lr_scheduler_type.value}; "
                          "add --lr_scheduler_kwargs '{}' when choosing another schedule.")
    if args.load_best_model_at_end and args.eval_strategy == "no":
        raise RecipeError("--eval_strategy no leaves nothing for early stopping and load_best_model_at_end to use; "
                          "add --load_best_model_at_end false.")


def settle_precision(model_args: ModelArguments, training_args, model, block_size: int) -> PrecisionChoice:
    """Refuse a precision this machine cannot run fast, then choose one and set it on `training_args`."""
    setting = model_args.precision
    if setting not in PRECISIONS:
        raise RecipeError(f"precision={setting!r}: choose one of {', '.join(PRECISIONS)}.")
    if training_args.bf16 or training_args.fp16:  # TrainingArguments' own flags, as in Hugging Face's scripts
        asked = "bf16" if training_args.bf16 else "fp16"
        if setting not in ("auto", asked):
            raise RecipeError(f"--{asked} true and precision: {setting} contradict each other; keep one.")
        setting = asked
    rules.check_device(training_args.use_cpu, setting, cpu_bf16_flags())
    choice = choose_precision(setting, training_args.use_cpu, model, training_args.per_device_train_batch_size, block_size)
    logger.info("precision: %s (%s)", choice.description, choice.reason)
    if choice.dtype == "bf16":
        # `mixed_precision` is what the Trainer hands to accelerate; TrainingArguments derives it once, at creation.
        training_args.bf16, training_args.mixed_precision = True, "bf16"
    return choice


def checkpoint_ends_the_run(checkpoint: str, args) -> bool:
    """Whether `checkpoint` is at (or past) the run's last step, so resuming has nothing left to train."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    step = state.get("global_step", 0)
    if args.max_steps > 0:
        return step >= args.max_steps
    return args.num_train_epochs <= state.get("num_train_epochs", 0) and step >= state.get("max_steps", math.inf)


def refuse_resuming_a_finished_run(checkpoint: str, args) -> None:
    """A run whose final model is written is done: resuming would train one more step and log it twice. A run
    killed between its last checkpoint and its final model is not refused: `train_and_evaluate` finishes it."""
    if checkpoint_ends_the_run(checkpoint, args) and (Path(args.output_dir) / FINAL_LOG).is_file():
        raise FileExistsError(f"{checkpoint} is the end of a finished run; raise --max_steps or "
                              "--num_train_epochs (within the epoch cap) to train further, or choose another --output_dir.")


RESUME_SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "seed")
SETTINGS_FILE = "run_settings.json"
_held_locks: dict[Path, object] = {}  # output_dir -> its open lock file, held until the process ends


def _lock_output_dir(folder: Path) -> None:
    """Hold `folder/.lock` until the process ends; a second run into the same folder is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    if folder in _held_locks:
        return
    lock = open(folder / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise FileExistsError(f"another run is writing to {folder}; wait for it to finish or choose another --output_dir.") from None
    _held_locks[folder] = lock


def claim_output_dir(args) -> str | None:
    """Lock `output_dir` for this run, choose the checkpoint to resume from, and say which changed settings a
    resumed run cannot honour (the optimizer and schedule come back from the checkpoint). Returns the checkpoint."""
    check_training_arguments(args)
    folder = Path(args.output_dir).resolve()
    main_process = int(os.environ.get("RANK", "0")) == 0  # several processes share one run: the first holds the lock
    if main_process:
        _lock_output_dir(folder)
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    refuse_foreign_output_dir(args.output_dir, resume)
    if resume:
        refuse_resuming_a_finished_run(resume, args)
    if not main_process:
        return resume
    for stale in folder.glob(".tmp-final-*"):  # a final save killed midway; the lock says no other run owns it
        shutil.rmtree(stale, ignore_errors=True)
    current = {name: getattr(args, name) for name in RESUME_SETTINGS}
    stored_path = folder / SETTINGS_FILE
    if resume and stored_path.is_file():
        stored = json.loads(stored_path.read_text(encoding="utf-8"))
        changed = [f"{name} {stored[name]} -> {current[name]}" for name in RESUME_SETTINGS
                   if name in stored and stored[name] != current[name]]
        if changed:
            logger.warning("resume: the optimizer, learning-rate schedule and data order continue from %s, so these "
                           "changes are not applied: %s. Start a fresh --output_dir to use them.", resume, "; ".join(changed))
        return resume
    tmp = stored_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, stored_path)
    return resume


def default_generation_config(tokenizer, max_new_tokens: int = 128) -> GenerationConfig:
    """The chat's sampling defaults (`trm.generation.SamplingSettings`), stored so `pipeline` users get them too."""
    return GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        **SamplingSettings(max_new_tokens=max_new_tokens).sampling_kwargs(),
    )


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str) -> None:
    """Training and evaluation loss against tokens seen, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(r.get("num_input_tokens_seen", r["step"]), r[key]) for r in log_history if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    uses_tokens = any("num_input_tokens_seen" in r for r in log_history)
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        xs, ys = series(key)
        if xs:
            axis.plot(xs, ys, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    axis.set_xlabel("tokens seen" if uses_tokens else "step")
    axis.set_ylabel("cross-entropy loss (nats)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)


def save_final_model(trainer: Trainer, output_dir: str, card: ModelCard, extra_files: dict[str, str] | None = None) -> None:
    """Write the Hub-format model directory atomically (per file) into `output_dir`, from the main process only;
    `extra_files` (name -> text, e.g. grounding.json) go in with it, before the file that marks the model complete."""
    if not trainer.is_world_process_zero():
        return
    final = Path(output_dir)
    staging = final / f".tmp-final-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    trainer.save_model(str(staging))
    plot_loss_curve(trainer.state.log_history, staging / "loss_curve.png", card.data.model_name)
    write_card(card, staging / "README.md")
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text, encoding="utf-8")
    (staging / FINAL_LOG).write_text(json.dumps(trainer.state.log_history, indent=1))
    (staging / "training_args.bin").unlink(missing_ok=True)  # pickled; the recipe and log.csv say the same
    for item in sorted(staging.iterdir(), key=lambda path: path.name == FINAL_LOG):  # the completion mark moves last
        os.replace(item, final / item.name)
    staging.rmdir()


def build_callbacks(phase: str, output_dir: str, tokenizer, model_args: ModelArguments, early_stopping: bool,
                    trainer_ref: list | None = None, resume: str | None = None, spare_time_advice: str | None = None) -> list[TrainerCallback]:
    from transformers import EarlyStoppingCallback

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    callbacks: list[TrainerCallback] = [
        CsvLogCallback(Path(output_dir) / "log.csv"),
        LossCurveCallback(Path(output_dir) / "loss_curve.png"),
        SampleGenerationCallback(tokenizer, model_args.sample_prompts, model_args.sample_max_new_tokens, Path(output_dir) / "samples.jsonl"),
        GracefulInterruptCallback(),
    ]
    if model_args.max_train_minutes is not None:
        callbacks.append(TimeBudgetCallback(model_args.max_train_minutes))
    if model_args.train_hours is not None:
        advice = SPARE_TIME_ADVICE[phase] if spare_time_advice is None else spare_time_advice
        callbacks.append(TrainingTimePlan(model_args.train_hours, output_dir, trainer_ref, advice))
    if model_args.ema_decay is not None:
        callbacks.append(WeightAverage(model_args.ema_decay, resume))
    if early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=model_args.early_stopping_patience))
    return callbacks


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc keep freed memory in the heap for reuse; returns whether the setting applied."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """Packed phase-1 blocks: every token is a label (the model shifts them), no padding, no mask."""
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids}


def document_position_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Positions that restart at 0 after every `eos_token_id` (the `<|endoftext|>` closing each document)."""
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


def collate_documents(features: list[dict], eos_token_id: int = EOS_TOKEN_ID) -> dict:
    """Packed blocks where no token attends across a document boundary.

    `transformers` reads restarting position ids without an attention mask or cache as packed sequences
    and builds the block-diagonal causal mask from them, in both the chunked and the stock loss.
    """
    batch = collate_blocks(features)
    return {**batch, "position_ids": document_position_ids(batch["input_ids"], eos_token_id), "use_cache": False}


def finish_from_last_checkpoint(trainer: TrmTrainer, checkpoint: str) -> dict:
    """A run killed after its last checkpoint but before its final model: take the weights and state from that
    checkpoint (the best one, with load_best_model_at_end, as the Trainer would) and let the caller evaluate and save."""
    from transformers import TrainerState

    logger.warning("resume: %s is the run's last step and its final model was never written (interrupted); "
                   "finishing the run from it: evaluating and saving.", checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_best_model()
    trainer.state.log_history.append({"step": trainer.state.global_step, "finished_from_checkpoint": Path(checkpoint).name})
    return {"epoch": trainer.state.epoch}


def train_and_evaluate(
    phase: str, model, tokenizer, training_args, model_args: ModelArguments, train_dataset, eval_dataset,
    data_collator, resume: str | None, spare_time_advice: str | None = None,
) -> tuple[TrmTrainer, dict]:
    """The shared core of both phases: check the step budget, train (or resume), evaluate the final model.
    `spare_time_advice` replaces the phase's advice for a run that fits its `train_hours` with time to spare."""
    examples_per_step = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * max(1, training_args.world_size)
    )
    rules.check_step_budget(phase, training_args.max_steps, examples_per_step, len(train_dataset))
    keep_freed_memory_for_reuse()
    trainer_ref: list = []  # the time plan re-plans the trainer's schedule once it knows the pace
    trainer = TrmTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=build_callbacks(phase, training_args.output_dir, tokenizer, model_args, early_stopping=training_args.load_best_model_at_end,
                                  trainer_ref=trainer_ref, resume=resume, spare_time_advice=spare_time_advice),
        loss_chunk_rows=model_args.loss_chunk_rows,
        use_muon=model_args.use_muon,
        prompt_loss_weight=model_args.prompt_loss_weight,
        z_loss_weight=model_args.z_loss_weight,
        batch_ramp_steps=model_args.batch_ramp_steps,
        decay_embeddings=model_args.decay_embeddings,
        adamw_lr_ratio=model_args.adamw_lr_ratio,
    )
    trainer_ref.append(trainer)
    if resume and checkpoint_ends_the_run(resume, training_args):
        train_metrics = finish_from_last_checkpoint(trainer, resume)
    else:
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    average = next((c for c in trainer.callback_handler.callbacks if isinstance(c, WeightAverage)), None)
    if average is not None:
        best = trainer.state.best_model_checkpoint if training_args.load_best_model_at_end else None
        last = Path(training_args.output_dir) / f"{CHECKPOINT_PREFIX}{trainer.state.global_step}"
        average.install(trainer.accelerator.unwrap_model(trainer.model), best or (str(last) if not average.shadow else None))
    metrics = {**train_metrics, **trainer.evaluate()}
    metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    metrics["examples_per_step"] = examples_per_step
    trainer.log_metrics("final", metrics)
    return trainer, metrics
