"""The passage index: built incrementally without duplicates, safe to interrupt, searched by BM25; run_ask on top."""

import json
import sqlite3

import pytest

import run_ask
import run_index
from data.files import DataError
from data.passages import question_terms, split_passages
from trm.reading import retrieval
from trm.reading.retrieval import PassageIndex

ARTICLES = [
    ("Rhine", "The Rhine is a river in Europe. It begins in the Swiss Alps and ends in the North Sea near Rotterdam."),
    ("Oxygen", "Oxygen is a chemical element with symbol O. It was discovered by Carl Wilhelm Scheele in 1771."),
    ("Black Death", "The Black Death was a plague pandemic. It killed many people in Europe between 1346 and 1353."),
    ("Geology", "Geology is the study of rocks. Geologists date rock formations with stratigraphic correlation."),
]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in ARTICLES))
    return path


def test_split_passages_keeps_every_word_in_order_within_the_budget(tokenizer):
    sentence = "The river flows north past old towns and green hills."
    text = " ".join([sentence] * 40) + " " + "word " * 400
    passages = split_passages(text, tokenizer, target_tokens=30, max_tokens=40)
    assert " ".join(passages).split() == text.split()
    assert all(len(tokenizer(p)["input_ids"]) <= 41 for p in passages)  # +1: a joined sentence gains a leading space
    assert split_passages("   ", tokenizer) == []


def test_index_is_searched_by_bm25_and_rebuilt_without_duplicates(tmp_path, corpus, tokenizer):
    index = PassageIndex(tmp_path / "index.sqlite", create=True)
    first = index.add_file(corpus, tokenizer)
    assert first["status"] == "indexed" and first["passages"] == len(index) == 4
    assert index.search("Where does the Rhine end?", 2)[0].title == "Rhine"
    assert index.search("Who discovered oxygen?", 1)[0].text.startswith("Oxygen is")
    assert index.search("what is it?") == []  # only function words: nothing to match
    assert index.add_file(corpus, tokenizer)["status"] == "unchanged, skipped"
    copy = tmp_path / "copy.jsonl"
    copy.write_text(corpus.read_text())
    again = index.add_file(copy, tokenizer)
    assert again["passages"] == 0 and again["duplicates"] == 4 and len(index) == 4
    corpus.write_text(json.dumps({"title": "Moon", "text": "The Moon orbits the Earth every month."}) + "\n")
    assert index.add_file(corpus, tokenizer)["passages"] == 1  # a changed file replaces its own passages ...
    assert len(index) == 5 and index.search("Moon orbit", 1)[0].title == "Moon"
    assert index.search("Who discovered oxygen?", 1)[0].title == "Oxygen"  # ... and the copy still holds the old ones
    index.close()


def test_an_index_from_an_older_cleaning_is_read_again(tmp_path, corpus, tokenizer, caplog):
    path = tmp_path / "index.sqlite"
    index = PassageIndex(path, create=True)
    index.add_file(corpus, tokenizer)
    index.db.execute("PRAGMA user_version = 1")  # built before tables were dropped from passages
    index.db.commit()
    index.close()
    with caplog.at_level("WARNING", logger="trm.reading.retrieval"):
        PassageIndex(path, read_only=True).close()
    assert "older TRM cleaned differently" in caplog.text
    index = PassageIndex(path)
    index.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="trm.reading.retrieval"):
        PassageIndex(path, read_only=True).close()  # marked for reading again, not read yet
    assert "older TRM cleaned differently" in caplog.text
    index = PassageIndex(path)
    again = index.add_file(corpus, tokenizer)  # the file has not changed, but its passages may have
    assert again["status"] == "indexed" and again["passages"] == 4 and len(index) == 4
    assert index.search("Who discovered oxygen?", 1)[0].text.startswith("Oxygen is")
    assert index.add_file(corpus, tokenizer)["status"] == "unchanged, skipped"
    index.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="trm.reading.retrieval"):
        PassageIndex(path, read_only=True).close()
    assert not caplog.text


def test_an_interrupted_build_leaves_a_usable_index_and_the_next_one_finishes_it(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"title": f"Page {i}", "text": f"Page {i} is about topic{i} and nothing else."}) + "\n"
                            for i in range(50)))
    monkeypatch.setattr(retrieval, "COMMIT_EVERY", 10)
    real_split, calls = retrieval.split_passages, {"n": 0}

    def crash_after_35(text, tokenizer):
        calls["n"] += 1
        if calls["n"] > 35:
            raise KeyboardInterrupt
        return real_split(text, tokenizer)

    monkeypatch.setattr(retrieval, "split_passages", crash_after_35)
    crashed = PassageIndex(tmp_path / "index.sqlite", create=True)
    with pytest.raises(KeyboardInterrupt):
        crashed.add_file(path, tokenizer)
    crashed.db.close()  # what the end of the process does: the uncommitted batch is rolled back
    monkeypatch.setattr(retrieval, "split_passages", real_split)
    index = PassageIndex(tmp_path / "index.sqlite")
    assert len(index) == 30 and index.search("topic7", 1)[0].title == "Page 7"  # the committed batches
    assert index.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    result = index.add_file(path, tokenizer)  # the unfinished file is read again, without duplicates
    assert result["status"] == "indexed" and result["passages"] == 50 and len(index) == 50
    assert len(index.search("topic49", 5)) == 1
    index.db.execute("INSERT INTO passage_search(passage_search) VALUES ('integrity-check')")  # raises if FTS is off


def test_bad_corpora_and_indexes_get_one_sentence(tmp_path, tokenizer, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    index = PassageIndex(tmp_path / "index.sqlite", create=True)
    with pytest.raises(DataError, match="no text to index"):
        index.add_file(empty, tokenizer)
    binary = tmp_path / "photo.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="UTF-8|no text"):
        index.add_file(binary, tokenizer)
    with pytest.raises(DataError, match="not found"):
        index.add_file(tmp_path / "missing.txt", tokenizer)
    assert len(index) == 0
    not_an_index = tmp_path / "notes.sqlite"
    not_an_index.write_text("just text")
    with pytest.raises(DataError, match="not a passage index"):
        PassageIndex(not_an_index)
    with pytest.raises(FileNotFoundError, match="make index"):
        PassageIndex(tmp_path / "absent.sqlite")

    def no_fts5(*args, **kwargs):
        raise sqlite3.OperationalError("no such module: fts5")

    monkeypatch.setattr(retrieval.sqlite3, "connect", lambda *a, **k: type("DB", (), {"execute": no_fts5})())
    with pytest.raises(DataError, match="has no FTS5"):
        retrieval.require_fts5()


def test_question_terms_cannot_inject_fts5_syntax(tmp_path, corpus, tokenizer):
    assert question_terms('Who discovered "oxygen" AND NEAR(x)?') == ["discovered", "oxygen", "near", "x"]
    index = PassageIndex(tmp_path / "index.sqlite", create=True)
    index.add_file(corpus, tokenizer)
    assert index.search('oxygen" OR * (', 1)[0].title == "Oxygen"


def test_make_index_and_ask_from_the_command_line(tmp_path, corpus, model_dir, capsys):
    index_path = tmp_path / "index.sqlite"
    run_index.main(["--corpus", str(corpus), "--index", str(index_path)])
    assert run_index.main(["--corpus", str(corpus), "--index", str(index_path)])["files"][0]["status"] == "unchanged, skipped"
    capsys.readouterr()
    result = run_ask.main([str(model_dir), "Where does the Rhine end in Europe?", "--index", str(index_path), "--json", "--top_k", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["retrieved"][0]["title"] == "Rhine" and len(printed["retrieved"]) == 2
    assert printed["answer"] == result.answer and (result.answer in result.passage.text or not result.answered)
    with pytest.raises(DataError, match="too long"):
        run_ask.main([str(model_dir), "Rhine " * 300, "--index", str(index_path)])
    # The threshold stored with the model decides, with no extra argument: below every margin it answers.
    from trm.reading.grounded import GroundedSettings

    GroundedSettings(no_answer_threshold=result.margin - 1000.0).save(model_dir)
    assert run_ask.main([str(model_dir), "Where does the Rhine end in Europe?", "--index", str(index_path), "--top_k", "2"]).answered
    GroundedSettings(no_answer_threshold=result.margin + 1000.0).save(model_dir)
    assert not run_ask.main([str(model_dir), "Where does the Rhine end in Europe?", "--index", str(index_path), "--top_k", "2"]).answered


def test_the_default_corpus_is_the_phase1_recipe_corpus(tmp_path):
    result = run_index.main(["--recipe", "recipes/quickstart_phase1.yaml", "--index", str(tmp_path / "index.sqlite")])
    indexed = result["files"][0]
    assert indexed["source"].endswith("wiki_sample.jsonl.gz") and indexed["passages"] > 1000
    index = PassageIndex(tmp_path / "index.sqlite")
    assert index.search("Alabama gubernatorial election 1942", 1)[0].title == "1942 Alabama gubernatorial election"


def test_the_default_hub_corpus_is_indexed_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    pages = [{"id": "1", "url": "u", "title": "Rhine", "text": "The Rhine is a river. It ends in the North Sea."}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: datasets.Dataset.from_list(pages))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  dataset_name: wikimedia/wikipedia\n  dataset_config_name: 20231101.simple\n")
    index_path = tmp_path / "index.sqlite"
    result = run_index.main(["--recipe", str(recipe), "--index", str(index_path)])["files"][0]
    assert result["source"] == "hub:wikimedia/wikipedia/20231101.simple" and result["passages"] == 1
    assert run_index.main(["--recipe", str(recipe), "--index", str(index_path)])["files"][0]["status"] == "unchanged, skipped"
    assert PassageIndex(index_path).search("Where does the Rhine end?", 1)[0].title == "Rhine"
    recipe.write_text("data:\n  max_train_tokens: 5\n")
    with pytest.raises(DataError, match="names no corpus"):
        run_index.main(["--recipe", str(recipe), "--index", str(index_path)])
