"""Evaluation metric maths: classification scores, perplexity, BLEU and base-vs-tuned comparison.

Offline libraries only (scikit-learn, sacrebleu); never Hugging Face `evaluate`, which fetches
metric scripts from the hub. Both libraries are imported inside the functions so that importing
this module stays fast (the CLI and the operator import the trainer package).

Every function returns plain Python numbers, so results go straight into eval.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_trainer.config import lower_is_better

# exp() overflows a float above ~709.78. A diverged run (loss inf or NaN) still needs a finite,
# JSON-safe perplexity that compares sanely in gates, so everything at or above this cap maps to it.
PERPLEXITY_CAP = 1e9


def classification_metrics(
    pred_ids: Sequence[int], label_ids: Sequence[int], labels: list[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    `pred_ids` and `label_ids` are class ids indexing `labels`. `per_class` and the confusion
    matrix cover every label (rows: true class, columns: predicted class, in `labels` order).
    `f1_macro` averages over the classes that occur in the gold labels or the predictions (the
    scikit-learn default): a label absent from a small test split would otherwise count as F1 0.
    Undefined ratios (no predictions of a class, say) are 0, never a warning or NaN.
    """
    if len(pred_ids) != len(label_ids):
        raise ValueError(f"pred_ids has {len(pred_ids)} items but label_ids has {len(label_ids)}")
    n = len(labels)
    if n == 0:
        raise ValueError("labels must not be empty")
    for name, ids in (("pred_ids", pred_ids), ("label_ids", label_ids)):
        bad = [int(i) for i in ids if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"{name} holds ids outside 0..{n - 1}: {sorted(set(bad))[:10]}")

    if not label_ids:
        # scikit-learn raises on empty input; an empty split simply scores nothing.
        return _no_scores(labels)

    from sklearn.metrics import (  # slow import: only here
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    y_pred = [int(i) for i in pred_ids]
    y_true = [int(i) for i in label_ids]
    all_ids = list(range(n))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_ids, average=None, zero_division=0
    )
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    matrix = confusion_matrix(y_true, y_pred, labels=all_ids)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in matrix.tolist()],
    }


def _no_scores(labels: list[str]) -> dict[str, Any]:
    n = len(labels)
    return {
        "accuracy": 0.0,
        "f1_macro": 0.0,
        "per_class": {
            label: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for label in labels
        },
        "confusion_matrix": [[0] * n for _ in range(n)],
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy), capped at PERPLEXITY_CAP (1e9).

    A NaN or infinite loss (a diverged run) also gives the cap: a finite number keeps eval.json
    valid JSON and makes gates such as `perplexity < 20` fail as they should (NaN compares false
    both ways).
    """
    if math.isnan(mean_loss) or mean_loss >= math.log(PERPLEXITY_CAP):
        return PERPLEXITY_CAP
    return math.exp(mean_loss)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) of generated texts against one reference each, via sacrebleu.

    Empty inputs give 0.0.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return 0.0
    import sacrebleu  # imported here: keeps module import fast

    score = float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
    return score if math.isfinite(score) else 0.0


def compare(base: Mapping[str, float], tuned: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """{metric: {base, tuned, delta, improved}} for the numeric metrics both runs report.

    delta = tuned - base; `improved` is True when the tuned model is strictly better in the
    metric's direction (lower for loss/perplexity, higher for accuracy, f1_macro, bleu and any
    other metric). Non-numeric entries (per_class, confusion_matrix) are skipped.
    """
    out: dict[str, dict[str, float]] = {}
    for metric in sorted(base.keys() & tuned.keys()):
        b, t = base[metric], tuned[metric]
        if not _is_number(b) or not _is_number(t):
            continue
        b, t = float(b), float(t)
        better = t < b if lower_is_better(metric) else t > b
        out[metric] = {"base": b, "tuned": t, "delta": t - b, "improved": better}
    return out


def _is_number(value: object) -> bool:
    # bool is an int subclass but never a metric value.
    return isinstance(value, int | float) and not isinstance(value, bool)
