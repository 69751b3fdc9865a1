"""Model cards: the license follows the training data, and evaluation results land in model-index."""

import pytest
from huggingface_hub import EvalResult, ModelCard

from trm.model_card import add_results, build_card, evaluation_results, license_for


def test_the_license_combines_the_terms_of_every_dataset_used():
    assert license_for(["wikimedia/wikipedia"], False)[0] == "cc-by-sa-4.0"
    assert license_for(["wikimedia/wikipedia", "rajpurkar/squad", "rajpurkar/squad_v2"], False)[0] == "cc-by-sa-4.0"
    chosen, why = license_for(["wikimedia/wikipedia", "tatsu-lab/alpaca", "rajpurkar/squad"], False)
    assert chosen == "cc-by-nc-sa-4.0" and "may not be used commercially" in why
    assert license_for(["tatsu-lab/alpaca"], False)[0] == "cc-by-nc-4.0"
    chosen, why = license_for(["tatsu-lab/alpaca"], True)
    assert chosen == "other" and "unknown origin" in why


def test_evaluation_results_are_merged_into_model_index(tmp_path):
    card = build_card("TRM test", "A test.", {"parameters": "1"}, ["wikimedia/wikipedia"], False,
                      [EvalResult(task_type="text-generation", dataset_type="wikimedia/wikipedia", dataset_name="held-out",
                                  dataset_split="validation", metric_type="loss", metric_value=4.5)], from_scratch=True)
    (tmp_path / "README.md").write_text(str(card))
    report = {"squad_v1.1 free": {"exact": 1.0, "f1": 2.0, "file": "dev-v1.1.json"},
              "squad_v1.1 grounded": {"exact": 8.0, "f1": 12.0, "file": "dev-v1.1.json"},
              "instructions": {"ended_by_itself": 0.98}}
    assert add_results(tmp_path, evaluation_results(report))
    report["squad_v1.1 grounded"]["f1"] = 13.0  # a second evaluation replaces the first's numbers
    assert add_results(tmp_path, evaluation_results(report))
    results = ModelCard.load(tmp_path / "README.md").data.eval_results
    values = {(r.dataset_type, r.metric_name or r.metric_type): r.metric_value for r in results}
    assert values == {("wikimedia/wikipedia", "loss"): 4.5, ("rajpurkar/squad", "exact (free decoding)"): 1.0,
                      ("rajpurkar/squad", "f1 (free decoding)"): 2.0, ("rajpurkar/squad", "exact (grounded decoding)"): 8.0,
                      ("rajpurkar/squad", "f1 (grounded decoding)"): 13.0,
                      ("trm-eval-instructions", "replies ending by themselves (%)"): 98.0}
    assert not add_results(tmp_path / "missing", evaluation_results(report))


def test_a_read_only_model_card_is_left_as_it_is(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(str(build_card("TRM test", "A test.", {"parameters": "1"}, ["wikimedia/wikipedia"], False, [], from_scratch=True)))
    card.chmod(0o444)
    before = card.read_text()
    with pytest.raises(PermissionError, match="read-only"):
        add_results(tmp_path, evaluation_results({"squad_v1.1 free": {"exact": 1.0, "f1": 2.0, "file": "dev-v1.1.json"}}))
    assert card.read_text() == before
