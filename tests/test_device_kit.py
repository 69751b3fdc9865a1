"""The GPU lease's kit: it carries every shared file the full-length benchmark reads, in the shared layout, and
refuses a shared folder that lacks one."""

import sys
import tarfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import each other as scripts do

from device_kit import DATA_FILES, pack_data  # noqa: E402
from phase2_levers import evaluation_command, source_arguments  # noqa: E402
from shared_data_splits import ALPACA_FILES  # noqa: E402


def test_the_kit_carries_every_shared_file_the_phase2_runs_and_their_evaluations_read():
    shared = Path("SHARED")
    arguments = [*source_arguments(shared, "alpaca.json"), *evaluation_command(Path("run"), shared, "free", 10)]
    read = {Path(argument).relative_to(shared).as_posix() for argument in arguments if argument.startswith("SHARED/")}
    read |= {f"instructions/{name}.alpaca.json" for name in ALPACA_FILES}  # merged on the device by shared_data_splits
    assert read and read <= set(DATA_FILES)


def test_the_data_keep_the_shared_layout_and_a_missing_file_is_named(tmp_path):
    shared = tmp_path / "shared"
    for name in DATA_FILES:
        path = shared / name / "adjunct_island.jsonl" if name == "blimp" else shared / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    pack_data(shared, tmp_path / "data.tar.xz")
    with tarfile.open(tmp_path / "data.tar.xz") as tar:
        members = {member.name for member in tar.getmembers() if member.isfile()}
    assert members == {name for name in DATA_FILES if name != "blimp"} | {"blimp/adjunct_island.jsonl"}
    (shared / "squad" / "unseen-v2.0.json").unlink()
    with pytest.raises(SystemExit, match="lacks squad/unseen-v2.0.json: give the shared data folder"):
        pack_data(shared, tmp_path / "again.tar.xz")
    assert not (tmp_path / "again.tar.xz").exists()  # refused before anything is written
