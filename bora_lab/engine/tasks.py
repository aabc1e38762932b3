"""Task registry: what to train on and how to score it.

A task is a name in :data:`TASKS` (offline: ``fine_foods``, ``austen_books``, ``austen_lm``,
``synthetic_row|col|rank|mix``; online: ``glue/<name>``) or any Hugging Face dataset id, loaded
through ``datasets`` so one pipeline serves all of them. Text tasks end up as ``datasets.Dataset``
splits with a ``text`` column (plus ``text_pair`` for sentence pairs) and a ``label`` column
(absent for causal-LM tasks).

    spec = get_task_spec("glue/cola"); spec.kind, spec.defaults
    task = load_task(RunConfig(task="fine_foods"))
    task.score(preds, labels)  # {"accuracy": ..., "f1": ...}
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from . import metrics as M

KINDS = ("classification", "regression", "causal_lm", "synthetic")
# RunConfig values that suit the synthetic weight-recovery tasks (they run in seconds).
SYNTHETIC_DEFAULTS = {"model": "linear", "lr": 0.01, "steps": 600, "batch_size": 64, "eval_every": 50,
                      "analyze_every": 30, "warmup_ratio": 0.0, "grad_clip": 0.0}
LM_DEFAULTS = {"model": "smollm2", "lr": 5e-4, "steps": 20, "batch_size": 4, "max_length": 128,
               "eval_every": 10, "eval_samples": 16, "analyze_every": 5}
# Sentence(-pair) benchmarks need longer inputs than the fine_foods demo default.
GLUE_DEFAULTS = {"batch_size": 16, "max_length": 128, "eval_samples": 1000, "steps": 500, "eval_every": 100}


@dataclass
class Task:
    """A loaded task: its data and its metrics."""

    name: str
    kind: str  # one of KINDS
    metric: str  # the primary metric (a key of the Eval metrics)
    higher_is_better: bool = True
    description: str = ""
    train: Any = None  # datasets.Dataset: "text" [, "text_pair"] [, "label"]
    test: Any = None
    num_labels: int | None = None  # classes (classification), 1 (regression)
    label_names: list[str] | None = None
    metrics: tuple[str, ...] = ("accuracy", "f1")  # classification metrics computed at each eval
    change: str | None = None  # synthetic tasks: "row" | "col" | "rank" | "mix"

    def score(self, preds, labels) -> dict[str, float]:
        """Metrics of predictions (class ids, or floats for regression) against labels."""
        if self.kind == "regression":
            return M.regression_metrics(preds, labels)
        return M.classification_metrics(preds, labels, self.metrics, self.num_labels or 2)

    def info(self) -> dict[str, Any]:
        """JSON-ready description (stored as ``results["task"]``)."""
        return {"name": self.name, "kind": self.kind, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "description": self.description,
                "num_labels": self.num_labels, "label_names": self.label_names, "change": self.change}


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry: enough to describe a task without loading its data."""

    name: str
    kind: str
    description: str
    loader: Callable[[RunConfig], Task]
    online: bool = False  # needs the Hugging Face hub
    defaults: dict[str, Any] = field(default_factory=dict)  # suggested RunConfig values (CLI/app)


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, kind: str, description: str, online: bool = False,
                  defaults: dict[str, Any] | None = None):
    """Decorator adding a loader ``fn(cfg) -> Task`` to :data:`TASKS`."""
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {KINDS}, got {kind!r}")

    def deco(fn: Callable[[RunConfig], Task]):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = TaskSpec(name, kind, description, fn, online, dict(defaults or {}))
        return fn

    return deco


def available_tasks(online: bool = True) -> list[str]:
    """Registered task names (offline ones only if ``online`` is False)."""
    return [n for n, s in TASKS.items() if online or not s.online]


def get_task_spec(name: str) -> TaskSpec:
    """The registry entry of ``name``; any other name is taken as a Hugging Face dataset id."""
    if name in TASKS:
        return TASKS[name]
    if name.startswith("glue/"):
        glue = ", ".join(n for n in TASKS if n.startswith("glue/"))
        raise ValueError(f"unknown GLUE task {name!r}; choose one of: {glue}")
    return TaskSpec(name, "classification", f"Hugging Face dataset {name!r}", _hub_loader(name), online=True)


def task_defaults(name: str) -> dict[str, Any]:
    """Suggested ``RunConfig`` values for ``name`` (applied by the CLI to flags not given)."""
    return dict(get_task_spec(name).defaults) if name in TASKS else {}


def load_task(cfg: RunConfig) -> Task:
    """Load the task named by ``cfg.task``.

    Raises:
        ValueError: one line: unknown task, missing columns (listing them), or an online task
            while the hub is unreachable.
    """
    return get_task_spec(cfg.task).loader(cfg)


# ------------------------------------------------------------------ offline tasks
@register_task("fine_foods", "classification",
               "Amazon fine-food reviews: is this a 5-star review? (4,000 train / 1,000 test, offline)")
def _fine_foods(cfg: RunConfig) -> Task:
    from ..data import FINE_FOODS_LABELS, load_fine_foods

    ds = load_fine_foods()
    return Task("fine_foods", "classification", "accuracy", description=TASKS["fine_foods"].description,
                train=ds["train"], test=ds["test"], num_labels=2, label_names=list(FINE_FOODS_LABELS))


@register_task("austen_books", "classification",
               "Jane Austen: which of the six novels is this paragraph from? (offline)",
               defaults={"max_length": 96, "batch_size": 16, "steps": 300})
def _austen_books(cfg: RunConfig) -> Task:
    from ..data import AUSTEN_BOOKS, load_austen_books

    ds = load_austen_books(seed=cfg.seed)
    return Task("austen_books", "classification", "accuracy", description=TASKS["austen_books"].description,
                train=ds["train"], test=ds["test"], num_labels=len(AUSTEN_BOOKS), label_names=list(AUSTEN_BOOKS))


@register_task("austen_lm", "causal_lm", "Jane Austen's novels, causal-LM fine-tuning (perplexity, offline)",
               defaults=LM_DEFAULTS)
def _austen_lm(cfg: RunConfig) -> Task:
    from ..data import load_austen_lm

    ds = load_austen_lm(block_chars=max(200, 4 * cfg.max_length))  # ~4 characters per token
    return Task("austen_lm", "causal_lm", "perplexity", higher_is_better=False,
                description=TASKS["austen_lm"].description, train=ds["train"], test=ds["test"], metrics=())


def _synthetic(change: str, what: str):
    name = f"synthetic_{change}"

    @register_task(name, "synthetic", f"Synthetic weight recovery: the target differs from W0 by {what}",
                   defaults=SYNTHETIC_DEFAULTS)
    def loader(cfg: RunConfig) -> Task:
        return Task(name, "synthetic", "recovery_error", higher_is_better=False,
                    description=TASKS[name].description, metrics=(), change=change)


_synthetic("row", "a scaling of its rows (per output feature)")
_synthetic("col", "a scaling of its columns (per input feature)")
_synthetic("rank", "a rank-4 direction change")
_synthetic("mix", "row and column scalings plus a rank-4 change")


# ------------------------------------------------------------------ GLUE (online)
# name: (text columns, num_labels (1 = regression), metrics, primary metric, eval split)
GLUE: dict[str, tuple[tuple[str, ...], int, tuple[str, ...], str, str]] = {
    "cola": (("sentence",), 2, ("matthews", "accuracy"), "matthews", "validation"),
    "sst2": (("sentence",), 2, ("accuracy", "f1"), "accuracy", "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy", "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy", "validation"),
    "stsb": (("sentence1", "sentence2"), 1, (), "pearson", "validation"),
    "qnli": (("question", "sentence"), 2, ("accuracy", "f1"), "accuracy", "validation"),
    "qqp": (("question1", "question2"), 2, ("accuracy", "f1"), "accuracy", "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy", "f1"), "accuracy", "validation_matched"),
}


def _glue(short: str) -> None:
    cols, n, metric_names, primary, eval_split = GLUE[short]
    kind = "regression" if n == 1 else "classification"
    name = f"glue/{short}"

    @register_task(name, kind, f"GLUE {short.upper()} ({primary}; needs the Hugging Face hub)", online=True,
                   defaults=GLUE_DEFAULTS)
    def loader(cfg: RunConfig) -> Task:
        ds = _load_hub_dataset("nyu-mll/glue", short, name)
        mapping = {cols[0]: "text", **({cols[1]: "text_pair"} if len(cols) > 1 else {})}
        train, test = (_normalise(ds[s], mapping, "label", name) for s in ("train", eval_split))
        names = train.features["label"].names if hasattr(train.features["label"], "names") else None
        return Task(name, kind, primary, description=TASKS[name].description, train=train, test=test,
                    num_labels=n, label_names=names, metrics=metric_names)


for _short in GLUE:
    _glue(_short)


# ------------------------------------------------------------------ any Hugging Face dataset (online)
TEXT_CANDIDATES = ("text", "sentence", "content", "review", "document", "review_text")
LABEL_CANDIDATES = ("label", "labels")


def _hub_loader(dataset_id: str) -> Callable[[RunConfig], Task]:
    def loader(cfg: RunConfig) -> Task:
        ds = _load_hub_dataset(dataset_id, None, dataset_id, unknown_hint=True)
        train_name = "train" if "train" in ds else next(iter(ds))
        columns = list(ds[train_name].column_names)
        text = cfg.text_column or next((c for c in TEXT_CANDIDATES if c in columns), None)
        if text is None or text not in columns:
            raise ValueError(f"dataset {dataset_id!r} has no text column {cfg.text_column or 'text'!r}; "
                             f"columns: {', '.join(columns)} (set text_column)")
        label = cfg.label_column or next((c for c in LABEL_CANDIDATES if c in columns), None)
        if label is not None and label not in columns:
            raise ValueError(f"dataset {dataset_id!r} has no label column {label!r}; columns: {', '.join(columns)}")
        train, test = _hub_splits(ds, train_name, label, cfg.seed)
        mapping = {text: "text"}
        train, test = (_normalise(d, mapping, label, dataset_id) for d in (train, test))
        if label is None:  # no labels: causal-LM fine-tuning on the text
            return Task(dataset_id, "causal_lm", "perplexity", higher_is_better=False, train=train, test=test,
                        description=f"{dataset_id}: causal-LM fine-tuning on column {text!r}", metrics=())
        feat = train.features["label"]
        names = list(feat.names) if hasattr(feat, "names") else None
        if names is None and "float" in str(getattr(feat, "dtype", "")):
            return Task(dataset_id, "regression", "pearson", train=train, test=test, num_labels=1, metrics=(),
                        description=f"{dataset_id}: regression of {label!r} from {text!r}")
        n = len(names) if names else int(max(train["label"])) + 1
        return Task(dataset_id, "classification", "accuracy", train=train, test=test, num_labels=n,
                    label_names=names, description=f"{dataset_id}: {n}-class {label!r} from {text!r}")

    return loader


def _hub_splits(ds, train_name: str, label: str | None, seed: int):
    """(train, test): the first of test/validation whose labels are not hidden, else 10% of train."""
    for split in ("test", "validation", "validation_matched"):
        if split in ds and split != train_name:
            if label is None or min(ds[split][label]) >= 0:  # GLUE-style test sets hide labels as -1
                return ds[train_name], ds[split]
    parts = ds[train_name].train_test_split(test_size=0.1, seed=seed)
    return parts["train"], parts["test"]


def _normalise(ds, mapping: dict[str, str], label: str | None, name: str):
    """Keep the mapped columns, renamed to ``text`` / ``text_pair`` / ``label``."""
    keep = dict(mapping)
    if label is not None:
        keep[label] = "label"
    missing = [c for c in keep if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {name!r} lacks column(s) {', '.join(missing)}; columns: {', '.join(ds.column_names)}")
    ds = ds.select_columns(list(keep))
    return ds.rename_columns({k: v for k, v in keep.items() if k != v})


def _offline_mode() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub_dataset(path: str, config_name: str | None, label: str, unknown_hint: bool = False):
    """``datasets.load_dataset`` with one-line errors; fails fast when the hub is unreachable."""
    from .loading import hub_reachable

    offline_tasks = ", ".join(available_tasks(online=False))
    if not _offline_mode() and not hub_reachable():
        if unknown_hint:
            raise ValueError(f"unknown task {label!r}: not an offline task, and the Hugging Face hub is unreachable "
                             f"(offline) to load it as a dataset id; offline tasks: {offline_tasks}")
        raise ValueError(f"task {label!r} needs the Hugging Face hub, which is unreachable (offline); "
                         f"offline tasks: {offline_tasks}")
    what = (f"unknown task {label!r}: not an offline task, and loading it as a Hugging Face dataset failed"
            if unknown_hint else f"task {label!r} could not be loaded")
    import datasets

    try:
        return datasets.load_dataset(path, config_name)
    except Exception as err:  # noqa: BLE001 - any failure becomes one clear line
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        hint = f" (offline mode: only cached datasets load; offline tasks: {offline_tasks})" if _offline_mode() else ""
        raise ValueError(f"{what}: {cause}{hint or f'; offline tasks: {offline_tasks}'}") from None
