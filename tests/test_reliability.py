"""Damaged and hostile input: every file either yields records (the rest counted as skipped) or one DataError."""

import bz2
import gzip
import io
import json
import lzma
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import run_chat
import run_eval
from data.files import DataError, SkipCounter, read_records
from data.instruction_sources import load_source

SUFFIXES = [f + c for f in (".txt", ".jsonl", ".json", ".parquet") for c in ("", ".gz", ".xz", ".bz2", ".zst")]
COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _valid_bytes(file_format: str) -> bytes:
    records = [{"title": "t", "text": "The river flows north."}, {"title": "u", "text": "Paris is in France."}]
    if file_format == ".txt":
        return b"The river flows north.\nParis is in France.\n"
    if file_format == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    if file_format == ".json":
        return json.dumps(records).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), sink)
    return sink.getvalue()


def _consume(path: Path) -> int:
    skipped = SkipCounter()
    try:
        return len(list(read_records(path, skipped)))
    except DataError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
        return -1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from(SUFFIXES), cut=st.floats(0.0, 1.0), noise=st.binary(max_size=64), mode=st.sampled_from(["truncate", "garbage", "flip"]))
def test_damaged_files_of_every_format_give_records_or_one_sentence(tmp_path, suffix, cut, noise, mode):
    file_format, compression = (suffix[: suffix.rfind(".")], suffix[suffix.rfind("."):]) if suffix.count(".") == 2 else (suffix, "")
    compress = _zstd if compression == ".zst" else COMPRESS[compression]
    data = compress(_valid_bytes(file_format))
    if mode == "truncate":
        data = data[: int(len(data) * cut)]
    elif mode == "garbage":
        data = noise
    else:
        position = int((len(data) - 1) * cut)
        data = data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]
    path = tmp_path / f"sample{suffix}"
    path.write_bytes(data)
    _consume(path)  # no exception other than DataError escapes
    for source in ("alpaca", "squad", "dailydialog", "chat"):
        try:
            list(load_source(source, str(path), SkipCounter()))
        except DataError:
            pass


def test_each_kind_of_damage_is_named(tmp_path):
    truncated = tmp_path / "wiki.jsonl.xz"
    truncated.write_bytes(lzma.compress(_valid_bytes(".jsonl") * 50)[:40])
    with pytest.raises(DataError, match=r"wiki.jsonl.xz: not a readable .xz archive, truncated or corrupt"):
        list(read_records(truncated, SkipCounter()))
    not_xz = tmp_path / "plain.txt.xz"
    not_xz.write_bytes(b"just some text\n")
    with pytest.raises(DataError, match="not a readable .xz archive"):
        list(read_records(not_xz, SkipCounter()))
    bad_crc = tmp_path / "wiki.txt.gz"
    data = bytearray(gzip.compress(b"hello world\n" * 10))
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    bad_crc.write_bytes(bytes(data))
    with pytest.raises(DataError, match="wiki.txt.gz: not a readable .gz archive"):
        list(read_records(bad_crc, SkipCounter()))
    garbage = tmp_path / "table.parquet"
    garbage.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="table.parquet: not a readable file"):
        list(read_records(garbage, SkipCounter()))
    folder = tmp_path / "x.txt"
    folder.mkdir()
    with pytest.raises(DataError, match="a directory, not a data file"):
        list(read_records(folder, SkipCounter()))


def test_damaged_model_directories_are_one_sentence(model_dir, tmp_path):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DataError, match="not a readable model directory"):
        run_eval.main([str(model_dir)])
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable model directory"):
        run_chat.main([str(model_dir), "--prompt", "hi"])


def test_a_model_directory_never_runs_its_code_and_must_be_a_whole_gpt2_with_gpt2s_tokenizer(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from trm.generation import load_model

    custom = tmp_path / "custom"
    shutil.copytree(model_dir, custom)
    marker = tmp_path / "code-ran"
    (custom / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((custom / "config.json").read_text())
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    model, _ = load_model(custom)  # a GPT-2 config: transformers' own class, the directory's code ignored
    assert type(model).__name__ == "GPT2LMHeadModel" and not marker.exists()
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "evil", "auto_map": auto_map}))
    with pytest.raises(DataError, match="not a readable model directory"):  # refused, not asked on stdin
        load_model(custom)
    assert not marker.exists()

    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    tensors = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "wte" in k}, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match="lacks .* of the model's tensors"):
        load_model(partial)

    foreign = tmp_path / "foreign"
    shutil.copytree(model_dir, foreign)
    tokenizer = json.loads((foreign / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = dict(list(tokenizer["model"]["vocab"].items())[:1000])
    tokenizer["model"]["merges"] = []
    (foreign / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DataError, match="tokenizer is not GPT-2's"):
        load_model(foreign)


def test_a_grounding_file_with_wrong_types_is_one_sentence(model_dir):
    from trm.reading.grounded import GroundedSettings

    (model_dir / "grounding.json").write_text(json.dumps({"no_answer_threshold": "high"}))
    with pytest.raises(DataError, match="no_answer_threshold must be a number"):
        GroundedSettings.for_model(model_dir)
    (model_dir / "grounding.json").write_text(json.dumps({"allow_no_answer": 1}))
    with pytest.raises(DataError, match="allow_no_answer must be true or false"):
        GroundedSettings.for_model(model_dir)
    (model_dir / "grounding.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        GroundedSettings.for_model(model_dir)
    (model_dir / "grounding.json").write_text(json.dumps({"no_answer_threshold": -2.5, "max_answer_tokens": 12}))
    assert GroundedSettings.for_model(model_dir).no_answer_threshold == -2.5


def test_chat_refuses_impossible_reply_lengths(model_dir):
    from trm.recipe import RecipeError

    for value in ("0", "-5", "300"):
        with pytest.raises(RecipeError, match="max_new_tokens"):
            run_chat.main([str(model_dir), "--prompt", "hi", "--max_new_tokens", value])


def test_long_instructions_in_evaluation_are_counted_not_crashed(model_dir, tmp_path):
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("Say hi.\n" + "word " * 300 + "\n")
    report = run_eval.main([str(model_dir), "--instructions_file", str(instructions), "--max_new_tokens", "8"])
    assert report["instructions"]["instructions"] == 1 and report["instructions"]["too_long_for_the_context"] == 1
    from trm.recipe import RecipeError

    with pytest.raises(RecipeError, match="below the model's context"):
        run_eval.main([str(model_dir), "--max_new_tokens", "64"])


def test_a_one_shot_prompt_too_long_for_the_context_is_an_error(model_dir):
    with pytest.raises(DataError, match="too long for the 64-token context"):
        run_chat.main([str(model_dir), "--prompt", "word " * 100, "--max_new_tokens", "8"])


def test_a_block_size_beyond_the_context_is_refused_before_data_preparation(tmp_path, wiki_jsonl, tiny_config_path):
    import run_clm
    from conftest import write_recipe
    from trm.rules import RuleViolation

    recipe = write_recipe(tmp_path / "phase1.yaml", {
        "model": {"config_name": str(tiny_config_path)},
        "data": {"train_file": [str(wiki_jsonl)], "block_size": 1024, "data_cache_dir": str(tmp_path / "cache")},
        "training": {"output_dir": str(tmp_path / "out"), "use_cpu": True, "max_steps": 2, "report_to": []},
    })
    with pytest.raises(RuleViolation, match="block_size 1024 exceeds the model's context 64"):
        run_clm.main([str(recipe)])
    assert not (tmp_path / "cache").exists()
    for text in ('{"n_layer": 2,', "[1, 2]"):  # malformed JSON; JSON that is no object of config keys
        (tmp_path / "broken.json").write_text(text)
        with pytest.raises(DataError, match="broken.json is not a GPT2Config JSON object"):
            run_clm.main([str(recipe), "--config_name", str(tmp_path / "broken.json"), "--block_size", "32"])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_make_push_uploads_the_model_and_never_the_pickled_training_state():
    from huggingface_hub.utils import filter_repo_objects

    from trm.sharing.hub import LOCAL_ONLY

    files = ["config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.png", "grounding.json",
             "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "notes.tmp", ".lock",
             "run_settings.json", "log.csv", "checkpoint-40/model.safetensors", "runs/events.out", ".tmp-final-7/x"]
    uploaded = set(filter_repo_objects(files, ignore_patterns=LOCAL_ONLY))
    assert uploaded == {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.png", "grounding.json"}


def _run(*command, stdin: bytes = b""):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *command], input=stdin, capture_output=True, cwd=Path(__file__).resolve().parent.parent)


def test_undecodable_text_from_stdin_arguments_and_files_is_one_sentence(model_dir, tmp_path):
    chat = _run("run_chat.py", str(model_dir), "--max_new_tokens", "4", stdin=b"hello\n\xff\xfe broken\nagain\n")
    assert chat.returncode == 0 and b"not valid UTF-8 text; skipped" in chat.stdout and chat.stdout.count(b"assistant>") == 2
    prompt = _run("run_chat.py", str(model_dir), "--max_new_tokens", "4", "--prompt", b"caf\xe9")  # Latin-1 bytes
    assert prompt.returncode == 2 and prompt.stderr.strip().endswith(b"--prompt is not valid UTF-8 text; check its encoding.")
    import run_ask

    with pytest.raises(DataError, match="the question is not valid UTF-8"):
        run_ask.main([str(model_dir), "caf\udce9", "--index", str(tmp_path / "none.sqlite")])
    instructions = tmp_path / "instructions.txt"
    instructions.write_bytes(b"Name a colour.\n\xff\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        run_eval.main([str(model_dir), "--instructions_file", str(instructions)])
    squad = tmp_path / "squad.json"
    squad.write_text('{"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Bad \\ud800 text.", "qas": '
                     '[{"id": "1", "question": "What?", "answers": [{"text": "Bad", "answer_start": 0}]}]}]}]}')
    skipped = SkipCounter()
    assert list(load_source("squad", str(squad), skipped)) == []
    assert skipped == {"questions holding text that is not valid Unicode": 1}


def test_a_long_passage_in_the_chat_is_refused_with_its_limit_and_the_chat_goes_on(model_dir):
    chat = _run("run_chat.py", str(model_dir), "--max_new_tokens", "4", stdin=b"/passage " + b"word " * 20_000 + b"\nhello\n")
    assert chat.returncode == 0 and b"a passage may hold at most 20,000" in chat.stdout and b"assistant>" in chat.stdout


def test_index_errors_are_one_sentence_and_a_foreign_database_is_never_written(model_dir, tmp_path):
    import hashlib
    import sqlite3

    import run_ask
    import run_index

    foreign = tmp_path / "app.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="not a passage index .*invoices"):
        run_ask.main([str(model_dir), "Where is the river?", "--index", str(foreign)])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The river flows through the old town and the bridge crosses it.\n")
    with pytest.raises(DataError, match="not a passage index"):
        run_index.main(["--corpus", str(corpus), "--index", str(foreign)])
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before

    index = tmp_path / "index.sqlite"
    run_index.main(["--corpus", str(corpus), "--index", str(index)])
    damaged = bytearray(index.read_bytes())
    damaged[4096:] = b"\x00" * (len(damaged) - 4096)  # every page after the first wiped
    index.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="damaged|not a passage index"):
        run_ask.main([str(model_dir), "Where is the river?", "--index", str(index)])
    chat = _run("run_chat.py", str(model_dir), "--max_new_tokens", "4", "--index", str(index), stdin=b"/ask Where is the river?\nhello\n")
    assert chat.returncode == 0 and b"Traceback" not in chat.stderr and b"assistant>" in chat.stdout

    locked = tmp_path / "locked.sqlite"
    run_index.main(["--corpus", str(corpus), "--index", str(locked)])
    holder = sqlite3.connect(locked)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DataError, match="being written by another process"):
            run_index.main(["--corpus", str(tmp_path / "app.sqlite"), "--index", str(locked)])
    finally:
        holder.rollback()
        holder.close()


def test_make_ask_passes_the_question_verbatim():
    import shlex
    import subprocess

    question = "What costs $5 `id` and $(shell id) in it's \"quotes\"?"
    dry = subprocess.run(["make", "-n", "ask", f"QUESTION={question}"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    line = next(line for line in dry.stdout.splitlines() if "run_ask.py" in line)
    assert shlex.split(line)[3] == question
