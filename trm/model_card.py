"""The model card (README.md) of every model directory, built with `huggingface_hub.ModelCardData`.

Design decisions:
- The license follows the data the weights were trained on, phase 1's included: Wikipedia is share-alike
  (CC BY-SA), SQuAD too, Alpaca is non-commercial (CC BY-NC), DailyDialog both (CC BY-NC-SA). The card
  carries the combination of all their terms and says in words when that makes the model non-commercial.
  Text from local files of unknown origin gives `license: other`, with a line asking the owner to choose.
- `datasets` lists the Hub ids of the sources (a local file of a known source counts as that source);
  phase 2 inherits phase 1's. `base_model` is set when the phase-1 model's Hub id is known (`--base_model_id`).
  Local paths never appear in a card.
- Results go into `model-index`: validation loss at the end of training, and what `run_eval.py` measures
  later, merged into the same card (a result for the same dataset and metric is replaced). A card its owner made
  read-only is left as it is, even for root, who could replace it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

DATASET_TERMS = {  # Hub id -> the restrictions of its license
    "wikimedia/wikipedia": ("cc-by-sa-3.0", {"share-alike"}),
    "tatsu-lab/alpaca": ("cc-by-nc-4.0", {"non-commercial"}),
    "rajpurkar/squad": ("cc-by-sa-4.0", {"share-alike"}),
    "rajpurkar/squad_v2": ("cc-by-sa-4.0", {"share-alike"}),
    "li2017dailydialog/daily_dialog": ("cc-by-nc-sa-4.0", {"non-commercial", "share-alike"}),
}
LICENSE_FOR_TERMS = {
    frozenset(): "cc-by-4.0",
    frozenset({"share-alike"}): "cc-by-sa-4.0",
    frozenset({"non-commercial"}): "cc-by-nc-4.0",
    frozenset({"non-commercial", "share-alike"}): "cc-by-nc-sa-4.0",
}


def license_for(datasets: list[str], unknown_sources: bool) -> tuple[str, str]:
    """(license id, one sentence on why) for weights trained on `datasets` (+ local text of unknown origin)."""
    if unknown_sources:
        return "other", ("Trained on local text of unknown origin: its owner must choose the license its terms allow"
                         + (f" (the other data: {', '.join(datasets)})." if datasets else "."))
    terms = frozenset().union(*(DATASET_TERMS[name][1] for name in datasets if name in DATASET_TERMS))
    sources = ", ".join(f"{name} ({DATASET_TERMS[name][0]})" for name in datasets if name in DATASET_TERMS)
    chosen = LICENSE_FOR_TERMS[terms]
    why = f"The license combines the terms of the training data: {sources or 'none known'}."
    if "non-commercial" in terms:
        why += " Because of them, this model may not be used commercially."
    return chosen, why


def build_card(title: str, description: str, facts: dict, datasets: list[str], unknown_sources: bool,
               results: list[EvalResult], from_scratch: bool, base_model: str | None = None) -> ModelCard:
    license_id, license_note = license_for(datasets, unknown_sources)
    data = ModelCardData(
        language="en", license=license_id, library_name="transformers", pipeline_tag="text-generation",
        tags=["gpt2", "trm", "text-generation"] + (["trained-from-scratch"] if from_scratch else []),
        datasets=datasets or None, base_model=base_model, model_name=title, eval_results=results or None,
    )
    body = [f"# {title}", "", description, "", license_note, "", "| | |", "|---|---|"]
    body += [f"| {key} | {value} |" for key, value in facts.items()]
    body += ["", "![loss curve](loss_curve.png)", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))


def write_card(card: ModelCard, path: Path) -> None:
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, path)


def base_model_datasets(model_dir: str | Path) -> tuple[list[str], bool]:
    """The datasets (and whether unknown local text) recorded in a model directory's card."""
    path = Path(model_dir) / "README.md"
    if not path.is_file():
        return [], True
    data = ModelCard.load(path).data
    return list(data.datasets or []), data.license == "other"


def add_results(model_dir: str | Path, results: list[EvalResult]) -> bool:
    """Merge evaluation results into the card of `model_dir`; False when it has no card to add them to; a
    PermissionError when the card is read-only."""
    path = Path(model_dir) / "README.md"
    if not path.is_file() or not results:
        return False
    if not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(errno.EACCES, "the model card is read-only", str(path))
    card = ModelCard.load(path)
    def key(result):
        return result.dataset_type, result.dataset_split, result.metric_type, result.metric_name

    new_keys = {key(r) for r in results}
    kept = [r for r in card.data.eval_results or [] if key(r) not in new_keys]
    card.data.eval_results = kept + results
    card.data.model_name = card.data.model_name or Path(model_dir).name
    write_card(card, path)
    return True


def evaluation_results(report: dict) -> list[EvalResult]:
    """`run_eval.py`'s report as model-index results (file names, never paths, name the data)."""
    results = []
    for key, dataset_type in (("squad_v1.1", "rajpurkar/squad"), ("squad_v2.0", "rajpurkar/squad_v2")):
        for decoding in ("free", "grounded"):
            scores = report.get(f"{key} {decoding}")
            if not scores:
                continue
            # A Hub evaluation names its dataset and split; a local file is named by its file name, never its path.
            split = scores.get("split") or Path(scores.get("file", key)).name
            for metric in ("exact", "f1"):
                results.append(EvalResult(
                    task_type="question-answering", dataset_type=scores.get("dataset", dataset_type),
                    dataset_name=f"SQuAD v{key.split('v')[-1]} ({split})",
                    dataset_split=split, metric_type=metric, metric_name=f"{metric} ({decoding} decoding)",
                    metric_value=round(scores[metric], 2)))
    if "blimp" in report:
        blimp = report["blimp"]
        sampled = f", {blimp['pairs_per_paradigm']} pairs per paradigm" if blimp.get("pairs_per_paradigm") else ""
        results.append(EvalResult(
            task_type="text-generation", dataset_type="nyu-mll/blimp", dataset_name=f"BLiMP ({blimp['pairs']:,} pairs{sampled})",
            dataset_split="train", metric_type="accuracy", metric_name="BLiMP accuracy, mean over paradigms (%)",
            metric_value=round(blimp["mean"], 2)))
    if "instructions" in report:
        results.append(EvalResult(
            task_type="text-generation", dataset_type="trm-eval-instructions", dataset_name="TRM's fixed instructions",
            dataset_split="all", metric_type="ended_by_itself", metric_name="replies ending by themselves (%)",
            metric_value=round(100 * report["instructions"]["ended_by_itself"], 1)))
    return results
