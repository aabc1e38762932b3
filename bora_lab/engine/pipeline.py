"""What the trainer needs from a task, whatever its kind: a pristine model, the batches, a loss, an eval.

The trainer runs one loop for every method and every task. A :class:`Pipeline` hides the task:

* ``pristine()``: the base model (pretrained, head seeded), built once; every run deep-copies it,
  so all runs start from the same weights and the same head.
* ``train_batches``: one batch per optimizer step: the examples are tokenised once and shared, the
  batches collated when iterated, so every run sees the same batches in the same order.
* ``loss(model, batch)`` and ``evaluate(model)``.

:class:`TextPipeline` serves classification, regression and causal-LM tasks on ``transformers``
models; ``synthetic.SyntheticPipeline`` serves the weight-recovery tasks.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from .tasks import Task


class Pipeline(ABC):
    """Base class; see the module docstring."""

    task: Task
    train_batches: Any  # a sequence of batches (dicts of tensors), one per step
    has_validation: bool = False  # a validation split carved from the training data (``val_samples``)
    # torch intra-op threads while training (None: leave as is). Tiny models run much faster on one
    # thread: thread hand-offs cost more than their matmuls, worse still on a shared CPU.
    num_threads: int | None = None

    @abstractmethod
    def pristine(self) -> nn.Module:
        """The shared starting model, on the CPU (the trainer copies it for each run)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Scalar training loss of ``model`` on ``batch`` (already on the model's device)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device, per_example: bool = False, split: str = "test"):
        """Metrics on the fixed evaluation set (the task's primary metric among them); with
        ``per_example``, ``(metrics, {"name", "values", "higher_is_better"})``: every eval example's score;
        ``split="val"``: on the validation split instead."""

    @abstractmethod
    def losses(self, model: nn.Module, batch: dict[str, Tensor], n: int) -> list[Tensor]:
        """Per-run losses of a batch repeated ``n`` times (the shared-base engine's step): the
        ``i``-th is :meth:`loss` of run ``i`` on its ``B`` rows."""

    def info(self) -> dict[str, Any]:
        """Task description for ``results["task"]`` (JSON-ready)."""
        return self.task.info()

    def default_analysis_module(self) -> str | None:
        """Module type analysed by default; None analyses every adapted layer."""
        return None


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices for every step, ``(steps, batch_size)``: seeded epochs of permutations."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return order.reshape(steps, batch_size)


def split_validation(labels, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation indices, the other indices)``: ``k`` of ``n`` training examples, seeded, and
    stratified when ``labels`` (class ids) are given: each class keeps its share (largest remainders).

    Raises:
        ValueError: ``k`` leaves no training example.
    """
    if k >= n:
        raise ValueError(f"val_samples {k} would leave no training example (the training split has {n})")
    rng = np.random.default_rng(seed + 2)
    if labels is None:
        val = rng.permutation(n)[:k]
    else:
        labels = np.asarray(labels)
        classes, counts = np.unique(labels, return_counts=True)
        exact = k * counts / n
        quota = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - quota))[: k - quota.sum()]:
            quota[i] += 1
        val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    val = np.sort(val)
    return val, np.setdiff1d(np.arange(n), val)


class LazyBatches:
    """The training batches, collated when iterated (not all ``steps`` of them up front)."""

    def __init__(self, order: np.ndarray, collate: Any):
        self.order, self.collate = order, collate

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.collate(self.order[i])

    def __iter__(self):
        return (self.collate(row) for row in self.order)


class TextPipeline(Pipeline):
    """Classification, regression or causal LM on a ``transformers`` model (see ``models.load_model``)."""

    def __init__(self, cfg: RunConfig, task: Task, eval_seed: int | None = None):
        from .loading import load_model

        self.cfg, self.task = cfg, task
        kind = task.kind
        self.loaded = load_model(cfg.model, kind, num_labels=task.num_labels if kind == "classification" else None,
                                 num_layers=cfg.num_layers, seed=cfg.seed)
        positions = getattr(self.loaded.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and cfg.max_length > positions:
            raise ValueError(f"max_length {cfg.max_length} is more than the {positions} positions {cfg.model!r} "
                             f"has: choose max_length <= {positions}")
        self.tokenizer = self.loaded.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        train = task.train
        self.val_batches: list[dict[str, Tensor]] = []
        if cfg.val_samples:  # carved before anything else, with the comparison's seed: every seed shares it
            labels = train["label"] if task.kind == "classification" else None
            val_idx, rest = split_validation(labels, len(train), cfg.val_samples,
                                             cfg.seed if eval_seed is None else eval_seed)
            self.val_batches = self._eval_batches(self._encode(train.select(val_idx.tolist())))
            train = train.select(rest.tolist())
        if cfg.train_samples and cfg.train_samples < len(train):  # a seeded subset, not the first rows
            keep = np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.train_samples]
            train = train.select(sorted(keep.tolist()))
        order = batch_order(len(train), cfg.steps, cfg.batch_size, cfg.seed)  # (steps, B)
        needed = np.unique(order)
        encoded = self._encode(train.select(needed.tolist()))
        pos = {int(i): k for k, i in enumerate(needed)}
        self.train_batches = LazyBatches(order, lambda row: self._collate([encoded[pos[int(i)]] for i in row]))
        self._build_eval(task.test, cfg.seed if eval_seed is None else eval_seed)

    # -- data ------------------------------------------------------------------------------------
    def _encode(self, ds) -> list[dict[str, Any]]:
        """Tokenise a dataset once: a list of per-example dicts (``input_ids``, ..., ``label``)."""
        pair = ds["text_pair"] if "text_pair" in ds.column_names else None
        enc = self.tokenizer(list(ds["text"]), pair, truncation=True, max_length=self.cfg.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        labels = ds["label"] if "label" in ds.column_names and self.task.kind != "causal_lm" else None
        out = []
        for i in range(len(enc["input_ids"])):
            ex = {k: enc[k][i] for k in keys}
            if labels is not None:
                ex["label"] = labels[i]
            out.append(ex)
        return out

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Right-pad to the longest example of the batch (dynamic padding)."""
        width = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, Tensor] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples])
        if self.task.kind == "causal_lm":  # predict every real token; padding is ignored (-100)
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        else:
            dtype = torch.float32 if self.task.kind == "regression" else torch.long
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
        return batch

    def _build_eval(self, test, seed: int) -> None:
        """A fixed seeded subset of the test split, sorted by length so batches pad little (the same
        for every seed of a comparison: ``seed`` is the comparison's)."""
        n = len(test)
        k = min(self.cfg.eval_samples or n, n)
        idx = np.arange(n) if k == n else np.sort(np.random.default_rng(seed + 1).choice(n, k, replace=False))
        encoded = self._encode(test.select(idx.tolist()))
        self.eval_batches = self._eval_batches(encoded)
        self.eval_size = len(encoded)
        self.majority_baseline = None
        if self.task.kind == "classification":
            counts = np.bincount([e["label"] for e in encoded])
            self.majority_baseline = float(counts.max() / counts.sum())

    def _eval_batches(self, encoded: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Evaluation batches, sorted by length so they pad little (the order is fixed: per-example
        scores line up across runs)."""
        encoded = sorted(encoded, key=lambda e: len(e["input_ids"]))
        size = self.cfg.batch_size if self.task.kind == "causal_lm" else max(self.cfg.batch_size, 32)
        return [self._collate(encoded[i:i + size]) for i in range(0, len(encoded), size)]

    @property
    def has_validation(self) -> bool:
        return bool(self.val_batches)

    # -- model -----------------------------------------------------------------------------------
    def pristine(self) -> nn.Module:
        return self.loaded.model

    def default_analysis_module(self) -> str | None:
        """The attention query (``query``, ``q_proj``, ...), as in the BoRA paper."""
        from .. import methods

        return methods.default_analysis_module(self.loaded.model)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(**batch).loss

    def losses(self, model: nn.Module, batch: dict[str, Tensor], n: int) -> list[Tensor]:
        """The losses ``transformers`` computes from labels, chunk by chunk (fp32 logits as it does)."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        out = []
        for lg, lb in zip(logits.chunk(n), batch["labels"].chunk(n)):
            if self.task.kind == "causal_lm":  # token t predicts token t + 1; padding (-100) is ignored
                out.append(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), lb[:, 1:].reshape(-1),
                                           ignore_index=-100))
            elif self.task.kind == "regression":
                out.append(F.mse_loss(lg.squeeze(), lb.squeeze()))
            else:
                out.append(F.cross_entropy(lg.view(-1, lg.shape[-1]), lb.view(-1)))
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, per_example: bool = False, split: str = "test"):
        """Metrics on the test subset (``split="val"``: the validation split); with ``per_example`` also
        ``{"name", "values", "higher_is_better"}``: each example's correctness (classification: 1/0),
        squared error (regression) or mean token loss (causal LM), in the fixed order of the split
        (what paired comparisons resample)."""
        total_loss, count, preds, labels, token_losses = 0.0, 0, [], [], []
        for batch in self.eval_batches if split == "test" else self.val_batches:
            batch = to_device(batch, device)
            out = model(**batch)
            if self.task.kind == "causal_lm":
                n = int((batch["labels"][:, 1:] != -100).sum())  # predicted tokens (labels shift by one)
                if per_example:
                    lg, lb = out.logits[:, :-1].float(), batch["labels"][:, 1:]
                    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                          reduction="none").view(lb.shape)
                    token_losses.append((tok.sum(1) / (lb != -100).sum(1).clamp_min(1)).cpu())
            else:
                n = len(batch["labels"])
                logits = out.logits.float()
                preds.append(logits.squeeze(-1) if self.task.kind == "regression" else logits.argmax(-1))
                labels.append(batch["labels"])
            total_loss += float(out.loss) * n
            count += n
        mean = total_loss / max(count, 1)
        if self.task.kind == "causal_lm":
            from .metrics import perplexity

            metrics = {"perplexity": perplexity(total_loss, count), "loss": mean}
            examples = {"name": "token_loss", "values": torch.cat(token_losses).tolist() if per_example else [],
                        "higher_is_better": False}
        else:
            pred, gold = torch.cat(preds).cpu(), torch.cat(labels).cpu()
            metrics = {**self.task.score(pred.numpy(), gold.numpy()), "loss": mean}
            if self.task.kind == "regression":
                examples = {"name": "squared_error", "values": (pred.float() - gold.float()).square().tolist(),
                            "higher_is_better": False}
            else:
                examples = {"name": "correct", "values": (pred == gold).int().tolist(), "higher_is_better": True}
        return (metrics, examples) if per_example else metrics

    def info(self) -> dict[str, Any]:
        return {**self.task.info(), "model": self.loaded.model_id, "eval_samples": self.eval_size,
                "majority_baseline": self.majority_baseline}
