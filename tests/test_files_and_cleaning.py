import bz2
import gzip
import json
import lzma

import pytest
import zstandard

from data.cleaning import clean_text
from data.files import DataError, SkipCounter, read_records


def _records(path, **kwargs):
    skipped = SkipCounter()
    return list(read_records(path, skipped, **kwargs)), skipped


@pytest.mark.parametrize("suffix,opener", [("", open), (".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)])
def test_jsonl_in_every_compression(tmp_path, suffix, opener):
    path = tmp_path / f"d.jsonl{suffix}"
    with opener(path, "wb") as handle:
        handle.write(b'{"text": "one"}\n{"text": "two"}\n')
    records, skipped = _records(path)
    assert [r["text"] for r in records] == ["one", "two"] and not skipped


def test_zstandard(tmp_path):
    path = tmp_path / "d.txt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"first doc\nsecond doc\n"))
    records, _ = _records(path)
    assert [r["text"] for r in records] == ["first doc", "second doc"]


def test_malformed_json_lines_and_invalid_utf8_are_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": broken\n\xff\xfe{"text": "bad bytes"}\n[1, 2]\n{"text": "also good"}\n')
    records, skipped = _records(path)
    assert [r["text"] for r in records] == ["good", "also good"]
    assert skipped == {"JSON lines that do not parse": 1, "lines that are not valid UTF-8": 1, "JSON lines that are not objects": 1}


def test_text_layouts(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("doc one\ndoc two\ndoc three\n")
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("doc one line a\nline b\n\ndoc two\n\n\ndoc three\n")
    assert [r["text"] for r in _records(lines)[0]] == ["doc one", "doc two", "doc three"]
    assert [r["text"] for r in _records(paragraphs)[0]] == ["doc one line a\nline b", "doc two", "doc three"]


def test_json_list_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    listing = tmp_path / "d.json"
    listing.write_text(json.dumps([{"text": "a"}, "not a record", {"text": "b"}]))
    records, skipped = _records(listing)
    assert [r["text"] for r in records] == ["a", "b"] and skipped == {"JSON list items that are not objects": 1}
    table = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x", "y"]}), table)
    assert [r["text"] for r in _records(table)[0]] == ["x", "y"]


def test_bad_files_get_one_clear_sentence(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        _records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "d.csv").write_text("a,b")
        _records(tmp_path / "d.csv")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [')
    with pytest.raises(DataError, match="not valid JSON"):
        _records(broken)


def test_cleaning_removes_wiki_leftovers():
    raw = (
        "Sunset_over_the_bay.jpg\n\nThe 1942 ALABAMA GUBERNATORIAL ELECTION took place in 1942.[1] It was the _de facto_ "
        "contest.[citation needed]\n\n-   W.O. Broyle\n-   H.J. Carwile {{cite web|url=x}} }}\n\nReferences\n\n"
        "External links\n\n1942 gubernatorial Category:1942 elections Category:November 1942 events\n\n[1]\n\n[2]"
    )
    cleaned = clean_text(raw)
    assert cleaned == (
        "The 1942 Alabama Gubernatorial Election took place in 1942. It was the de facto contest. "
        "W.O. Broyle H.J. Carwile"
    )
    assert "\n" not in clean_text("line one\nline two\n\nline three") and clean_text("NASA is big") == "NASA is big"


def test_cleaning_keeps_the_text_of_a_page_written_on_one_line():
    one_line = "Paris is the capital of France. It has many museums. See also Category:Capitals in Europe."
    assert clean_text(one_line) == "Paris is the capital of France. It has many museums. See also"


def test_cleaning_drops_tables_footnotes_and_appendices():
    raw = (
        "Bawaka is a village in Cameroon.[1]\n\nPopulation\n\n"
        "+--------+------------+\n| Year   | People     |\n+========+============+\n| 1967   | 420        |\n"
        "+--------+------------+\n\n"
        "  Year   Title\n  ------ ---------------\n  1963   Uncle Vanya\n  1965   Othello\n\n"
        "{| class=\"wikitable\"\n|-\n| 2005 || 1804\n|}\n\n"
        "In 2005, 1804 people were counted there.\n\n"
        "File:Bawaka market.jpg|The market File:Bawaka school.jpg|The school\n\n"
        "[1] Census of Cameroon, 2005, page 12.\n\n"
        "Related pages\n\n-   Adamawa Region\n\nOther websites\n\n-   Official site of the commune\n"
    )
    assert clean_text(raw) == "Bawaka is a village in Cameroon. Population In 2005, 1804 people were counted there."


def test_cleaning_keeps_prose_around_a_horizontal_rule_and_is_linear_in_lines():
    assert clean_text("Intro sentence.\n------\nBody sentence.") == "Intro sentence. Body sentence."
    assert clean_text("A heading.\n" + "-- --\nrow\n" * 50_000 + "\nThe end.") == "The end."
