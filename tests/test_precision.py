"""`precision: auto|fp32|bf16`: what is chosen where, what is refused, and that the Trainer really runs bf16."""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import trm.precision as precision
from trm import rules
from trm.recipe import RecipeError
from trm.training import ModelArguments, TrmTrainer, collate_blocks, settle_precision

from conftest import TINY_CONFIG


def _model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**TINY_CONFIG))


def _args(tmp_path, **overrides):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True,
                             per_device_train_batch_size=2, **overrides)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    zen2 = tmp_path / "zen2"
    zen2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    sapphire = tmp_path / "spr"
    sapphire.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    graviton = tmp_path / "arm"
    graviton.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert precision.cpu_bf16_flags(zen2) == []
    assert precision.cpu_bf16_flags(sapphire) == ["amx_bf16", "avx512_bf16"]
    assert precision.cpu_bf16_flags(graviton) == ["bf16"]
    assert precision.cpu_bf16_flags(tmp_path / "missing") == []


@pytest.mark.parametrize("fp32_seconds,bf16_seconds,expected", [(1.0, 0.6, "bf16"), (1.0, 0.95, "fp32"), (1.0, 3.0, "fp32")])
def test_auto_picks_bf16_only_where_it_is_clearly_faster(monkeypatch, fp32_seconds, bf16_seconds, expected):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(precision, "seconds_per_step", lambda model, b, s, bf16: bf16_seconds if bf16 else fp32_seconds)
    choice = precision.choose_precision("auto", use_cpu=True, model=None, batch_size=8, block_size=256)
    assert choice.dtype == expected
    assert "avx512_bf16" in choice.reason and f"{fp32_seconds:.3f} s in fp32" in choice.reason


def test_auto_does_not_time_bf16_on_a_cpu_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    monkeypatch.setattr(precision, "seconds_per_step", lambda *a, **k: pytest.fail("timed on a CPU without bf16"))
    choice = precision.choose_precision("auto", use_cpu=True, model=None, batch_size=8, block_size=256)
    assert choice.dtype == "fp32" and "no bf16" in choice.reason


def test_timing_runs_real_steps_without_touching_the_model():
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert 0 < precision.seconds_per_step(model, batch_size=2, block_size=16, bf16=True) < 60
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_half_precision_is_refused_on_a_cpu_that_runs_it_slowly(tmp_path, monkeypatch):
    import trm.training as training

    monkeypatch.setattr(training, "cpu_bf16_flags", lambda: [])
    with pytest.raises(rules.RuleViolation, match="without bf16 instructions"):
        settle_precision(ModelArguments(precision="bf16"), _args(tmp_path), _model(), 16)
    with pytest.raises(rules.RuleViolation, match="without bf16 instructions"):
        settle_precision(ModelArguments(), _args(tmp_path, bf16=True), _model(), 16)
    with pytest.raises(rules.RuleViolation, match="fp16"):
        rules.check_device(use_cpu=True, precision="fp16", cpu_bf16_flags=["amx_bf16"])
    with pytest.raises(RecipeError, match="contradict"):
        settle_precision(ModelArguments(precision="fp32"), _args(tmp_path, bf16=True), _model(), 16)
    with pytest.raises(RecipeError, match="choose one of"):
        settle_precision(ModelArguments(precision="fp8"), _args(tmp_path), _model(), 16)
    args = _args(tmp_path)
    assert settle_precision(ModelArguments(precision="fp32"), args, _model(), 16).dtype == "fp32" and not args.bf16


def test_a_bf16_choice_makes_the_trainer_compute_its_loss_in_bf16(tmp_path, monkeypatch):
    import trm.training as training

    monkeypatch.setattr(training, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    model = _model()
    batch = collate_blocks([{"input_ids": torch.randint(0, 50257, (32,)).tolist()} for _ in range(4)])
    losses = {}
    for setting in ("fp32", "bf16"):
        args = _args(tmp_path / setting)
        settle_precision(ModelArguments(precision=setting), args, model, 32)
        trainer = TrmTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": [[1] * 32]}),
                             data_collator=collate_blocks)
        with torch.no_grad():
            losses[setting] = trainer.compute_loss(model, dict(batch)).item()
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-3)
