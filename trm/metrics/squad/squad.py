"""SQuAD v1.1 / v2.0 exact match and F1, as a local `evaluate` metric (works offline).

Load it with `evaluate.load(<this folder>)`. Scoring follows the official SQuAD v2.0 evaluation script:
answers are normalised (lower case, no punctuation, no articles a/an/the, single spaces), a prediction
scores the best EM/F1 over its gold answers, and a question with no gold answer (SQuAD v2.0) counts as
correct only when the prediction is empty. Results are percentages, overall and split into HasAns /
NoAns when both kinds are present.
"""

import collections
import re
import string

import datasets
import evaluate

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction, gold):
    gold_tokens, prediction_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not prediction_tokens:
        return float(gold_tokens == prediction_tokens)
    common = collections.Counter(gold_tokens) & collections.Counter(prediction_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Rajpurkar et al., SQuAD (2016) and Know What You Don't Know (2018).",
            inputs_description="predictions: list of answer strings ('' = no answer); references: list of lists of gold answers ([] = unanswerable).",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        scores = {"HasAns": [], "NoAns": []}
        for prediction, golds in zip(predictions, references):
            golds = [g for g in golds if normalize_answer(g)] or [""]
            kind = "HasAns" if golds != [""] else "NoAns"
            scores[kind].append((max(exact_match(prediction, g) for g in golds), max(f1(prediction, g) for g in golds)))
        every = scores["HasAns"] + scores["NoAns"]
        result = {"exact": 0.0, "f1": 0.0, "total": len(every)}
        if every:
            result["exact"] = 100.0 * sum(e for e, _ in every) / len(every)
            result["f1"] = 100.0 * sum(f for _, f in every) / len(every)
        if scores["HasAns"] and scores["NoAns"]:
            for kind, pairs in scores.items():
                result[f"{kind}_exact"] = 100.0 * sum(e for e, _ in pairs) / len(pairs)
                result[f"{kind}_f1"] = 100.0 * sum(f for _, f in pairs) / len(pairs)
                result[f"{kind}_total"] = len(pairs)
        return result
