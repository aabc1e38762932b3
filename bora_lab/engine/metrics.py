"""Evaluation metrics, implemented by hand (numpy only) so they are easy to read and test.

Every function takes plain sequences (lists, numpy arrays) and returns a Python ``float``.
Degenerate inputs (empty, constant) return ``0.0`` instead of NaN, as scikit-learn does for
F1/MCC, so a metric curve never breaks a plot.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _pair(preds: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(preds), np.asarray(labels)
    if p.shape != t.shape:
        raise ValueError(f"predictions and labels differ in shape: {p.shape} vs {t.shape}")
    return p, t


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    p, t = _pair(preds, labels)
    return float((p == t).mean()) if p.size else 0.0


def f1(preds: Sequence[int], labels: Sequence[int], average: str = "binary", pos_label: int = 1) -> float:
    """F1 score ``2·P·R / (P + R)``.

    Args:
        preds: predicted class ids.
        labels: true class ids.
        average: ``"binary"`` (F1 of ``pos_label``) or ``"macro"`` (unweighted mean over the
            classes present in labels or predictions).
        pos_label: the positive class for ``"binary"``.
    """
    p, t = _pair(preds, labels)
    if average == "binary":
        classes = [pos_label]
    elif average == "macro":
        classes = sorted(set(p.tolist()) | set(t.tolist()))
    else:
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    scores = []
    for c in classes:
        tp = float(np.sum((p == c) & (t == c)))
        fp = float(np.sum((p == c) & (t != c)))
        fn = float(np.sum((p != c) & (t == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient (multiclass form of Gorodkin 2004; the usual MCC for 2 classes).

    ``MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))`` with ``s`` samples, ``c``
    correct, ``p_k``/``t_k`` the number of predictions/labels of class ``k``. 0 when undefined.
    """
    p, t = _pair(preds, labels)
    s = float(p.size)
    if s == 0:
        return 0.0
    c = float(np.sum(p == t))
    classes = sorted(set(p.tolist()) | set(t.tolist()))
    pk = np.array([np.sum(p == k) for k in classes], dtype=float)
    tk = np.array([np.sum(t == k) for k in classes], dtype=float)
    den = math.sqrt((s * s - float(pk @ pk)) * (s * s - float(tk @ tk)))
    return float((c * s - float(pk @ tk)) / den) if den > 0 else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation ``cov(x, y) / (σ_x σ_y)``; 0 if either input is constant."""
    a, b = _pair(x, y)
    a, b = a.astype(float), b.astype(float)
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (as ``scipy.stats.rankdata``)."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, dtype=float)
    sorted_a = a[order]
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``: the exponentiated mean negative log-likelihood per token."""
    if n_tokens <= 0:
        return float("nan")
    return float(math.exp(min(total_nll / n_tokens, 700.0)))  # cap: exp(700) is near float max


def classification_metrics(preds: Sequence[int], labels: Sequence[int], names: Sequence[str],
                           num_labels: int) -> dict[str, float]:
    """The metrics named in ``names`` (``accuracy``, ``f1``, ``matthews``) for class predictions.

    F1 is binary (positive class 1) for two classes and macro-averaged otherwise.
    """
    fns = {
        "accuracy": lambda: accuracy(preds, labels),
        "f1": lambda: f1(preds, labels, average="binary" if num_labels == 2 else "macro"),
        "matthews": lambda: matthews(preds, labels),
    }
    return {n: fns[n]() for n in names}


def regression_metrics(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (GLUE STS-B) plus their mean (the GLUE score)."""
    r, rho = pearson(preds, labels), spearman(preds, labels)
    return {"pearson": r, "spearman": rho, "pearson_spearman": (r + rho) / 2}
