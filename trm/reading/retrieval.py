"""Retrieval over your own corpus: passages in an SQLite FTS5 full-text index, ranked by BM25.

Design decisions:
- One SQLite file. `passages` holds each passage once (UNIQUE digest of its text), with its page title
  and the first file it came from; `passage_sources` links it to every file that holds it;
  `passage_search` is an FTS5 index over title and text kept in step by triggers (FTS5's
  external-content pattern); `sources` records each indexed file with its size and mtime.
- Incremental: a file whose size and mtime match its `sources` row is skipped; a changed file loses its
  links first, and passages no other file holds are deleted. A passage already present (from any file)
  is linked, not added again.
- Versioned: `PRAGMA user_version` records `PASSAGES_VERSION`, the cleaning and cutting the passages were made
  with. Opening an older index to build it marks every file changed, so each is read again when it is next
  indexed; until then questions are answered from its old passages with a warning.
- Crash-safe: SQLite commits are atomic. Passages are committed in batches and the file's `sources` row
  last, so an interrupted build leaves a usable index; the next build reads the unfinished file again
  and its committed passages are recognised by their digest.
- Corpus files are read by `data.files` (the formats phase 1 reads), cleaned by `data.cleaning` and cut
  by `data.passages` into windows of whole sentences that leave room for a question and its answer.
- Queries are the question's words minus common function words, OR-ed and quoted (so no word is read
  as FTS5 syntax), ranked by BM25 with the title weighted twice the text; words are stemmed (porter).
- `ask` goes down the top-k passages in BM25 order and answers from the first one the model answers
  with grounded decoding (`trm.reading.grounded`), so an answer always comes with its source; ranking chose the
  passage better than the model's confidence across passages did (measured, see the README).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from data.cleaning import clean_text
from data.files import DataError, SkipCounter, read_records
from data.passages import question_terms, split_passages
from data.prompt_format import NO_ANSWER_REPLY
from trm.reading.grounded import GroundedSettings, answer_from_passages

logger = logging.getLogger(__name__)
PASSAGES_VERSION = 3  # bump when cleaning or cutting changes a file's passages (3: tables, footnotes, galleries, appendices dropped)
COMMIT_EVERY = 2_000
TITLE_WEIGHT, TEXT_WEIGHT = 2.0, 1.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY, digest TEXT UNIQUE NOT NULL, source TEXT NOT NULL, title TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passage_sources (
    source TEXT NOT NULL, passage_id INTEGER NOT NULL, PRIMARY KEY (source, passage_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS passage_sources_by_passage ON passage_sources(passage_id);
CREATE VIRTUAL TABLE IF NOT EXISTS passage_search USING fts5(
    title, text, content='passages', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS passages_added AFTER INSERT ON passages BEGIN
    INSERT INTO passage_search(rowid, title, text) VALUES (new.id, new.title, new.text); END;
CREATE TRIGGER IF NOT EXISTS passages_deleted AFTER DELETE ON passages BEGIN
    INSERT INTO passage_search(passage_search, rowid, title, text) VALUES ('delete', old.id, old.title, old.text); END;
CREATE TABLE IF NOT EXISTS sources (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, passages INTEGER, duplicates INTEGER, skipped TEXT);
"""


@dataclass
class Passage:
    id: int
    title: str
    text: str
    source: str
    score: float  # BM25 as FTS5 reports it: lower is better


def require_fts5() -> None:
    """Refuse, in one sentence, a Python whose sqlite3 was built without FTS5."""
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE probe USING fts5(text)")
    except sqlite3.OperationalError:
        raise DataError(f"this Python's sqlite3 (SQLite {sqlite3.sqlite_version}) has no FTS5 full-text search; "
                        "use a Python built with FTS5 (python.org and most Linux builds are).") from None


def passage_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


EXPECTED_TABLES = {"passages": {"id", "digest", "source", "title", "text"}, "passage_sources": {"source", "passage_id"},
                   "passage_search": {"title", "text"}, "sources": {"path", "size", "mtime_ns", "passages", "duplicates", "skipped"}}


@contextmanager
def index_errors(path: Path):
    """SQLite's errors as one sentence saying what happened to the index and what to do."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        text = str(error)
        if "locked" in text or "busy" in text:
            raise DataError(f"{path} is being written by another process (database is locked); wait for it to finish.") from None
        if "full" in text:
            raise DataError(f"{path}: the disk is full; free some space and run make index again (what was committed is kept).") from None
        if "no such table" in text or "no such column" in text:
            raise DataError(f"{path} was not built by this version of TRM ({text}); build a new index with make index.") from None
        if "readonly" in text or "read-only" in text:
            raise DataError(f"{path} cannot be written ({text}); check its permissions.") from None
        raise DataError(f"{path} is damaged or not a passage index ({text}); delete it and build it again with make index.") from None


class PassageIndex:
    """An FTS5 passage index in one SQLite file (see the module docstring). `read_only` (questions: `make ask`, chat
    `/ask`) opens it so that nothing can be written; another program's SQLite file is refused, never changed."""

    def __init__(self, path: str | Path, create: bool = False, read_only: bool = False):
        require_fts5()
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no passage index at {self.path}; build one with make index CORPUS=...")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with index_errors(self.path):
            self.db = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro" if read_only else str(self.path), uri=read_only, timeout=5)
            tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
            ours = {name for name in tables if name in EXPECTED_TABLES or name.startswith("passage_search_")}
            if tables - ours or (read_only and set(EXPECTED_TABLES) - tables):
                raise DataError(f"{self.path} is not a passage index (it holds the tables {', '.join(sorted(tables)) or 'none'}); "
                                "give the file make index built.")
            for table in set(EXPECTED_TABLES) & tables:
                columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                if EXPECTED_TABLES[table] - columns:
                    raise DataError(f"{self.path} was built by another version of TRM ({table} lacks "
                                    f"{', '.join(sorted(EXPECTED_TABLES[table] - columns))}); build a new index with make index.")
            built_by = self.db.execute("PRAGMA user_version").fetchone()[0]
            if not read_only:
                self.db.executescript(SCHEMA)
                if built_by < PASSAGES_VERSION:
                    self.db.execute("UPDATE sources SET size = -1")  # no file matches: each is read again
                    self.db.execute(f"PRAGMA user_version = {PASSAGES_VERSION}")
                    self.db.commit()
            elif built_by < PASSAGES_VERSION or self.db.execute("SELECT 1 FROM sources WHERE size = -1").fetchone():
                logger.warning("%s holds passages an older TRM cleaned differently; make index with the same files "
                               "reads them again.", self.path)

    def close(self) -> None:
        self.db.close()

    def __len__(self) -> int:
        with index_errors(self.path):
            return self.db.execute("SELECT count(*) FROM passages").fetchone()[0]

    def add_passages(self, passages: Iterable[tuple[str, str]], source: str) -> tuple[int, int]:
        """Add (title, text) passages from `source`; returns (added, already indexed). Commits in batches."""
        added = duplicates = 0
        for number, (title, text) in enumerate(passages, 1):
            digest = passage_digest(text)
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO passages(digest, source, title, text) VALUES (?, ?, ?, ?)", (digest, source, title, text))
            if cursor.rowcount:
                added, passage_id = added + 1, cursor.lastrowid
            else:
                duplicates += 1
                passage_id = self.db.execute("SELECT id FROM passages WHERE digest = ?", (digest,)).fetchone()[0]
            self.db.execute("INSERT OR IGNORE INTO passage_sources VALUES (?, ?)", (source, passage_id))
            if number % COMMIT_EVERY == 0:
                self.db.commit()
        self.db.commit()
        return added, duplicates

    def _forget_source(self, source: str) -> None:
        if self.db.execute("DELETE FROM passage_sources WHERE source = ?", (source,)).rowcount:
            self.db.execute("DELETE FROM passages WHERE id NOT IN (SELECT passage_id FROM passage_sources)")

    def add_file(self, path: str | Path, tokenizer, text_column: str = "text") -> dict:
        """Index one corpus file (skipped if unchanged since it was indexed); returns what happened."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: file not found.")
        stat = path.stat()
        return self.add_records(str(path.resolve()), (stat.st_size, stat.st_mtime_ns), lambda skipped: read_records(path, skipped),
                                tokenizer, text_column, default_title=path.name.split(".")[0])

    def add_records(self, source: str, version: tuple[int, int], read, tokenizer, text_column: str,
                    default_title: str) -> dict:
        """Index the records `read(skipped)` yields under `source`, unless that source is indexed at `version`."""
        with index_errors(self.path):
            return self._add_records(source, version, read, tokenizer, text_column, default_title)

    def _add_records(self, source: str, version: tuple[int, int], read, tokenizer, text_column: str,
                     default_title: str) -> dict:
        row = self.db.execute("SELECT size, mtime_ns FROM sources WHERE path = ?", (source,)).fetchone()
        if row == tuple(version):
            return {"source": source, "status": "unchanged, skipped"}
        self._forget_source(source)
        skipped = SkipCounter()
        passages = self._passages(read(skipped), tokenizer, text_column, default_title, skipped)
        added, duplicates = self.add_passages(passages, source)
        if added + duplicates == 0:
            raise DataError(f"{source}: no text to index ({skipped.describe() if skipped else 'empty'}).")
        self.db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?, ?)",
                        (source, *version, added, duplicates, json.dumps(dict(skipped))))
        self.db.commit()
        return {"source": source, "status": "indexed", "passages": added, "duplicates": duplicates, "skipped": skipped}

    @staticmethod
    def _passages(records: Iterable[dict], tokenizer, text_column: str, default_title: str,
                  skipped: SkipCounter) -> Iterator[tuple[str, str]]:
        for record in records:
            text = record.get(text_column)
            text = clean_text(text) if isinstance(text, str) else ""
            if not text:
                skipped[f"records without text in {text_column!r}"] += 1
                continue
            title = record.get("title") if isinstance(record.get("title"), str) else default_title
            for passage in split_passages(text, tokenizer):
                yield title, passage

    def passage_ids(self, texts: Iterable[str]) -> set[int]:
        """Ids of the indexed passages with exactly these texts."""
        ids = set()
        for text in texts:
            row = self.db.execute("SELECT id FROM passages WHERE digest = ?", (passage_digest(text),)).fetchone()
            if row:
                ids.add(row[0])
        return ids

    def search(self, question: str, k: int = 5) -> list[Passage]:
        """The k passages that best match the question's words by BM25 (best first); [] if it has none."""
        terms = question_terms(question)
        if not terms:
            return []
        match = " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
        with index_errors(self.path):
            rows = self.db.execute(
                f"SELECT p.id, p.title, p.text, p.source, bm25(passage_search, {TITLE_WEIGHT}, {TEXT_WEIGHT}) AS score "
                "FROM passage_search JOIN passages p ON p.id = passage_search.rowid "
                "WHERE passage_search MATCH ? ORDER BY score LIMIT ?", (match, k)).fetchall()
        return [Passage(*row) for row in rows]


@dataclass
class RetrievedAnswer:
    question: str
    answer: str          # a span of `passage`, or the no-answer reply
    answered: bool
    margin: float        # the span's score over the no-answer reply's (log-probability)
    passage: Passage | None
    candidates: list[Passage]

    def as_dict(self) -> dict:
        margin = round(self.margin, 4) if math.isfinite(self.margin) else None
        return {"question": self.question, "answer": self.answer, "answered": self.answered, "margin": margin,
                "title": self.passage and self.passage.title, "passage": self.passage and self.passage.text,
                "source": self.passage and self.passage.source,
                "retrieved": [{"title": p.title, "bm25": round(p.score, 4), "text": p.text} for p in self.candidates]}


def ask(model, tokenizer, index: PassageIndex, question: str, settings: GroundedSettings, top_k: int = 5) -> RetrievedAnswer:
    """Retrieve the top-k passages and answer from the best-ranked one the model answers (grounded); when it
    answers none, abstain and cite the top passage. BM25's ranking picks the passage better than the model's
    confidence across passages does (`benchmarks/open_domain_squad.py`), so the model only decides within one."""
    candidates = index.search(question, top_k)
    if not candidates:
        return RetrievedAnswer(question, NO_ANSWER_REPLY, False, -math.inf, None, [])
    top = None
    for passage in candidates:
        chosen = answer_from_passages(model, tokenizer, [passage.text], question, settings)
        if chosen is None:
            raise DataError(f"the question is too long for the {model.config.n_positions}-token context; ask a shorter one.")
        answer = chosen[1]
        if answer.answered:
            return RetrievedAnswer(question, answer.answer, True, answer.margin, passage, candidates)
        top = top or (passage, answer)
    passage, answer = top
    return RetrievedAnswer(question, answer.answer, False, answer.margin, passage, candidates)
