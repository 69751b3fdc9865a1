import json

import pytest

from data.files import DataError
from data.pretraining import PretrainingDataArguments, prepare_pretraining_data
from data.tokenizer import EOS_TOKEN_ID
from trm.rules import RuleViolation


def _args(tmp_path, files, **overrides):
    settings = dict(train_file=[str(f) for f in files], data_cache_dir=str(tmp_path / "cache"), block_size=32,
                    min_document_chars=20, validation_split_percentage=10.0, preprocessing_num_workers=1)
    return PretrainingDataArguments(**{**settings, **overrides})


def test_prepare_cleans_dedupes_packs_and_caches(tmp_path, wiki_jsonl, tokenizer):
    with open(wiki_jsonl, "a") as handle:
        handle.write(json.dumps({"text": "Article 0. " + "Paris is the capital city of France. Many people visit the city every year to see its museums."}) + "\n")
        handle.write(json.dumps({"text": "Too short."}) + "\n")
        handle.write(json.dumps({"title": "no text"}) + "\n")
        handle.write("{not json\n")
    data, stats = prepare_pretraining_data(_args(tmp_path, [wiki_jsonl]))
    assert stats["skipped"] == {
        "exact duplicate documents": 1, "documents shorter than 20 characters": 1,
        "records without a text field 'text'": 1, "JSON lines that do not parse": 1,
    }
    assert stats["documents_kept"] == 300
    train, validation = data["train"], data["validation"]
    assert len(train) > 0 and len(validation) > 0
    assert all(len(block) == 32 for block in train["input_ids"])
    train_tokens = [t for block in train["input_ids"] for t in block]
    assert train_tokens.count(EOS_TOKEN_ID) >= stats["train"]["documents"] - 1  # one separator per document
    text = tokenizer.decode(train_tokens)
    assert "[1]" not in text and "Category:" not in text and "\n" not in text and "}}" not in text
    assert stats["train"]["tokens"] == len(train) * 32 + stats["train"]["tokens_dropped_at_block_ends"]

    again, stats_again = prepare_pretraining_data(_args(tmp_path, [wiki_jsonl]))
    assert "from_cache" in stats_again and again["train"]["input_ids"] == train["input_ids"]
    assert "from_cache" not in stats and stats["cache_dir"] == stats_again["cache_dir"]  # where the data lies, either way


def test_split_is_by_document_and_the_token_budget_holds(tmp_path, wiki_jsonl, tokenizer):
    data, stats = prepare_pretraining_data(_args(tmp_path, [wiki_jsonl], max_train_tokens=2000, block_size=16))
    assert stats["train"]["tokens"] <= 2000 and stats["train"]["documents_over_token_budget"] > 0
    decoded = lambda split: {d.strip() for d in tokenizer.decode([t for b in data[split]["input_ids"] for t in b]).split("<|endoftext|>")}
    full_train = {d for d in decoded("train") if d.startswith("Article")}
    full_validation = {d for d in decoded("validation") if d.startswith("Article")}
    assert not (full_train & full_validation)


def test_phase1_refuses_instruction_files(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi!"}] * 5))
    with pytest.raises(RuleViolation, match="plain text only"):
        prepare_pretraining_data(_args(tmp_path, [alpaca]))
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": []}]}]}))
    with pytest.raises(RuleViolation, match="SQuAD"):
        prepare_pretraining_data(_args(tmp_path, [squad]))
    dialogue = tmp_path / "dialogues_train.txt"
    dialogue.write_text("Hi , Tom . __eou__ Hello ! __eou__ How are you ? __eou__\n")
    with pytest.raises(RuleViolation, match="DailyDialog"):
        prepare_pretraining_data(_args(tmp_path, [dialogue]))


def test_empty_and_undecodable_files_are_reported(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="no documents"):
        prepare_pretraining_data(_args(tmp_path, [empty]))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa\n\xc3\x28\n")  # Latin-1 or worse: say why nothing was read
    with pytest.raises(DataError, match="no documents found \\(skipped: 2 lines that are not valid UTF-8\\)"):
        prepare_pretraining_data(_args(tmp_path, [binary]))


def test_too_little_text_for_one_block_says_what_to_change(tmp_path, wiki_jsonl):
    with pytest.raises(DataError, match=r"one 4096-token block in each split \(0 training and 0 validation blocks from "
                                        r"\d+ and \d+ documents\); give more text or a larger validation_split_percentage"):
        prepare_pretraining_data(_args(tmp_path, [wiki_jsonl], block_size=4096, max_train_tokens=2000))


def test_offline_hub_source_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = PretrainingDataArguments(dataset_name="wikimedia/wikipedia", dataset_config_name="20231101.simple",
                                    data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="could not load wikimedia/wikipedia.*--train_file"):
        prepare_pretraining_data(args)


def test_instruction_records_late_in_a_file_are_refused(tmp_path, wiki_jsonl):
    with open(wiki_jsonl, "a") as handle:
        for i in range(50):  # the Hub's alpaca carries a `text` field besides instruction/output
            handle.write(json.dumps({"instruction": f"Task {i}", "input": "", "output": "Done.",
                                     "text": f"### Instruction:\nTask {i}\n\n### Response:\nDone."}) + "\n")
    with pytest.raises(RuleViolation, match=r"record 30\d.*plain text only"):
        prepare_pretraining_data(_args(tmp_path, [wiki_jsonl]))
    text_only = tmp_path / "text_only.jsonl"
    text_only.write_text(wiki_jsonl.read_text().split("\n", 1)[0] + "\n" +
                         json.dumps({"text": "### Instruction:\nSay hi.\n\n### Response:\nHi!"}) + "\n")
    with pytest.raises(RuleViolation, match="Alpaca-formatted"):
        prepare_pretraining_data(_args(tmp_path, [text_only]))


