
import json
from pathlib import Path

import pytest
from transformers import TrainingArguments

from data.pretraining import PretrainingDataArguments
from trm import rules
from trm.recipe import RecipeError, parse_recipe
from trm.time_budget import SHAPE_LADDER
from trm.training import ModelArguments

from conftest import write_recipe

TYPES = (ModelArguments, PretrainingDataArguments, TrainingArguments)


def test_recipe_sections_flatten_and_command_line_overrides(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"config_name": "configs/gpt2-tiny.json"},
        "data": {"max_train_tokens": 1000, "train_file": ["a.txt"]},
        "training": {"output_dir": str(tmp_path / "out"), "learning_rate": "1e-3", "num_train_epochs": 2},
    })
    model, data, training = parse_recipe(TYPES, [str(recipe), "--max_train_tokens", "77", "--learning_rate", "0.5",
                                                 "--dataset_name", "null", "--resume"], defaults={"use_cpu": True})
    assert data.max_train_tokens == 77 and data.train_file == ["a.txt"] and data.dataset_name is None
    assert training.learning_rate == 0.5 and training.num_train_epochs == 2 and training.use_cpu is True
    assert training.resume_from_checkpoint == "auto" and model.config_name == "configs/gpt2-tiny.json"


def test_unknown_recipe_key_and_missing_recipe_are_clear_errors(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"training": {"output_dir": "x", "learning_rat": 1.0}})
    with pytest.raises(RecipeError, match="learning_rat"):
        parse_recipe(TYPES, [str(recipe)])
    with pytest.raises(RecipeError, match="not found"):
        parse_recipe(TYPES, [str(tmp_path / "missing.yaml")])
    with pytest.raises(RecipeError, match="unknown command-line"):
        parse_recipe(TYPES, [str(write_recipe(tmp_path / "ok.yaml", {"output_dir": "x"})), "--no_such_flag", "1"])


def test_the_shipped_recipes_parse_and_obey_the_rules():
    from data.sft import SftDataArguments

    model1, _, phase1 = parse_recipe(TYPES, ["recipes/phase1_pretraining.yaml"])
    rules.check_epochs("pretraining", phase1.num_train_epochs)
    assert model1.config_name == ModelArguments().config_name and Path(model1.config_name).is_file()
    assert phase1.use_cpu and phase1.load_best_model_at_end
    _, data2, phase2 = parse_recipe((ModelArguments, SftDataArguments, TrainingArguments), ["recipes/phase2_instruction_tuning.yaml"])
    rules.check_epochs("instruction_tuning", phase2.num_train_epochs)
    assert phase2.use_cpu and data2.max_seq_length == 256


def test_epoch_caps():
    rules.check_epochs("pretraining", 3)
    with pytest.raises(rules.RuleViolation, match="capped at 3"):
        rules.check_epochs("pretraining", 3.5)
    with pytest.raises(rules.RuleViolation, match="capped at 2"):
        rules.check_epochs("instruction_tuning", 3)
    with pytest.raises(rules.RuleViolation, match="epochs"):
        rules.check_step_budget("pretraining", max_steps=100, examples_per_step=32, train_examples=1000)
    rules.check_step_budget("pretraining", max_steps=90, examples_per_step=32, train_examples=1000)


def test_phase1_refuses_pretrained_weights(tmp_path):
    with pytest.raises(rules.RuleViolation, match="random weights"):
        rules.check_random_init("gpt2", None)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(rules.RuleViolation, match="weights"):
        rules.check_random_init(None, str(tmp_path))
    rules.check_random_init(None, "configs/gpt2-tiny.json")


def test_tokenizer_retrieval_and_device_rules():
    with pytest.raises(rules.RuleViolation, match="GPT-2 tokenizer"):
        rules.check_tokenizer("my-retrained-bpe")
    with pytest.raises(rules.RuleViolation, match="retrieval"):
        rules.check_no_retrieval_settings({"retrieval_corpus": "wiki.index"})
    with pytest.raises(rules.RuleViolation, match="retrieval"):
        rules.check_plain_text_record({"text": "x", "ctxs": []}, "f")
    with pytest.raises(rules.RuleViolation, match="bf16"):
        rules.check_device(use_cpu=True, precision="bf16", cpu_bf16_flags=[])


@pytest.mark.parametrize("record,kind", [
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "Alpaca"),
    ({"question": "q", "context": "c", "answers": {}}, "question-answering"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
    ({"dialog": ["hi", "hello"]}, "dialogue"),
    ({"version": "v2.0", "data": [{"title": "t", "paragraphs": []}]}, "SQuAD"),
    ({"text": "Hello . __eou__ Hi . __eou__"}, "DailyDialog"),
])
def test_phase1_refuses_instruction_data(record, kind):
    with pytest.raises(rules.RuleViolation, match=kind):
        rules.check_plain_text_record(record, "file")
    with pytest.raises(rules.RuleViolation, match="plain text"):
        rules.check_plain_text_hub_dataset("tatsu-lab/alpaca")
    rules.check_plain_text_record({"text": "An ordinary article about rivers."}, "file")


def test_the_shape_ladder_holds_the_default_and_grows_deeper_at_one_width():
    shapes = [json.loads(Path(path).read_text()) for path in SHAPE_LADDER]
    assert ModelArguments().config_name in SHAPE_LADDER
    assert len({shape["n_embd"] for shape in shapes}) == 1
    depths = [shape["n_layer"] for shape in shapes]
    assert depths == sorted(set(depths)), "config_name auto reads the ladder cheapest first"
