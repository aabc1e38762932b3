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
from torch import Tensor, nn

from ..config import RunConfig
from .tasks import Task


class Pipeline(ABC):
    """Base class; see the module docstring."""

    task: Task
    train_batches: Any  # a sequence of batches (dicts of tensors), one per step
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
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Metrics on the fixed evaluation set (the task's primary metric among them)."""

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

    def __init__(self, cfg: RunConfig, task: Task):
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
        if cfg.train_samples and cfg.train_samples < len(train):  # a seeded subset, not the first rows
            keep = np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.train_samples]
            train = train.select(sorted(keep.tolist()))
        order = batch_order(len(train), cfg.steps, cfg.batch_size, cfg.seed)  # (steps, B)
        needed = np.unique(order)
        encoded = self._encode(train.select(needed.tolist()))
        pos = {int(i): k for k, i in enumerate(needed)}
        self.train_batches = LazyBatches(order, lambda row: self._collate([encoded[pos[int(i)]] for i in row]))
        self._build_eval(task.test)

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

    def _build_eval(self, test) -> None:
        """A fixed seeded subset of the test split, sorted by length so batches pad little."""
        n = len(test)
        k = min(self.cfg.eval_samples or n, n)
        idx = np.arange(n) if k == n else np.sort(np.random.default_rng(self.cfg.seed + 1).choice(n, k, replace=False))
        encoded = self._encode(test.select(idx.tolist()))
        encoded.sort(key=lambda e: len(e["input_ids"]))
        size = self.cfg.batch_size if self.task.kind == "causal_lm" else max(self.cfg.batch_size, 32)
        self.eval_batches = [self._collate(encoded[i:i + size]) for i in range(0, len(encoded), size)]
        self.eval_size = len(encoded)
        self.majority_baseline = None
        if self.task.kind == "classification":
            counts = np.bincount([e["label"] for e in encoded])
            self.majority_baseline = float(counts.max() / counts.sum())

    # -- model -----------------------------------------------------------------------------------
    def pristine(self) -> nn.Module:
        return self.loaded.model

    def default_analysis_module(self) -> str | None:
        """The attention query (``query``, ``q_proj``, ...), as in the BoRA paper."""
        from .. import methods

        return methods.default_analysis_module(self.loaded.model)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        total_loss, count, preds, labels = 0.0, 0, [], []
        for batch in self.eval_batches:
            batch = to_device(batch, device)
            out = model(**batch)
            if self.task.kind == "causal_lm":
                n = int((batch["labels"][:, 1:] != -100).sum())  # predicted tokens (labels shift by one)
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

            return {"perplexity": perplexity(total_loss, count), "loss": mean}
        metrics = self.task.score(torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy())
        return {**metrics, "loss": mean}

    def info(self) -> dict[str, Any]:
        return {**self.task.info(), "model": self.loaded.model_id, "eval_samples": self.eval_size,
                "majority_baseline": self.majority_baseline}
