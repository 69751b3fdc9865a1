"""BLiMP (Warstadt et al., 2020): does the model prefer the grammatical sentence of each minimal pair?

Design decisions:
- Scored the standard way: a pair is right when the grammatical sentence gets the higher total
  log-probability, every token scored after a leading `<|endoftext|>` (as lm-evaluation-harness does for
  GPT-2); a tie counts as wrong. The headline is the mean over paradigms, as published (5-gram 61.2,
  GPT-2 124M 81.5); each field (morphology, syntax, semantics, syntax_semantics) is the mean of its paradigms.
- Read from the authors' release (one `*.jsonl` file per paradigm, as `../shared/data/blimp/` holds it) or
  the Hub (`hub` = `nyu-mll/blimp`, one config per paradigm). A line without both sentences is counted and
  skipped; a missing directory or one without paradigm files is one sentence.
- `pairs_per_paradigm` samples the same seeded pairs of each paradigm every time, for a quick estimate.
- Batched for speed: sentences sorted by length into padded batches, and the vocabulary projection is
  applied only at real token positions, in chunks, so the batch x length x 50,257 logits never exist at once.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from data.files import DataError, SkipCounter, read_records
from data.hub import HubSource, first_row, load_hub_dataset

BLIMP_HUB = "nyu-mll/blimp"


def _paradigm_rows(source: str, skipped: SkipCounter):
    """(paradigm, rows) for each paradigm of a directory of `*.jsonl` files or of the Hub's `nyu-mll/blimp`."""
    if source == "hub":
        from datasets import get_dataset_config_names

        try:
            configs = get_dataset_config_names(BLIMP_HUB)
        except Exception as error:  # network and Hub failures come in many types
            raise DataError(f"could not list the paradigms of {BLIMP_HUB} on the Hub ({error}); give the directory of its *.jsonl files.") from None
        for config in configs:
            yield config, load_hub_dataset(HubSource(BLIMP_HUB, config), "train", "give the directory of its *.jsonl files")
        return
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory of BLiMP paradigm files (*.jsonl).")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise DataError(f"{folder}: holds no BLiMP paradigm files (*.jsonl).")
    for path in files:
        yield path.stem, read_records(path, skipped)


def check_blimp_source(source: str) -> None:
    """The preflight's check: the directory holds paradigm files, or the Hub lists and serves the paradigms."""
    if source != "hub":
        next(_paradigm_rows(source, SkipCounter()))
        return
    from datasets import get_dataset_config_names

    try:
        first = get_dataset_config_names(BLIMP_HUB)[0]
    except Exception as error:  # network and Hub failures come in many types
        raise DataError(f"could not list the paradigms of {BLIMP_HUB} on the Hub ({error}); give the directory of its *.jsonl files.") from None
    first_row(HubSource(BLIMP_HUB, first, columns=("sentence_good", "sentence_bad")), "train", "give the directory of its *.jsonl files")


def read_blimp(source: str, pairs_per_paradigm: int | None = None, seed: int = 0) -> tuple[list[dict], SkipCounter]:
    """Minimal pairs (`good`, `bad`, `paradigm`, `field`) of every paradigm, optionally a seeded sample of each."""
    skipped = SkipCounter()
    pairs = []
    for paradigm, rows in _paradigm_rows(source, skipped):
        kept = []
        for row in rows:
            good, bad = row.get("sentence_good"), row.get("sentence_bad")
            if not (isinstance(good, str) and isinstance(bad, str) and good.strip() and bad.strip()):
                skipped["lines without sentence_good and sentence_bad"] += 1
                continue
            kept.append({"good": good.strip(), "bad": bad.strip(), "paradigm": str(row.get("UID") or paradigm),
                         "field": str(row.get("field") or "unknown").replace("/", "_")})  # both spellings occur
        if pairs_per_paradigm is not None and len(kept) > pairs_per_paradigm:
            kept = random.Random(f"{seed}:{paradigm}").sample(kept, pairs_per_paradigm)
        pairs += kept
    if not pairs:
        raise DataError(f"{source}: no BLiMP pairs found (skipped: {skipped.describe()}).")
    return pairs, skipped


@torch.inference_mode()
def sentence_log_probs(model, tokenizer, sentences: list[str], batch_size: int = 64, chunk_rows: int = 1024) -> list[float]:
    """Total log-probability of each sentence, every token predicted from `<|endoftext|>` and the tokens before it."""
    start = tokenizer.eos_token_id
    encoded = [[start] + tokenizer(text, add_special_tokens=False)["input_ids"] for text in sentences]
    limit = int(model.config.n_positions)
    encoded = [ids[:limit] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    scores = [0.0] * len(encoded)
    weight = model.get_output_embeddings().weight
    was_training = model.training
    model.eval()
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), start, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : len(encoded[index])] = torch.tensor(encoded[index])
            mask[row, : len(encoded[index])] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        scored = mask[:, 1:].bool()
        rows, targets = hidden[scored], ids[:, 1:][scored]
        owners = torch.arange(len(batch), device=ids.device)[:, None].expand_as(scored)[scored]
        totals = torch.zeros(len(batch), dtype=torch.float64, device=ids.device)
        for chunk in range(0, len(rows), chunk_rows):
            logits = (weight @ rows[chunk:chunk + chunk_rows].T).float()  # vocabulary-major: the faster layout here
            picked = logits.gather(0, targets[None, chunk:chunk + chunk_rows])[0] - torch.logsumexp(logits, dim=0)
            totals.index_add_(0, owners[chunk:chunk + chunk_rows], picked.double())
        for row, index in enumerate(batch):
            scores[index] = float(totals[row])
    model.train(was_training)
    return scores


def blimp_evaluation(model, tokenizer, source: str, pairs_per_paradigm: int | None = None, batch_size: int = 64) -> dict:
    """Accuracy (%) over paradigms, per field and per paradigm."""
    started = time.perf_counter()
    pairs, skipped = read_blimp(source, pairs_per_paradigm)
    scores = sentence_log_probs(model, tokenizer, [s for p in pairs for s in (p["good"], p["bad"])], batch_size)
    right: dict[str, list[bool]] = defaultdict(list)
    field_of: dict[str, str] = {}
    for index, pair in enumerate(pairs):
        right[pair["paradigm"]].append(scores[2 * index] > scores[2 * index + 1])
        field_of[pair["paradigm"]] = pair["field"]
    paradigms = {name: 100.0 * sum(hits) / len(hits) for name, hits in sorted(right.items())}
    fields: dict[str, list[float]] = defaultdict(list)
    for name, accuracy in paradigms.items():
        fields[field_of[name]].append(accuracy)
    return {
        "mean": sum(paradigms.values()) / len(paradigms),
        "fields": {name: sum(values) / len(values) for name, values in sorted(fields.items())},
        "paradigms": paradigms, "pairs": len(pairs), "pairs_per_paradigm": pairs_per_paradigm,
        "source": BLIMP_HUB if source == "hub" else Path(source).name, "skipped": dict(skipped),
        "seconds": round(time.perf_counter() - started, 1),
    }
