import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from models.gpt2 import build_model, chunked_lm_loss, parameter_counts, use_fused_gelu

from conftest import TINY_CONFIG


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY_CONFIG))


def _assert_same_loss_and_gradients(model, reference, fast) -> torch.Tensor:
    """`fast()` gives `reference()`'s loss and the same gradient on every parameter; returns the fast loss."""
    model.zero_grad()
    expected = reference()
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = fast()
    loss.backward()
    assert torch.allclose(loss, expected, atol=1e-5, rtol=1e-5)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected_grads[name], atol=1e-6, rtol=1e-4), name
    return loss


@pytest.mark.parametrize("chunk_rows", [7, 64, 4096])
def test_chunked_loss_matches_the_stock_loss_and_gradients(chunk_rows):
    model = _model()
    torch.manual_seed(1)
    input_ids = torch.randint(0, 50257, (3, 40))
    labels = input_ids.clone()
    labels[0, :15] = -100
    labels[2, 30:] = -100
    mask = torch.ones_like(input_ids)

    _assert_same_loss_and_gradients(
        model, lambda: model(input_ids=input_ids, attention_mask=mask, labels=labels).loss,
        lambda: chunked_lm_loss(model, input_ids, labels, attention_mask=mask, chunk_rows=chunk_rows))


def test_positions_without_a_label_never_reach_the_output_projection(monkeypatch):
    import models.gpt2 as gpt2

    seen_rows = []
    original = gpt2._ChunkedLinearCrossEntropy.apply

    def recording_apply(hidden, *rest):
        seen_rows.append(hidden.shape[0])
        return original(hidden, *rest)

    monkeypatch.setattr(gpt2._ChunkedLinearCrossEntropy, "apply", recording_apply)
    model = _model()
    input_ids = torch.randint(0, 50257, (2, 20))
    labels = torch.full_like(input_ids, -100)
    labels[0, 15:] = input_ids[0, 15:]  # a reply of 5 tokens; the second row is all prompt
    chunked_lm_loss(model, input_ids, labels).backward()
    assert seen_rows == [5]


def test_num_items_in_batch_normalisation_matches_the_stock_model():
    model = _model()
    input_ids = torch.randint(0, 50257, (2, 16))
    stock = model(input_ids=input_ids, labels=input_ids, num_items_in_batch=100).loss
    fast = chunked_lm_loss(model, input_ids, input_ids, num_items_in_batch=100)
    assert torch.allclose(fast, stock, atol=1e-5)


def test_no_gradients_are_computed_without_grad_mode():
    model = _model()
    input_ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        loss = chunked_lm_loss(model, input_ids, input_ids)
    assert not loss.requires_grad and torch.isfinite(loss)


def test_model_configs_and_parameter_counts():
    tiny = parameter_counts(build_model("configs/gpt2-tiny.json"))
    assert 15e6 <= tiny["total"] <= 18e6 and tiny["total"] == tiny["embedding"] + tiny["non_embedding"]
    seed = build_model("configs/gpt2-seed-512x8.json")
    assert seed.config.n_embd == 512 and seed.config.n_layer == 8 and 45e6 <= parameter_counts(seed)["total"] <= 55e6
    with pytest.raises(FileNotFoundError):
        build_model("configs/missing.json")


def test_trainer_counts_shifted_labels_so_evaluation_equals_the_model_loss(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from trm.training import TrmTrainer, collate_blocks

    model = _model().eval()
    input_ids = torch.randint(0, 50257, (8, 32))
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids).loss.item()
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist()})
    for chunk_rows in (0, 256):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=8,
                                 prediction_loss_only=True, disable_tqdm=True)
        trainer = TrmTrainer(model=model, args=args, eval_dataset=dataset, data_collator=collate_blocks, loss_chunk_rows=chunk_rows)
        assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_fused_gelu_computes_the_same_function_and_the_saved_config_is_unchanged(tmp_path):
    stock, fused = _model(), use_fused_gelu(_model())
    assert type(fused.transformer.h[0].mlp.act).__name__ == "GELUTanh"
    input_ids = torch.randint(0, 50257, (2, 24))
    stock_loss = stock(input_ids=input_ids, labels=input_ids).loss
    fused_loss = fused(input_ids=input_ids, labels=input_ids).loss
    stock_loss.backward()
    fused_loss.backward()
    assert torch.allclose(fused_loss, stock_loss, atol=1e-6, rtol=1e-6)
    for (name, a), (_, b) in zip(stock.named_parameters(), fused.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-4), name
    fused.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.config.activation_function == "gelu_new"
    assert type(reloaded.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_chunked_loss_under_bf16_autocast_matches_the_fp32_loss_within_bf16_tolerance(chunk_rows):
    model = _model()
    torch.manual_seed(2)
    input_ids = torch.randint(0, 50257, (3, 40))
    labels = input_ids.clone()
    labels[1, :20] = -100

    def loss_and_grads(bf16: bool, chunked: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = chunked_lm_loss(model, input_ids, labels, chunk_rows=chunk_rows) if chunked else model(
                input_ids=input_ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fp32_loss, fp32_grads = loss_and_grads(bf16=False, chunked=False)
    stock_bf16_loss, _ = loss_and_grads(bf16=True, chunked=False)
    bf16_loss, bf16_grads = loss_and_grads(bf16=True, chunked=True)
    assert bf16_loss.dtype == torch.float32
    assert bf16_loss != fp32_loss  # the products really ran in bf16
    assert torch.allclose(bf16_loss, fp32_loss, rtol=2e-3) and torch.allclose(bf16_loss, stock_bf16_loss, rtol=2e-3)
    for name, grad in bf16_grads.items():
        assert grad.dtype == torch.float32
        assert (grad - fp32_grads[name]).norm() <= 0.03 * fp32_grads[name].norm(), name


@pytest.mark.parametrize("chunk_rows", [5, 4096])
def test_a_prompt_loss_weight_adds_the_weighted_prompt_loss_and_skips_padding(chunk_rows):
    model = _model()
    torch.manual_seed(5)
    input_ids = torch.randint(0, 50257, (2, 24))
    mask = torch.ones_like(input_ids)
    mask[1, 18:] = 0  # padding
    labels = torch.full_like(input_ids, -100)
    labels[:, 12:] = input_ids[:, 12:]
    labels[1, 18:] = -100
    replies = labels[:, 1:].ne(-100).sum()

    def stock_sum(target_labels):  # the stock model's summed loss over the given labels
        return model(input_ids=input_ids, attention_mask=mask, labels=target_labels, num_items_in_batch=1).loss

    prompt_labels = torch.where((labels == -100) & mask.bool(), input_ids, torch.full_like(input_ids, -100))
    prompt_labels[:, 0] = -100  # the first token is never a target
    _assert_same_loss_and_gradients(
        model, lambda: (stock_sum(labels) + 0.1 * stock_sum(prompt_labels)) / replies,
        lambda: chunked_lm_loss(model, input_ids, labels, attention_mask=mask, chunk_rows=chunk_rows, prompt_loss_weight=0.1))
    unweighted = chunked_lm_loss(model, input_ids, labels, attention_mask=mask, chunk_rows=chunk_rows)
    assert unweighted.item() == pytest.approx((stock_sum(labels) / replies).item(), rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_z_loss_adds_the_squared_log_normaliser_with_its_exact_gradient(chunk_rows):
    model = _model()
    torch.manual_seed(2)
    input_ids = torch.randint(0, 50257, (2, 30))
    labels = input_ids.clone()
    labels[1, :10] = -100
    z = 0.01  # large enough for the term to matter in the gradients

    def reference():  # cross-entropy plus z x log(Z)^2, through autograd
        logits = model(input_ids=input_ids).logits[:, :-1].reshape(-1, 50257)
        targets = labels[:, 1:].reshape(-1)
        kept = targets != -100
        log_z = torch.logsumexp(logits[kept], dim=-1)
        return torch.nn.functional.cross_entropy(logits[kept], targets[kept]) + z * (log_z ** 2).mean()

    fast = _assert_same_loss_and_gradients(
        model, reference, lambda: chunked_lm_loss(model, input_ids, labels, chunk_rows=chunk_rows, z_loss_weight=z))
    assert chunked_lm_loss(model, input_ids, labels, z_loss_weight=0.0) < fast  # z-loss only adds


def test_zero_initialised_projections_start_each_block_as_the_identity_and_stay_a_plain_gpt2(tmp_path):
    model = build_model("configs/gpt2-tiny.json", seed=0, zero_init_projections=True)
    assert type(model) is GPT2LMHeadModel
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_attn.weight.any()  # only the output projections start at zero
    ids = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        embedded = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(16))[None]
        hidden = model.transformer(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(hidden[-2], embedded, atol=1e-6)  # every block adds nothing yet: the residual stream is the input


def test_sinusoidal_positions_are_one_rotation_apart_and_change_nothing_else():
    model = build_model("configs/gpt2-tiny.json", seed=0, sinusoidal_positions=0.02)
    default = build_model("configs/gpt2-tiny.json", seed=0)
    assert type(model) is GPT2LMHeadModel
    positions = model.transformer.wpe.weight.detach().double()
    pairs = positions.view(positions.shape[0], -1, 2)  # (sin, cos) of each frequency
    assert torch.allclose(pairs.norm(dim=-1), pairs[0].norm(dim=-1).expand_as(pairs[..., 0]))
    assert abs(float(positions.pow(2).mean().sqrt()) - 0.02) < 1e-3  # the size asked for
    # One fixed rotation per frequency takes every position to the next: what a previous-token head can use.
    angle = torch.atan2(pairs[1, :, 0], pairs[1, :, 1]) - torch.atan2(pairs[0, :, 0], pairs[0, :, 1])
    rotation = torch.stack([torch.stack([angle.cos(), angle.sin()], -1), torch.stack([-angle.sin(), angle.cos()], -1)], -2)
    assert torch.allclose(torch.einsum("fij,pfj->pfi", rotation, pairs[:-1]), pairs[1:], atol=1e-7)
    assert not torch.allclose(pairs[1:], pairs[:-1])
    others = {name: p for name, p in default.named_parameters() if "wpe" not in name}
    assert all(torch.equal(p, others[name]) for name, p in model.named_parameters() if name in others)
