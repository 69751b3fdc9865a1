"""Reading local data files in their original formats, with every skipped record counted.

Design decisions:
- One reader for all phases: `.txt`, `.jsonl`, `.json` and `.parquet`, each optionally compressed
  (`.gz`, `.xz`, `.bz2`, `.zst`), chosen by file suffix. Records come out as dicts, so the phase-1 and
  phase-2 loaders, and the rule that refuses instruction data in phase 1, all look at the same thing.
- Text is read line by line as bytes and decoded strictly: a line that is not UTF-8 or a JSON line that
  does not parse is skipped and counted in a `SkipCounter` (never silently lost, never a crash halfway
  through a long file). A missing, empty or unreadable file is a one-sentence error.
- `.txt` holds one document per line, or documents separated by blank lines; `auto` picks the second
  when the start of the file contains a blank line.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

COMPRESSIONS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
FORMATS = (".txt", ".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Bad input data, reported to the user in one sentence."""


class SkipCounter(Counter):
    """Counts skipped or altered records by reason, for the run's data report."""

    def describe(self) -> str:
        return ", ".join(f"{count:,} {reason}" for reason, count in sorted(self.items())) or "nothing"


def is_text(value: str) -> bool:
    """False for a str holding lone surrogates: undecodable bytes of an argument, or a JSON "\\ud800" escape."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def checked_text(value: str, source: str) -> str:
    """User text (an argument, a line of stdin, a request) refused in one sentence when it is not valid UTF-8."""
    if not is_text(value):
        raise DataError(f"{source} is not valid UTF-8 text; check its encoding.")
    return value


def split_suffix(path: Path) -> tuple[str, str | None]:
    """Return (format suffix, compression suffix or None), e.g. ('.jsonl', '.xz')."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and (suffixes[-1] in COMPRESSIONS or suffixes[-1] == ".zst") else None
    data_format = suffixes[-1] if suffixes else ""
    if data_format not in FORMATS:
        raise DataError(
            f"{path}: unsupported file type {''.join(path.suffixes) or '(none)'}; "
            f"use one of {', '.join(FORMATS)}, optionally compressed as .gz, .xz, .bz2 or .zst."
        )
    return data_format, compression


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a possibly compressed file for reading bytes, with a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    _, compression = split_suffix(path)
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    opener = COMPRESSIONS.get(compression, open)
    return opener(path, "rb")


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (any suffix; .gz/.xz/.bz2 are decompressed) as one string, e.g. a passage."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    opener = COMPRESSIONS.get(path.suffix.lower(), open)
    with damaged_file_errors(path), opener(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 at byte {error.start}.") from None
    if not text.strip():
        raise DataError(f"{path}: empty file.")
    return text


def _decoded_lines(path: Path, skipped: SkipCounter) -> Iterator[str]:
    with open_binary(path) as handle:
        for raw in handle:
            if b"\0" in raw:  # text never holds NUL bytes; binary data often decodes as UTF-8 in places
                skipped["lines with NUL bytes (binary data)"] += 1
                continue
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                skipped["lines that are not valid UTF-8"] += 1


def _text_documents(path: Path, sample_by: str, skipped: SkipCounter) -> Iterator[dict]:
    if sample_by == "auto":
        head = []
        for line in _decoded_lines(path, SkipCounter()):
            head.append(line)
            if len(head) >= 2000:
                break
        sample_by = "paragraph" if any(not line.strip() for line in head[1:-1]) else "line"
    if sample_by == "line":
        for line in _decoded_lines(path, skipped):
            if line.strip():
                yield {"text": line}
        return
    if sample_by != "paragraph":
        raise DataError(f"text_sample_by must be auto, line or paragraph, got {sample_by!r}.")
    paragraph: list[str] = []
    for line in _decoded_lines(path, skipped):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield {"text": "\n".join(paragraph)}


def _json_lines(path: Path, skipped: SkipCounter) -> Iterator[dict]:
    for line in _decoded_lines(path, skipped):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped["JSON lines that do not parse"] += 1
            continue
        if isinstance(record, dict):
            yield record
        else:
            skipped["JSON lines that are not objects"] += 1


@contextmanager
def damaged_file_errors(path: Path):
    """A file that cannot be decoded as a whole (a truncated or corrupt archive, bytes that are not what the
    suffix says) becomes one `DataError` naming it, raised where the damage is found."""
    compression = path.suffix.lower() if path.suffix.lower() in (*COMPRESSIONS, ".zst") else None
    kind = f"{compression} archive" if compression else "file"
    try:
        yield
    except Exception as error:  # pyarrow and zstandard raise their own types for damaged files
        ours = isinstance(error, (EOFError, OSError, lzma.LZMAError, zlib.error))
        if not ours and type(error).__module__.split(".")[0] not in ("pyarrow", "zstandard", "zstd"):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: not a readable {kind}, truncated or corrupt ({reason}).") from None


def load_json_document(path: str | Path):
    """Parse a whole `.json` file (e.g. SQuAD's nested layout), with a clear error when it is not JSON."""
    path = Path(path)
    with damaged_file_errors(path), open_binary(path) as handle:
        payload = handle.read()
    try:
        return json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 at byte {error.start}.") from None
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and error.lineno > 1 and error.colno == 1:
            raise JsonLinesInJsonFile(f"{path}: one JSON value per line (JSON lines), not one JSON document.") from None
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from None


class JsonLinesInJsonFile(DataError):
    """A `.json` file holding JSON lines, as `datasets.Dataset.to_json` writes them."""


def _json_records(path: Path, skipped: SkipCounter) -> Iterator[dict]:
    try:
        document = load_json_document(path)
    except JsonLinesInJsonFile:
        yield from _json_lines(path, skipped)
        return
    if isinstance(document, dict):
        # A single object (e.g. SQuAD's {"version", "data"}) is handed on whole for the caller to recognise.
        yield document
        return
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON list of records or an object, got {type(document).__name__}.")
    for record in document:
        if isinstance(record, dict):
            yield record
        else:
            skipped["JSON list items that are not objects"] += 1


def _parquet_records(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with open_binary(path) as handle:
        table = pq.read_table(io.BytesIO(handle.read()))
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError as error:  # parquet's checksums are optional: damaged strings surface only here
        raise DataError(f"{path}: a text column holds bytes that are not UTF-8 (at byte {error.start}): the file is corrupt.") from None
    yield from rows


def read_records(path: str | Path, skipped: SkipCounter, text_sample_by: str = "auto") -> Iterator[dict]:
    """Yield the records of a local data file as dicts; skipped lines are counted in `skipped`."""
    path = Path(path)
    data_format, _ = split_suffix(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a data file.")
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    readers = {".txt": lambda: _text_documents(path, text_sample_by, skipped), ".jsonl": lambda: _json_lines(path, skipped),
               ".json": lambda: _json_records(path, skipped), ".parquet": lambda: _parquet_records(path)}
    with damaged_file_errors(path):
        yield from readers[data_format]()
