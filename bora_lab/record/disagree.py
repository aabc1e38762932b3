"""Where runs disagree: the test examples on which the runs of one comparison answer differently.

Every run stores the per-example scores of its final evaluation in ``results.json``
(``run["per_example"]``) and, with a validation split, those of its best evaluation
(``run["per_example_best"]``): ``{"name", "values", "higher_is_better", "step"}``, one value per
example of the fixed evaluation set, in the order the pipeline evaluates them (sorted by length), so
the lists of two runs line up. The scores are

* ``correct`` (classification): 1 when the run predicted the true label, else 0. With two classes a
  wrong answer *is* the other class, so the predictions follow from it; with more, two wrong answers
  may differ without showing here (they count as agreeing);
* ``squared_error`` (regression) and ``token_loss`` (causal LM): no single answer to disagree on, so
  the examples come ranked by how far apart the runs' scores are.

The texts and true labels are not stored: :func:`eval_examples` recovers them from the pipeline
that ``engine.reload.load_run`` (or ``engine.trainer.make_pipeline``) builds. Torch-free.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

AT = {"final": "per_example", "best": "per_example_best"}  # which evaluation -> the run's key
NOUNS = {"fine_foods": "test reviews", "austen_books": "test paragraphs", "austen_lm": "test passages"}
TEXT_CHARS = 300  # a table cell shows at most this much of an example's text
SPREAD_ROWS = 20  # regression / causal LM: the examples shown, largest difference first


@dataclass
class Disagreement:
    """What :func:`disagreements` found; ``rows`` fit a table with ``columns``."""

    summary: str  # one or two sentences, for people
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    count: int = 0  # examples on which the runs differ (classification)
    total: int = 0  # examples evaluated
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)  # (run a, run b) -> examples they differ on
    skipped: dict[str, str] = field(default_factory=dict)  # run id -> why it was left out


def scores(run: dict[str, Any], at: str = "final") -> dict[str, Any] | None:
    """The run's per-example scores at ``at`` (``"final"`` or ``"best"``), or None if it has none."""
    pe = run.get(AT[at])
    return pe if isinstance(pe, dict) and pe.get("values") else None


def predicted(correct: float, true: int | None, label_names: list[str] | None) -> str:
    """A classification answer recovered from its correctness: the true label when right; the other
    class of two when wrong; with more classes, ``"not <true label>"`` (which wrong class is not stored)."""
    names = label_names or []
    truth = names[true] if true is not None and 0 <= true < len(names) else None
    if truth is None:
        return "right" if correct else "wrong"
    if correct:
        return truth
    return names[1 - true] if len(names) == 2 else f"not {truth}"


def _noun(results: dict[str, Any]) -> str:
    return NOUNS.get((results.get("task") or {}).get("name", ""), "test examples")


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"


def _usable(results: dict[str, Any], run_ids: list[str], at: str) -> tuple[dict[str, dict], dict[str, str]]:
    """``{run id: scores}`` of the runs that can be compared, and why the others cannot."""
    runs = {r["run_id"]: r for r in results.get("runs", [])}
    found, skipped = {}, {}
    for rid in run_ids:
        run = runs.get(rid)
        pe = scores(run, at) if run else None
        if run is None:
            skipped[rid] = "not in this comparison"
        elif pe is None:
            skipped[rid] = ("no best checkpoint (it had no validation split)" if at == "best" and scores(run)
                            else "no evaluation stored yet")
        else:
            found[rid] = pe
    if found:  # every list must be of the same kind and length as the first one's
        first = next(iter(found.values()))
        for rid, pe in list(found.items()):
            if pe.get("name") != first.get("name") or len(pe["values"]) != len(first["values"]):
                skipped[rid] = "evaluated on a different set of examples"
                del found[rid]
    return found, skipped


def disagreements(results: dict[str, Any], run_ids: list[str], examples: list[dict[str, Any]] | None = None,
                  at: str = "final", max_rows: int = 500) -> Disagreement:
    """The examples on which ``run_ids`` answer differently (see the module docstring).

    Args:
        results: a comparison's results dict (``results.json``).
        run_ids: the runs to compare (two or more).
        examples: ``{"text", "label"}`` per evaluated example, in the scores' order
            (:func:`eval_examples`); without them rows show the example's index only.
        at: ``"final"`` evaluation, or ``"best"`` (the best checkpoint on the validation split).
        max_rows: the most table rows (the counts cover every example).
    """
    found, skipped = _usable(results, list(dict.fromkeys(run_ids)), at)
    why = "".join(f" {rid}: {reason}." for rid, reason in skipped.items())
    if len(found) < 2:
        return Disagreement(f"Pick at least two runs with stored per-example results to compare.{why}",
                            skipped=skipped)
    ids = list(found)
    values = {rid: found[rid]["values"] for rid in ids}
    total = len(values[ids[0]])
    examples = examples if examples and len(examples) == total else None
    noun = _noun(results)
    steps = sorted({found[rid].get("step") for rid in ids if found[rid].get("step") is not None})
    when = f"{'best checkpoints' if at == 'best' else 'final evaluation'}" + (
        f", step {steps[0]}" if len(steps) == 1 else "")
    kind = found[ids[0]].get("name")
    if kind != "correct":
        return _by_spread(found, ids, examples, total, noun, when, kind, skipped, why)
    label_names = (results.get("task") or {}).get("label_names")
    pairs = {(a, b): sum(x != y for x, y in zip(values[a], values[b])) for a, b in combinations(ids, 2)}
    differ = [i for i in range(total) if len({values[rid][i] for rid in ids}) > 1]
    if not differ:
        who = " and ".join(ids) if len(ids) == 2 else f"The {len(ids)} runs"
        summary = f"{who} agree on all {total} {noun} ({when})."
    elif len(ids) == 2:
        a, b = ids
        right = {rid: sum(values[rid][i] for i in differ) for rid in ids}
        summary = (f"{a} and {b} disagree on {len(differ)} of {total} {noun} ({when}): {a} is right on "
                   f"{right[a]:g} of them, {b} on {right[b]:g}.")
    else:
        summary = (f"The {len(ids)} runs do not all agree on {len(differ)} of {total} {noun} ({when}). Pairs: "
                   + "; ".join(f"{a} vs {b}: {n}" for (a, b), n in pairs.items()) + ".")
    if len(label_names or []) > 2:
        summary += " (Stored results say right or wrong only: two different wrong classes count as agreeing.)"
    columns = ["#", "true label", *ids, "text"]  # the long text last: the answers stay in view
    rows = []
    for i in differ[:max_rows]:
        ex = examples[i] if examples else {}
        true = ex.get("label")
        truth = label_names[true] if label_names and isinstance(true, int) and 0 <= true < len(label_names) else "?"
        rows.append([i, truth, *(f"{predicted(values[rid][i], true if label_names else None, label_names)} "
                                 f"{'✓' if values[rid][i] else '✗'}" for rid in ids), _clip(ex.get("text", ""))])
    if len(differ) > max_rows:
        summary += f" The table shows the first {max_rows}."
    return Disagreement(summary + why, columns, rows, len(differ), total, pairs, skipped)


def _by_spread(found, ids, examples, total, noun, when, kind, skipped, why) -> Disagreement:
    """Regression / causal LM: the examples on which the runs' scores are furthest apart."""
    values = {rid: found[rid]["values"] for rid in ids}
    spread = [max(values[rid][i] for rid in ids) - min(values[rid][i] for rid in ids) for i in range(total)]
    order = sorted(range(total), key=lambda i: -spread[i])[:SPREAD_ROWS]
    what = (kind or "score").replace("_", " ")
    pairs = {(a, b): sum(abs(x - y) for x, y in zip(values[a], values[b])) / max(total, 1)
             for a, b in combinations(ids, 2)}
    summary = (f"No single answer to disagree on: the table gives each run's {what} on the {len(order)} of {total} "
               f"{noun} on which {', '.join(ids)} differ most ({when}). Mean absolute difference: "
               + "; ".join(f"{a} vs {b}: {d:.3g}" for (a, b), d in pairs.items()) + ".")
    labelled = bool(examples) and any(ex.get("label") is not None for ex in examples)  # regression: true values
    columns = ["#", *(["true value"] if labelled else []), *ids, "text"]  # the cells: each run's score
    rows = []
    for i in order:
        ex = examples[i] if examples else {}
        true = [f"{ex['label']:.3g}" if ex.get("label") is not None else ""] if labelled else []
        rows.append([i, *true, *(f"{values[rid][i]:.3g}" for rid in ids), _clip(ex.get("text", ""))])
    return Disagreement(summary + why, columns, rows, 0, total, pairs, skipped)


def eval_examples(pipeline: Any, seed: int | None = None) -> list[dict[str, Any]]:
    """``{"text", "label"}`` of every example of ``pipeline``'s evaluation set, in the order of the
    per-example scores (``label`` None for causal LM). ``seed``: the comparison's seed (``config["seed"]``),
    which picks the evaluation subset for every seed's runs; default the pipeline's own.

    The order comes from the pipeline's own evaluation batches; each batch row is matched, by its
    token ids, to the original text of the seeded test subset the pipeline evaluates on (as
    ``TextPipeline`` picks it), so the full text shows, not the truncated tokens. A row that matches
    nothing shows its decoded tokens. A pipeline without text (synthetic tasks) gives ``[]``.
    """
    import numpy as np

    task, tokenizer, cfg = getattr(pipeline, "task", None), getattr(pipeline, "tokenizer", None), pipeline.cfg
    if task is None or tokenizer is None or getattr(task, "test", None) is None:
        return []
    rows = []
    for batch in pipeline.eval_batches:
        ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        labels = batch["labels"].tolist() if task.kind != "causal_lm" else [None] * len(ids)
        rows += [(tuple(t for t, keep in zip(seq, m) if keep), lab) for seq, m, lab in zip(ids, mask, labels)]
    test = task.test
    n = len(test)
    k = min(cfg.eval_samples or n, n)
    rng = np.random.default_rng((cfg.seed if seed is None else seed) + 1)
    idx = list(range(n)) if k == n else np.sort(rng.choice(n, k, replace=False)).tolist()
    subset = test.select(idx)
    texts = list(subset["text"])
    pairs = list(subset["text_pair"]) if "text_pair" in subset.column_names else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
    pool: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, seq in enumerate(enc["input_ids"]):
        pool[tuple(seq)].append(i)
    out = []
    for key, label in rows:
        hits = pool.get(key)
        if hits:
            i = hits.pop(0)
            text = texts[i] + (f" ‖ {pairs[i]}" if pairs else "")
        else:
            text = tokenizer.decode(list(key), skip_special_tokens=True)
        out.append({"text": text, "label": label})
    return out
