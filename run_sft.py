#!/usr/bin/env python
"""Phase 2: instruction-tune the phase-1 model on Alpaca, SQuAD v1.1/v2.0 and DailyDialog, replies only.

    python run_sft.py recipes/phase2_instruction_tuning.yaml [--model_name_or_path DIR] [--KEY VALUE ...] [--resume]
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import EvalResult
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, EarlyStoppingCallback, TrainingArguments

from data.hub import HUB_SOURCES
from data.sft import SftDataArguments, describe_mix, prepare_sft_data
from data.tokenizer import load_tokenizer
from models.gpt2 import parameter_counts
from trm import rules
from trm.cli import run_main
from trm.model_card import base_model_datasets, build_card
from data.files import DataError
from trm.evaluation import WEIGHT_CHOICES, calibrate_grounding_on, weights_name
from trm.generation import from_pretrained
from trm.reading.grounded import GROUNDING_FILE, GroundedSettings
from trm.recipe import RecipeError, parse_recipe
from trm.time_budget import fill_phase2_budget
from trm.training import (
    ModelArguments, default_generation_config, claim_output_dir, save_final_model, settle_precision,
    train_and_evaluate,
)

logger = logging.getLogger("run_sft")
PHASE = "instruction_tuning"
DEFAULTS = {
    "use_cpu": True, "include_num_input_tokens_seen": True, "report_to": ["tensorboard"], "prediction_loss_only": True,
    "train_sampling_strategy": "group_by_length", "remove_unused_columns": False, "num_train_epochs": 2,
}


def load_phase1_model(path: str | None):
    """The phase-1 model directory, loaded with `from_pretrained`; anything else is refused."""
    if not path:
        raise rules.RuleViolation("phase 2 starts from the phase-1 model: set model_name_or_path to its directory.")
    folder = Path(path)
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in rules.WEIGHT_FILES):
        raise FileNotFoundError(
            f"model_name_or_path={path} is not a trained model directory (config.json and model.safetensors); run `make pretrain` first."
        )
    return from_pretrained(AutoModelForCausalLM, folder)


def calibrated_grounding(trainer, tokenizer, datasets_, data_args: SftDataArguments, metrics: dict) -> dict[str, str]:
    """Grounded decoding's weights (prior, proximity, length bonus) and no-answer threshold, calibrated on held-out SQuAD v2.0
    questions (articles never trained on), as the model's `grounding.json`: `make ask`, chat and `make serve` answer
    at that operating point out of the box."""
    if "calibration" not in datasets_ or not trainer.is_world_process_zero():
        return {}
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    rows = [dict(row) for row in datasets_["calibration"]]
    try:
        calibration = calibrate_grounding_on(model, tokenizer, rows, GroundedSettings(), "the held-out SQuAD v2.0 questions",
                                             data_args.calibration_min_no_answer)
    except DataError as error:
        logger.warning("no-answer threshold not calibrated: %s", error)
        return {}
    by_weights = calibration.pop("has_answer_span_f1_by_weights")
    metrics.update({f"calibration_{key}": value for key, value in calibration.items()})
    weights = {name: calibration[name] for name in WEIGHT_CHOICES}
    logger.info("%s (answerable questions' span F1 by weights: %s) and no-answer threshold %.3f, calibrated on %d held-out "
                "SQuAD v2.0 questions: grounded F1 %.1f there, %.0f%% of the unanswerable ones abstained on, %.0f%% of all "
                "answered", weights_name(weights), by_weights, calibration["no_answer_threshold"], calibration["questions"],
                calibration["f1_at_threshold"], calibration["no_answer_share"], calibration["answered_share"])
    settings = GroundedSettings(no_answer_threshold=calibration["no_answer_threshold"], **weights)
    return {GROUNDING_FILE: settings.to_json()}


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_recipe(
        (ModelArguments, SftDataArguments, TrainingArguments), argv, defaults=DEFAULTS
    )
    rules.check_no_retrieval_settings({**vars(model_args), **vars(data_args)})
    rules.check_tokenizer(model_args.tokenizer_name)
    rules.check_epochs(PHASE, training_args.num_train_epochs)
    if data_args.calibration_min_no_answer is not None and not 0 <= data_args.calibration_min_no_answer <= 1:
        raise RecipeError(f"calibration_min_no_answer must be between 0 and 1, got {data_args.calibration_min_no_answer}.")
    if model_args.document_attention:
        raise RecipeError("document_attention is for phase 1's packed blocks; phase-2 examples never share a row.")
    if model_args.zero_init_projections or model_args.sinusoidal_positions:
        raise RecipeError("zero_init_projections and sinusoidal_positions choose phase 1's starting weights; phase 2 "
                          "starts from the phase-1 model: set them in phase 1.")
    if model_args.batch_ramp_steps:
        raise RecipeError("batch_ramp_steps is for phase 1's packed blocks, whose sequences all carry the same number of "
                          "labels; set it to 0 for phase 2.")
    if data_args.fill_train_hours and (model_args.train_hours is None or training_args.max_steps > 0):
        raise RecipeError("fill_train_hours sizes phase 2's data to its time budget over num_train_epochs: set train_hours "
                          "(make sft HOURS=H) and leave max_steps unset.")
    if training_args.torch_compile:
        logger.warning("torch_compile: phase-2 batches are padded to their own lengths, so the model is compiled again for "
                       "many shapes (on a 2-core CPU it trained at 0.15x the uncompiled speed, docs/measurements.md).")
    model = load_phase1_model(model_args.model_name_or_path)
    resume = claim_output_dir(training_args)
    precision = settle_precision(model_args, training_args, model, data_args.max_seq_length)

    tokenizer = load_tokenizer(model_max_length=data_args.max_seq_length)
    if model.config.n_positions < data_args.max_seq_length:
        raise rules.RuleViolation(f"max_seq_length {data_args.max_seq_length} exceeds the model's context {model.config.n_positions}.")
    with training_args.main_process_first(desc="data preparation"):  # once; the other processes read its cache
        datasets_, report = prepare_sft_data(data_args, tokenizer, seed=training_args.seed)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    if data_args.fill_train_hours:
        datasets_, report = fill_phase2_budget(model, datasets_, report, data_args, model_args.train_hours, training_args,
                                               precision.dtype == "bf16", resume, collator)
    logger.info("%s", describe_mix(report))
    model.generation_config = default_generation_config(tokenizer)
    model.config.squad_layout = data_args.squad_layout  # evaluation and chat lay passages out as the model learned
    model.config.squad_abstain_instruction = data_args.squad_abstain_instruction  # and use the instruction it learned
    counts = parameter_counts(model)
    validation = datasets_["validation"].remove_columns(["length"])
    trainer, metrics = train_and_evaluate(
        PHASE, model, tokenizer, training_args, model_args, datasets_["train"].select_columns(["input_ids", "labels", "length"]),
        validation.remove_columns(["source"]), collator, resume,
        spare_time_advice="" if data_args.fill_train_hours else None,  # its data plan already says what the budget holds
    )
    trainer.remove_callback(EarlyStoppingCallback)  # training is over: evaluations per source report, nothing stops
    for source in report:  # which sources the model learned, not only the mix's average
        held_out = validation.filter(lambda row: row["source"] == source).remove_columns(["source"])
        if len(held_out):
            metrics.update(trainer.evaluate(eval_dataset=held_out, metric_key_prefix=f"eval_{source}"))
    grounding = calibrated_grounding(trainer, tokenizer, datasets_, data_args, metrics)
    mix = ", ".join(f"{s} {r['train']['examples']:,}" for s, r in report.items())
    phase1_datasets, phase1_unknown = base_model_datasets(model_args.model_name_or_path)
    tuned_on = [HUB_SOURCES[source].name for source in report if source in HUB_SOURCES]
    card = build_card(
        title="TRM phase 2: instruction-tuned GPT-2",
        description=(
            "The phase-1 TRM model tuned on instructions, reading comprehension and dialogue, with the loss on "
            "reply tokens only. Prompt format (also the tokenizer's chat template): `User: ...\\nAssistant: ...<|endoftext|>`."
        ),
        facts={
            "started from": model_args.base_model_id or "a TRM phase-1 model",
            "training examples": mix,
            "parameters": f"{counts['total']:,}",
            "epochs": f"{metrics.get('epoch', 0):.2f}",
            "learning rate": training_args.learning_rate,
            "precision": precision.description,
            "validation loss (reply tokens)": f"{metrics['eval_loss']:.4f}",
            "per source": ", ".join(f"{s} {metrics[f'eval_{s}_loss']:.3f}" for s in report if f"eval_{s}_loss" in metrics),
            "reading-comprehension layout": data_args.squad_layout,
            "abstention-aware SQuAD v2.0 instruction": data_args.squad_abstain_instruction,
            **({"grounded decoding (grounding.json)": (
                f"{weights_name({name: metrics[f'calibration_{name}'] for name in WEIGHT_CHOICES})}, no-answer threshold "
                f"{metrics['calibration_no_answer_threshold']:.3f}, calibrated on {metrics['calibration_questions']} held-out "
                f"SQuAD v2.0 questions (F1 {metrics['calibration_f1_at_threshold']:.1f}, "
                f"{metrics['calibration_no_answer_share']:.0f}% of the unanswerable abstained on, "
                f"{metrics['calibration_answered_share']:.0f}% of all answered)")} if grounding else {}),
        },
        datasets=list(dict.fromkeys(phase1_datasets + tuned_on)), unknown_sources=phase1_unknown or "chat" in report,
        results=[EvalResult(task_type="text-generation", dataset_type="trm-phase2-mix", dataset_name=f"held-out examples ({mix})",
                            dataset_split="validation", metric_type="loss", metric_value=round(metrics["eval_loss"], 4))],
        from_scratch=False, base_model=model_args.base_model_id,
    )
    save_final_model(trainer, training_args.output_dir, card, extra_files=grounding)
    logger.info("model saved to %s", training_args.output_dir)
    return metrics


if __name__ == "__main__":
    run_main(main)
