"""Issue-9 levers: document-boundary attention in packed blocks, and Muon with AdamW as one optimizer."""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from models.gpt2 import chunked_lm_loss
from trm.optimizers import MuonWithAdamW, hidden_matrix_names
from trm.recipe import RecipeError
from trm.training import ModelArguments, TrmTrainer, collate_blocks, collate_documents, document_position_ids

from conftest import TINY_CONFIG

EOS = 50256


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY_CONFIG))


def test_positions_restart_after_every_end_of_text():
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, EOS, 4]])
    assert document_position_ids(ids, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]


@pytest.mark.parametrize("chunk_rows", [0, 64])
def test_a_packed_block_with_document_attention_scores_each_document_as_if_alone(chunk_rows):
    """The loss on document B's tokens equals B's loss on its own: nothing of document A is attended to."""
    model = _model().eval()
    torch.manual_seed(3)
    first, second = torch.randint(0, 50000, (9,)).tolist() + [EOS], torch.randint(0, 50000, (14,)).tolist()
    batch = collate_documents([{"input_ids": first + second}])
    labels = batch["labels"].clone()
    labels[:, :len(first) + 1] = -100  # score only B's predictions from its second token on
    with torch.no_grad():
        if chunk_rows:
            packed = chunked_lm_loss(model, batch["input_ids"], labels, position_ids=batch["position_ids"], chunk_rows=chunk_rows)
        else:
            packed = model(input_ids=batch["input_ids"], labels=labels, position_ids=batch["position_ids"], use_cache=False).loss
        alone = model(input_ids=torch.tensor([second]), labels=torch.tensor([second])).loss
        crossing = model(input_ids=batch["input_ids"], labels=labels).loss  # the recipe's default: attends across
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(crossing.item() - alone.item()) > 1e-3


def _trainer(tmp_path, model, max_steps, adamw_lr_ratio=1.0, **kwargs):
    dataset = Dataset.from_dict({"input_ids": torch.randint(0, 50000, (16, 32), generator=torch.Generator().manual_seed(4)).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             max_steps=max_steps, learning_rate=1e-2, lr_scheduler_type="cosine", save_steps=2,
                             disable_tqdm=True, seed=0, **kwargs)
    return TrmTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_blocks, use_muon=True,
                      adamw_lr_ratio=adamw_lr_ratio)


def test_muon_trains_the_hidden_matrices_and_adamw_the_rest_under_the_trainers_schedule(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path / "run", model, max_steps=3)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, MuonWithAdamW)
    muon_params = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    hidden = hidden_matrix_names(model)
    for name, parameter in model.named_parameters():
        assert (id(parameter) in muon_params) == (name in hidden), name
    assert "transformer.wte.weight" not in hidden and all(".h." in name for name in hidden)
    assert all(optimizer.muon.state[p] for p in optimizer.muon.param_groups[0]["params"])
    # The scheduler's cosine decay reached both inner optimizers.
    assert optimizer.muon.param_groups[0]["lr"] == optimizer.adamw.param_groups[0]["lr"] < 1e-2


def test_adamw_lr_ratio_sets_the_embeddings_rate_apart_and_the_schedule_scales_both(tmp_path):
    trainer = _trainer(tmp_path / "run", _model(), max_steps=10, adamw_lr_ratio=3.0)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for _ in range(4):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    muon_rate = trainer.optimizer.muon.param_groups[0]["lr"]
    assert 0 < muon_rate < 1e-2
    assert [group["lr"] for group in trainer.optimizer.adamw.param_groups] == pytest.approx([3 * muon_rate] * 2)
    assert trainer.lr_scheduler.base_lrs == pytest.approx([1e-2, 3e-2, 3e-2])


def test_adamw_lr_ratio_without_muon_is_refused_in_one_sentence():
    with pytest.raises(RecipeError, match="needs use_muon true; with use_muon false pass --adamw_lr_ratio 1"):
        ModelArguments(adamw_lr_ratio=3.0)


@pytest.mark.parametrize("optim, fused", [("adamw_torch_fused", True), ("adamw_torch", None)])
def test_the_adamw_half_of_muon_follows_the_recipes_optim(tmp_path, optim, fused):
    trainer = _trainer(tmp_path / "run", _model(), max_steps=2, optim=optim)
    trainer.train()
    assert trainer.optimizer.optimizer.adamw.defaults["fused"] is fused


def test_a_muon_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole = _trainer(tmp_path / "whole", _model(), max_steps=4)
    whole.train()
    resumed = _trainer(tmp_path / "whole", _model(seed=9), max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("use_muon", [True, False])
def test_decay_embeddings_false_leaves_the_embeddings_undecayed_and_the_blocks_decayed(tmp_path, use_muon):
    """Positions 32-63 never occur in the 32-token blocks, so only weight decay can move their rows."""
    def trained(decay_embeddings):
        model = _model()
        args = TrainingArguments(output_dir=str(tmp_path / str(decay_embeddings)), use_cpu=True, report_to=[],
                                 per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, weight_decay=0.5,
                                 lr_scheduler_type="constant", save_strategy="no", disable_tqdm=True, seed=0)
        dataset = Dataset.from_dict({"input_ids": torch.randint(0, 50000, (16, 32), generator=torch.Generator().manual_seed(4)).tolist()})
        trainer = TrmTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate_blocks, use_muon=use_muon,
                             decay_embeddings=decay_embeddings)
        names = trainer.get_decay_parameter_names(model)
        trainer.train()
        return model, names

    start = _model().transformer.wpe.weight[32:].detach().clone()
    decayed, decayed_names = trained(True)
    kept, kept_names = trained(False)
    assert torch.allclose(decayed.transformer.wpe.weight[32:], start * (1 - 1e-2 * 0.5) ** 3, atol=1e-7)
    assert torch.equal(kept.transformer.wpe.weight[32:], start)
    embeddings = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert not embeddings & set(kept_names) and set(decayed_names) - set(kept_names) <= embeddings
    assert "transformer.h.0.mlp.c_fc.weight" in kept_names


def test_evaluation_lays_out_a_passage_the_way_the_model_was_tuned(monkeypatch, tokenizer):
    import trm.evaluation as evaluation

    prompts = []

    def record_prompt(model, tokenizer, messages, settings):
        prompts.append(messages[0]["content"])
        return "Rollo", True

    monkeypatch.setattr(evaluation, "generate_reply", record_prompt)
    row = {"context": "Rollo led the Normans.", "question": "Who led them?", "answers": ["Rollo"]}
    model = _model()
    evaluation.free_squad_answer(model, tokenizer, row, max_new_tokens=8)
    model.config.squad_layout = "question_first"
    evaluation.free_squad_answer(model, tokenizer, row, max_new_tokens=8)
    passage_first, question_first = prompts
    assert passage_first.index("Passage:") < passage_first.index("Question:")
    assert question_first.index("Question:") < question_first.index("Passage:") < question_first.rindex("Question:")


def test_resuming_an_adamw_checkpoint_with_muon_is_refused_in_one_sentence(tmp_path):
    adamw = TrmTrainer(model=_model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    adamw.create_optimizer()
    muon = _trainer(tmp_path / "muon", _model(), max_steps=1)
    muon.create_optimizer()
    with pytest.raises(ValueError, match="resume it with --use_muon false"):
        muon.optimizer.load_state_dict(adamw.optimizer.state_dict())


def test_resuming_a_muon_checkpoint_with_adamw_is_refused_in_one_sentence(tmp_path):
    from trm.recipe import RecipeError

    _trainer(tmp_path / "muon", _model(), max_steps=2).train()
    adamw = _trainer(tmp_path / "muon", _model(), max_steps=4)
    adamw.use_muon = False
    with pytest.raises(RecipeError, match="resume it with --use_muon true"):
        adamw.train(resume_from_checkpoint=str(tmp_path / "muon" / "checkpoint-2"))


def test_a_negative_or_unsupported_prompt_loss_weight_is_refused_in_one_sentence(tmp_path):
    from trm.recipe import RecipeError

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(RecipeError, match="must be 0 or more"):
        TrmTrainer(model=_model(), args=args, prompt_loss_weight=-0.1)
    with pytest.raises(RecipeError, match="needs the chunked loss"):
        TrmTrainer(model=_model(), args=args, prompt_loss_weight=0.1, loss_chunk_rows=0)


def test_a_decay_length_below_one_is_that_share_of_the_run(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path / "run", model, max_steps=10)
    trainer.args.lr_scheduler_type = "warmup_stable_decay"
    trainer.args.lr_scheduler_kwargs = {"num_decay_steps": 0.2}
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = []
    for _ in range(10):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.args.lr_scheduler_kwargs["num_decay_steps"] == 2
    assert rates[:9] == [1e-2] * 9 and rates[9] < 1e-2  # stable until step 8, then the last 2 steps decay


def test_a_batch_ramp_grows_from_a_quarter_of_the_step_to_all_of_it_in_equal_updates():
    from trm.training import ramp_update_rows

    sizes = [ramp_update_rows(step, 30, 32) for step in range(40)]
    assert sizes[0] == 8 and sizes[29] == 16 and sizes[30:] == [32] * 10
    assert sizes == sorted(sizes) and set(sizes) == {8, 16, 32}
    assert ramp_update_rows(0, 30, 5) == 5  # no divisor of 5 in [2, 5): the step stays one update


def _ramp_run(tmp_path, per_device: int, accumulation: int, max_steps: int, use_muon: bool, **kwargs):
    dataset = Dataset.from_dict({"input_ids": torch.randint(0, 50000, (16, 32), generator=torch.Generator().manual_seed(4)).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, max_steps=max_steps, learning_rate=1e-2,
                             lr_scheduler_type="constant", max_grad_norm=0.5, logging_steps=1, save_strategy="no",
                             disable_tqdm=True, seed=0, adam_epsilon=1e-3)  # Adam's default 1e-8 turns float noise into whole steps
    trainer = TrmTrainer(model=_model(), args=args, train_dataset=dataset, data_collator=collate_blocks, use_muon=use_muon, **kwargs)
    trainer.train()
    return trainer


# Muon's Newton-Schulz iterations run in bf16, so only micro-batches summed in the same order match it exactly.
@pytest.mark.parametrize("per_device, accumulation, use_muon", [(4, 2, True), (8, 1, True), (1, 8, False), (8, 1, False)])
def test_batch_ramp_updates_are_the_steps_of_a_run_with_that_batch_size(tmp_path, per_device, accumulation, use_muon):
    """During the ramp's first third a step of 8 sequences is 4 updates of 2, whether the step's micro-batches
    are split or gathered: the weights, and the losses logged, are those of 8 steps of 2 sequences."""
    ramped = _ramp_run(tmp_path / "ramped", per_device, accumulation, 2, use_muon, batch_ramp_steps=100)
    small = _ramp_run(tmp_path / "small", 2, 1, 8, use_muon)
    for (name, a), (_, b) in zip(ramped.model.named_parameters(), small.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    ramped_losses = [entry["loss"] for entry in ramped.state.log_history if "loss" in entry]
    small_losses = [entry["loss"] for entry in small.state.log_history if "loss" in entry]
    assert ramped_losses == pytest.approx([sum(small_losses[:4]) / 4, sum(small_losses[4:]) / 4], rel=1e-5)
    unramped = _ramp_run(tmp_path / "unramped", per_device, accumulation, 2, use_muon)
    assert not torch.allclose(unramped.model.transformer.h[0].mlp.c_fc.weight, ramped.model.transformer.h[0].mlp.c_fc.weight, atol=1e-3)


def test_a_batch_ramp_says_so_and_stays_off_where_it_cannot_train_as_the_trainer_would(tmp_path, caplog):
    import logging

    from trm.recipe import RecipeError
    from trm.training import ModelArguments

    with pytest.raises(RecipeError, match="batch_ramp_steps must be 0 or more"):
        ModelArguments(batch_ramp_steps=-1)
    for size in (-0.1, float("nan")):
        with pytest.raises(RecipeError, match="sinusoidal_positions is the position table's starting size"):
            ModelArguments(sinusoidal_positions=size)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="trm.training"):
        trainer = TrmTrainer(model=_model(), args=args, batch_ramp_steps=0.1)
    assert trainer.batch_ramp_steps == 0 and "batch_ramp_steps 0.1 is off for this run: a step of one sequence" in caplog.text
