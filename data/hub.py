"""Loading datasets from the Hugging Face Hub, with one sentence that names the cause when it fails.

Design decisions:
- Every Hub source of the recipes is listed here once (`HUB_SOURCES`): repository, config, revision, the
  split used for training and the one used for evaluation, and the columns its loader needs. DailyDialog's
  main branch is still a loading-script repository, which `datasets` >= 4 refuses; the Hub's own parquet
  export of it (revision `refs/convert/parquet`, columns `dialog`, `act`, `emotion`) is loaded instead.
- Failures are classified from what `datasets` and `huggingface_hub` raise: a repository that does not exist
  (or is private or gated), a loading-script repository, a split that is missing, or a Hub that cannot be
  reached. Only the last speaks of being offline; each names the local-file alternative.
- `first_row` opens a source in streaming mode, so a preflight reads one row of each source in seconds
  instead of downloading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.files import DataError


@dataclass(frozen=True)
class HubSource:
    name: str
    config: str | None = None
    revision: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    columns: tuple[str, ...] = ()

    def describe(self, split: str) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.name}{at}" + (f" ({self.config})" if self.config else "") + f", split {split}"


HUB_SOURCES = {
    "alpaca": HubSource("tatsu-lab/alpaca", columns=("instruction", "input", "output")),
    "squad": HubSource("rajpurkar/squad", columns=("context", "question", "answers")),
    "squad_v2": HubSource("rajpurkar/squad_v2", columns=("context", "question", "answers")),
    "dailydialog": HubSource("li2017dailydialog/daily_dialog", revision="refs/convert/parquet", columns=("dialog",)),
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_unreachable(error: BaseException) -> bool:
    """True for network failures: no connection, a timeout, DNS, offline mode."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        name = type(error).__name__
        if any(word in name for word in ("Connect", "Timeout", "Offline", "LocalEntryNotFound")) or isinstance(error, (ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def explain_hub_error(source: HubSource, split: str, error: BaseException, local_hint: str) -> str:
    """One sentence naming why `source` could not be loaded."""
    what = source.describe(split)
    message = str(error)
    if "scripts are no longer supported" in message or "trust_remote_code" in message:
        return (f"could not load {what}: it is a loading-script repository, which datasets >= 4 no longer runs; "
                f"load a revision of it that holds data files (e.g. refs/convert/parquet), or {local_hint}.")
    if type(error).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError") or "doesn't exist on the Hub" in message:
        return (f"could not load {what}: the repository does not exist on the Hub or cannot be accessed "
                f"(a private or gated one needs `hf auth login`); check the name, or {local_hint}.")
    if "Unknown split" in message or "Bad split" in message or type(error).__name__ == "ExpectedMoreSplitsError":
        return f"could not load {what}: the dataset has no such split ({_first_line(error)})."
    if _is_unreachable(error):
        return f"could not load {what}: the Hugging Face Hub cannot be reached ({_first_line(error)}); offline, {local_hint}."
    return f"could not load {what} from the Hugging Face Hub ({_first_line(error)}); {local_hint}."


def load_hub_dataset(source: HubSource, split: str, local_hint: str, streaming: bool = False):
    """`datasets.load_dataset` of a Hub source; any failure becomes one `DataError` sentence."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.name, source.config, split=split, revision=source.revision, streaming=streaming)
    except Exception as error:  # the datasets library raises many types for Hub failures
        raise DataError(explain_hub_error(source, split, error, local_hint)) from None
    names = dataset.column_names or []
    missing = [column for column in source.columns if names and column not in names]
    if missing:
        raise DataError(f"{source.describe(split)} has no column {', '.join(map(repr, missing))} (it has {names}).")
    return dataset


def first_row(source: HubSource, split: str, local_hint: str) -> dict:
    """The first row of a Hub source, streamed: the preflight's check that it loads and has the columns it needs."""
    dataset = load_hub_dataset(source, split, local_hint, streaming=True)
    try:
        row = next(iter(dataset), None)
    except Exception as error:
        raise DataError(explain_hub_error(source, split, error, local_hint)) from None
    if row is None:
        raise DataError(f"{source.describe(split)} is empty.")
    missing = [column for column in source.columns if column not in row]
    if missing:
        raise DataError(f"{source.describe(split)} has no column {', '.join(map(repr, missing))} (it has {sorted(row)}).")
    return row
