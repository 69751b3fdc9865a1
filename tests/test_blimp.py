"""BLiMP: a model that prefers one sentence of each pair gets the accuracy it should, per paradigm and field."""

import json

import pytest
import torch

import run_eval
from conftest import model_preferring
from data.files import DataError
from trm.blimp import blimp_evaluation, read_blimp, sentence_log_probs

CAT, DOG = "A cat cat cat.", "A dog dog dog."


def _paradigm(folder, name, field, pairs, extra_lines=()):
    lines = [json.dumps({"sentence_good": good, "sentence_bad": bad, "field": field, "UID": name, "pairID": str(i)})
             for i, (good, bad) in enumerate(pairs)]
    (folder / f"{name}.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")


@pytest.fixture()
def blimp_dir(tmp_path):
    folder = tmp_path / "blimp"
    folder.mkdir()
    _paradigm(folder, "all_right", "morphology", [(CAT, DOG)] * 5)
    _paradigm(folder, "all_wrong", "syntax", [(DOG, CAT)] * 4)
    _paradigm(folder, "three_of_four", "syntax/semantics", [(CAT, DOG)] * 3 + [(DOG, CAT)],
              extra_lines=['{"sentence_good": "only one sentence"}', "{not json"])
    return folder


@pytest.fixture()
def cat_model(tokenizer):
    cat = tokenizer(" cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    return model_preferring(cat[0], strength=20.0)


def test_accuracy_per_paradigm_field_and_mean(blimp_dir, cat_model, tokenizer):
    report = blimp_evaluation(cat_model, tokenizer, str(blimp_dir), batch_size=3)
    assert report["paradigms"] == {"all_right": 100.0, "all_wrong": 0.0, "three_of_four": 75.0}
    assert report["fields"] == {"morphology": 100.0, "syntax": 0.0, "syntax_semantics": 75.0}
    assert report["mean"] == pytest.approx(175 / 3) and report["pairs"] == 13
    assert report["skipped"] == {"lines without sentence_good and sentence_bad": 1, "JSON lines that do not parse": 1}


def test_batched_scores_equal_one_sentence_at_a_time(cat_model, tokenizer):
    sentences = ["A cat.", "The dog ran home quickly today.", CAT, "Who should Derek hug after shocking Richard?"]
    batched = sentence_log_probs(cat_model, tokenizer, sentences, batch_size=3, chunk_rows=5)
    for sentence, score in zip(sentences, batched):
        ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(sentence, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(cat_model(ids).logits[0, :-1].double(), dim=-1)
        assert score == pytest.approx(float(log_probs.gather(1, ids[0, 1:, None]).sum()), abs=1e-3)


def test_sampling_takes_the_same_pairs_of_each_paradigm(blimp_dir):
    first, _ = read_blimp(str(blimp_dir), pairs_per_paradigm=2)
    again, _ = read_blimp(str(blimp_dir), pairs_per_paradigm=2)
    assert first == again and len(first) == 6


def test_a_missing_or_empty_directory_is_one_sentence(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        read_blimp(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="holds no BLiMP paradigm files"):
        read_blimp(str(tmp_path))


def test_make_eval_blimp_reports_and_adds_it_to_the_card(blimp_dir, model_dir, tmp_path, capsys):
    (model_dir / "README.md").write_text("---\nlicense: mit\n---\n# model\n")
    report = run_eval.main([str(model_dir), "--blimp", str(blimp_dir), "--report", str(tmp_path / "report.json")])
    assert set(report["blimp"]["paradigms"]) == {"all_right", "all_wrong", "three_of_four"}
    assert "blimp" in capsys.readouterr().out
    card = (model_dir / "README.md").read_text()
    assert "type: nyu-mll/blimp" in card and "BLiMP accuracy, mean over paradigms" in card
