#!/usr/bin/env python
"""Phase 1: pretrain a small GPT-2 from random weights on plain text (default: Simple English Wikipedia).

    python run_clm.py recipes/phase1_pretraining.yaml [--KEY VALUE ...] [--resume]

Every recipe key and every `TrainingArguments` field can be overridden on the command line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import EvalResult
from transformers import TrainingArguments

from data.pretraining import PretrainingDataArguments, describe_stats, prepare_pretraining_data
from data.tokenizer import load_tokenizer
from models.gpt2 import build_model, load_shape, parameter_counts
from trm import rules
from trm.cli import run_main
from trm.model_card import build_card
from trm.recipe import parse_recipe
from trm.time_budget import plan_phase1_shape
from trm.training import (
    AUTO_SHAPE, ModelArguments, collate_blocks, collate_documents, default_generation_config, claim_output_dir,
    save_final_model, settle_precision, train_and_evaluate,
)

logger = logging.getLogger("run_clm")
PHASE = "pretraining"
DEFAULTS = {
    "use_cpu": True, "include_num_input_tokens_seen": True, "report_to": ["tensorboard"], "prediction_loss_only": True,
}


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_recipe(
        (ModelArguments, PretrainingDataArguments, TrainingArguments), argv, defaults=DEFAULTS
    )
    rules.check_no_retrieval_settings({**vars(model_args), **vars(data_args)})
    auto_shape = model_args.config_name == AUTO_SHAPE
    shapes = model_args.shape_ladder if auto_shape else [model_args.config_name]
    for shape in shapes:
        rules.check_random_init(model_args.model_name_or_path, shape)
        context = load_shape(shape).n_positions
        if context < data_args.block_size:
            raise rules.RuleViolation(f"block_size {data_args.block_size} exceeds the model's context {context} ({shape}).")
    rules.check_tokenizer(model_args.tokenizer_name)
    rules.check_epochs(PHASE, training_args.num_train_epochs)

    def build(shape: str):
        return build_model(shape, seed=training_args.seed, zero_init_projections=model_args.zero_init_projections,
                           sinusoidal_positions=model_args.sinusoidal_positions)

    model = build(shapes[0])
    resume = claim_output_dir(training_args)
    precision = settle_precision(model_args, training_args, model, data_args.block_size)

    with training_args.main_process_first(desc="data preparation"):  # once; the other processes read its cache
        datasets_, stats = prepare_pretraining_data(data_args, seed=training_args.seed)
    logger.info("%s", describe_stats(stats))
    collator = collate_documents if model_args.document_attention else collate_blocks
    config_name = shapes[0]
    if auto_shape:
        config_name = plan_phase1_shape(shapes, len(datasets_["train"]), data_args.block_size, model_args.train_hours,
                                        training_args, precision.dtype == "bf16", resume, collator)
        if config_name != shapes[0]:
            model = build(config_name)
    tokenizer = load_tokenizer(model_max_length=data_args.block_size)
    model.generation_config = default_generation_config(tokenizer)
    counts = parameter_counts(model)
    logger.info(
        "model %s: %s parameters (%s embedding, %s non-embedding)", config_name,
        *(f"{counts[k] / 1e6:.2f}M" for k in ("total", "embedding", "non_embedding")),
    )
    trainer, metrics = train_and_evaluate(
        PHASE, model, tokenizer, training_args, model_args, datasets_["train"], datasets_["validation"], collator, resume,
        spare_time_advice="" if auto_shape else None,
    )
    local_files = [Path(name).name for name in data_args.train_file or []]
    hub_datasets = [] if local_files else [data_args.dataset_name]
    held_out = dict(task_type="text-generation", dataset_type=data_args.dataset_name if hub_datasets else "local-text",
                    dataset_name="held-out validation split of the training text", dataset_split="validation")
    card = build_card(
        title="TRM phase 1: GPT-2 pretrained from scratch",
        description=(
            "A small GPT-2 (`GPT2LMHeadModel`) trained from random weights by causal language modelling on plain "
            "text, with the unchanged GPT-2 tokenizer. Trained with TRM (`run_clm.py`)."
        ),
        facts={
            "data": ", ".join(local_files) if local_files else f"{data_args.dataset_name} ({data_args.dataset_config_name})",
            "training tokens (per epoch)": f"{stats['train']['tokens']:,}",
            "shape": Path(config_name).stem + (" (config_name auto: the costliest of shape_ladder that fit train_hours)" if auto_shape else ""),
            "parameters": f"{counts['total']:,} ({counts['non_embedding']:,} non-embedding)",
            "context length": data_args.block_size,
            "epochs": f"{metrics.get('epoch', 0):.2f}",
            "learning rate": training_args.learning_rate,
            "batch (sequences per step)": metrics["examples_per_step"],
            "precision": precision.description,
            "validation loss": f"{metrics['eval_loss']:.4f}",
            "validation perplexity": f"{metrics['eval_perplexity']:.2f}",
        },
        datasets=hub_datasets, unknown_sources=bool(local_files), from_scratch=True,
        results=[EvalResult(**held_out, metric_type="loss", metric_value=round(metrics["eval_loss"], 4)),
                 EvalResult(**held_out, metric_type="perplexity", metric_value=round(metrics["eval_perplexity"], 2))],
    )
    save_final_model(trainer, training_args.output_dir, card)
    logger.info("model saved to %s (validation perplexity %.2f)", training_args.output_dir, metrics["eval_perplexity"])
    return metrics


if __name__ == "__main__":
    run_main(main)
