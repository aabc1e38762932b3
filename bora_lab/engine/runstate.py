"""One run of a comparison: its model, optimizer, schedule, RNG stream and weight tracker.

The trainer owns the loop; a :class:`RunState` knows how to take one step, evaluate, and take an
analysis snapshot. Nothing here depends on the method: per-method behaviour comes from the
registry (``methods.apply``) and from two optional module hooks, looked up with ``hasattr``:

* ``regularization_loss()``: a scalar added to the loss before backward (e.g. LoRA2's
  orthogonality terms);
* ``after_step(step, total_steps)``: called after every optimizer step (e.g. AdaLoRA pruning).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import gc
import math
import re
import resource
import sys
import time
from typing import Any

import torch
from torch import Tensor, nn

from .. import methods
from ..analysis.weights import WeightTracker
from ..config import RunConfig
from ..record.accumulator import improves
from ..record.files import BEST_PREFIX
from .pipeline import Pipeline, to_device
from .streams import get_rng, set_rng

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
# A loss above DIVERGENCE_FACTOR * max(1, first loss) counts as diverged (Adam bounds each update by
# ~lr, so a huge lr gives finite but meaningless losses rather than NaN).
DIVERGENCE_FACTOR = 1e6
# ... and so does a run whose mean loss over the last DIVERGED_WINDOW steps is above
# DIVERGED_MEAN_FACTOR * max(1, first loss): with lr 1e3 on fine_foods the loss sits at ~5e4 (from
# 0.69) without ever becoming NaN.
DIVERGED_WINDOW, DIVERGED_MEAN_FACTOR = 10, 100.0
# Layer checkpoints (W0, ΔW in float16) of one run stay under this many bytes: with more analysed
# modules than fit, an evenly spaced subset of them is checkpointed.
LAYER_CHECKPOINT_BYTES = 64 * 2**20
# A run's trained tensors (adapter + head) are kept in its folder up to this size; full fine-tuning
# of a whole model (tens of MB) is not.
ADAPTER_SAVE_BYTES = 32 * 2**20


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite."""


class Diverged(NonFiniteLoss):
    """The training loss stayed finite but grew far above its start (see ``DIVERGED_MEAN_FACTOR``)."""


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. An unavailable explicit choice raises ValueError."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use device='auto' or 'cpu'")
    if name == "mps" and not mps:
        raise ValueError("device 'mps' requested but Apple MPS is not available; use device='auto' or 'cpu'")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA GPUs that support it; a no-op elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


PEAK_MEM_KIND = {"cuda": "cuda_max_memory_allocated", "cpu": "process_peak_rss", "mps": "process_peak_rss"}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset (MiB). Else the process peak RSS (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def warmup_cosine(total: int, warmup_ratio: float):
    """LambdaLR factor: linear warm-up over ``ceil(ratio·total)`` steps, then cosine decay towards 0."""
    warm = math.ceil(warmup_ratio * total)

    def factor(i: int) -> float:  # i = optimizer steps taken so far (0 for the first step)
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (i - warm) / max(1, total - warm)))

    return factor


def layer_index(name: str) -> int | None:
    """Index of the transformer block in a module name (``bert.encoder.layer.3.attention...`` -> 3)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def dense_weight(module: nn.Module) -> Tensor:
    """The ``[out, in]`` weight a module applies: merged for adapters, ``weight`` (transposed for Conv1D)."""
    if hasattr(module, "effective_weight"):
        return module.effective_weight()
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def select_analysed(model: nn.Module, module_type: str | None, layers: list[int] | None) -> list[tuple[str, nn.Module]]:
    """The modules to track: wrapped (else plain linear) modules named ``module_type`` in ``layers``.

    Args:
        model: the adapted model.
        module_type: a name suffix (``"query"``, ``"attention.output.dense"``); None = every wrapped layer.
        layers: block indices to keep (None = all). Modules outside numbered blocks are dropped
            when any module has a block index (e.g. BERT's pooler).

    Raises:
        ValueError: nothing matches (the message lists the module names available).
    """
    wrapped = [(n, m) for n, m in model.named_modules() if hasattr(m, "effective_weight")]
    linear = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    linear = [(n, m) for n, m in linear if not any(n.startswith(w + ".") for w, _ in wrapped)]  # not inner bases
    if module_type is None:
        found = wrapped
    else:
        match = lambda n: n == module_type or n.endswith("." + module_type)
        found = [(n, m) for n, m in wrapped if match(n)] or [(n, m) for n, m in linear if match(n)]
        if not found:
            names = sorted({n.rsplit(".", 1)[-1] for n, _ in wrapped + linear})
            raise ValueError(f"analysis module {module_type!r} not found; modules available: {', '.join(names)}")
    if any(layer_index(n) is not None for n, _ in found):
        found = [(n, m) for n, m in found if layer_index(n) is not None]
    if layers:
        have = sorted({layer_index(n) for n, _ in found if layer_index(n) is not None})
        bad = [i for i in layers if i not in have]
        if bad:
            raise ValueError(f"analysis layer(s) {bad} do not exist; layers available: {have}")
        found = [(n, m) for n, m in found if layer_index(n) in set(layers)]
    return found


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def describe_error(err: BaseException, step: int | None = None) -> tuple[str, str]:
    """(one-line message, status) for a failed run."""
    where = f" at step {step}" if step else ""
    if isinstance(err, Diverged):
        return str(err), "diverged"
    if isinstance(err, NonFiniteLoss):
        return str(err), "nan"
    if _is_oom(err):
        return (f"out of memory{where}: try a smaller batch size, max_length or rank, or fewer runs side by side",
                "oom")
    first = (str(err).strip().splitlines() or [""])[0][:300]
    if isinstance(err, (ValueError, TypeError, KeyError)):
        return first or type(err).__name__, "error"
    return f"{type(err).__name__}{where}: {first}", "error"


class RunState:
    """Model, optimizer and bookkeeping of one (method, rank) run.

    Args:
        run_id, method, rank: the run.
        cfg: the comparison's config.
        pipeline: the shared task pipeline (batches, loss, eval).
        device: where to train.
        analysis_module: module type to analyse (None = every wrapped layer).

        frozen: a ``shared.FrozenBase``: keep only the run's own modules and share the rest.
        lr: this run's peak learning rate (default ``cfg.lr``).

    Raises:
        ValueError: the method cannot be applied (bad rank, unknown option, no trainable parameters).
    """

    def __init__(self, run_id: str, method: str, rank: int, cfg: RunConfig, pipeline: Pipeline,
                 device: torch.device, analysis_module: str | None, frozen: Any = None, lr: float | None = None):
        self.run_id, self.method, self.rank, self.cfg = run_id, method, rank, cfg
        self.pipeline, self.device = pipeline, device
        self.info = methods.info(method)
        model = copy.deepcopy(pipeline.pristine())
        with torch.random.fork_rng(devices=[]):  # same adapter init for every run, whatever ran before
            torch.manual_seed(cfg.seed)
            methods.apply(model, method, rank=rank, alpha=cfg.alpha, target_modules=cfg.target_modules,
                          train_head=cfg.head, **cfg.method_options.get(method, {}))
        self.own: dict[str, nn.Module] = {}  # shared-base engine: the run's own modules (see engine.shared)
        if frozen is not None:
            model, self.own = frozen.rebase(model, device)
        self.model = model.to(device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"method {method!r} left no trainable parameters in this model")
        self.lr = cfg.lr if lr is None else lr  # a learning-rate sweep gives each run its own
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(cfg.steps, cfg.warmup_ratio))
        self.reg_modules = [m for m in model.modules() if callable(getattr(m, "regularization_loss", None))]
        self.hook_modules = [m for m in model.modules() if callable(getattr(m, "after_step", None))]
        self.analysed = (select_analysed(model, analysis_module, cfg.analysis_layers)
                         if self.info["has_weight"] else [])
        self.tracker = WeightTracker()
        self._layer_w0: dict[str, Tensor] = {}  # float32 W at the first layer checkpoint (ΔW reference)
        self.counts = methods.trainable_summary(model)
        self.targets = list(getattr(model, "bora_lab_config", {}).get("target_modules", []))
        self.first_loss: float | None = None
        self.steps_done = 0  # optimizer steps taken
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=DIVERGED_WINDOW)
        self.best_step, self._best = None, None  # best validation evaluation so far: step; (metric, tensors)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # every run gets the same dropout stream, in any schedule
            self._rng = self._get_rng()

    # -- RNG: each run has its own stream, so lockstep and sequential give the same numbers ---------
    def _get_rng(self) -> tuple[Tensor, Tensor | None]:
        return get_rng(self.device)

    def _set_rng(self, state: tuple[Tensor, Tensor | None]) -> None:
        set_rng(state, self.device)

    # -- the three things the trainer asks for -------------------------------------------------------
    def train_step(self, step: int, batch: dict[str, Tensor]) -> tuple[float, float, float, float]:
        """One optimizer step. Returns (loss, lr, step seconds, peak memory MiB).

        Raises:
            NonFiniteLoss: the loss is NaN/inf (nothing is updated).
        """
        outer = self._get_rng()
        self._set_rng(self._rng)
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            lr = self.schedule.get_last_lr()[0]
            t0 = time.perf_counter()
            batch = to_device(batch, self.device)
            with autocast(self.device):
                loss = self.pipeline.loss(self.model, batch)
                total = loss + sum(m.regularization_loss() for m in self.reg_modules) if self.reg_modules else loss
            value = float(loss.detach())
            self.check_loss(step, value, lr)
            total.backward()
            self.finish_step(step)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return value, lr, time.perf_counter() - t0, peak_memory_mb(self.device)
        finally:
            self._rng = self._get_rng()
            self._set_rng(outer)

    def check_loss(self, step: int, value: float, lr: float) -> None:
        """Record this step's loss; raise if it is NaN/inf or the run has diverged (nothing is updated).

        Raises:
            NonFiniteLoss, Diverged.
        """
        if self.first_loss is None:
            self.first_loss = value
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {'NaN' if math.isnan(value) else 'infinite'} at step {step} "
                                f"(lr={lr:.3g}): try a smaller learning rate")
        self.recent_losses.append(value)
        recent = sum(self.recent_losses) / len(self.recent_losses)
        if value > DIVERGENCE_FACTOR * max(1.0, self.first_loss) or (
                len(self.recent_losses) == DIVERGED_WINDOW
                and recent > DIVERGED_MEAN_FACTOR * max(1.0, self.first_loss)):
            raise Diverged(f"loss diverged: {recent:.3g} over the last {len(self.recent_losses)} steps at step "
                           f"{step}, from {self.first_loss:.3g} at the start (lr={lr:.3g}): try a smaller "
                           "learning rate")

    def finish_step(self, step: int) -> None:
        """After backward: clip, step the optimizer and the schedule, run the hooks, zero the gradients."""
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.steps_done = step
        for m in self.hook_modules:  # before zero_grad: AdaLoRA/LoRA2 score importance from the gradients
            m.after_step(step, self.cfg.steps)
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, per_example: bool = False, split: str = "test"):
        """Metrics on the pipeline's fixed eval set (model in eval mode, then back to train); with
        ``per_example``, ``(metrics, per-example scores)``; ``split="val"``: the validation split
        (see ``Pipeline.evaluate``)."""
        self.model.eval()
        try:
            with autocast(self.device):
                out = self.pipeline.evaluate(self.model, self.device, per_example=per_example, split=split)
            metrics, examples = out if per_example else (out, None)
            metrics = {k: float(v) for k, v in metrics.items()}
            if split == "val":
                self._keep_if_best(metrics)
            return (metrics, examples) if per_example else metrics
        finally:
            self.model.train()

    @torch.no_grad()
    def snapshot(self, step: int) -> tuple[dict[str, Any], float]:
        """Tracker snapshot of the analysed modules' merged weights, and its cost in seconds."""
        t0 = time.perf_counter()
        snap = self.tracker.snapshot(step, {n: dense_weight(m) for n, m in self.analysed})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return snap, time.perf_counter() - t0

    def layer_modules(self, n_checkpoints: int) -> list[tuple[str, nn.Module]]:
        """The analysed modules whose W0 and ``n_checkpoints`` ΔW fit in ``LAYER_CHECKPOINT_BYTES``."""
        if not self.analysed:
            return []
        sizes = [2 * dense_weight(m).numel() * (n_checkpoints + 1) for _, m in self.analysed]  # float16 bytes
        if sum(sizes) <= LAYER_CHECKPOINT_BYTES:
            return list(self.analysed)
        keep = max(1, min(len(sizes), LAYER_CHECKPOINT_BYTES // max(sizes)))
        last = len(self.analysed) - 1
        return [self.analysed[i] for i in sorted({round(k * last / max(1, keep - 1)) for k in range(keep)})]

    @torch.no_grad()
    def layer_checkpoint(self, modules: list[tuple[str, nn.Module]]):
        """``(ΔW, inspect(), W0 or None, seconds)`` of ``modules`` (see ``events.LayerCheckpoint``).

        The first call records ``W0`` (returned once, float16 numpy) as the reference of every ΔW.
        """
        t0 = time.perf_counter()
        first = not self._layer_w0
        deltas, info = {}, {}
        for name, m in modules:
            w = dense_weight(m).detach().float()
            if first:
                self._layer_w0[name] = w.clone()
            deltas[name] = (w - self._layer_w0[name]).to("cpu", torch.float16).numpy()
            info[name] = m.inspect() if callable(getattr(m, "inspect", None)) else {}
        w0 = {n: self._layer_w0[n].to("cpu", torch.float16).numpy() for n, _ in modules} if first else None
        return deltas, info, w0, time.perf_counter() - t0

    @torch.no_grad()
    def _keep_if_best(self, metrics: dict[str, float]) -> None:
        """Keep a CPU copy of the trained tensors if this validation evaluation is the best so far, by the
        accumulator's rule (:func:`~bora_lab.record.accumulator.improves` on the primary metric); ``best_step`` also goes into the model's config (``adapter_config.json``)."""
        task = self.pipeline.task
        new, old = metrics.get(task.metric or "loss"), self._best[0] if self._best else None
        if improves(new, old, task.higher_is_better):
            tensors, _ = self._trained_tensors()
            if tensors is not None:
                self._best, self.best_step = (new, tensors), self.steps_done
                getattr(self.model, "bora_lab_config", {})["best_step"] = self.steps_done

    @torch.no_grad()
    def _trained_tensors(self) -> tuple[dict[str, Tensor] | None, int]:
        """``(CPU copies, bytes)`` of the trainable parameters and the adapter modules' persistent buffers;
        ``(None, bytes)``, copying nothing, past ``ADAPTER_SAVE_BYTES``."""
        tensors = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        owners = [n for n, m in self.model.named_modules() if isinstance(m, methods.AdapterLinear)
                  or n.rsplit(".", 1)[-1].startswith("bora_")]
        for name, buf in self.model.state_dict().items():
            if name not in tensors and any(name.startswith(o + ".") for o in owners) and ".base." not in name:
                tensors[name] = buf
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > ADAPTER_SAVE_BYTES:
            return None, size
        return {n: t.detach().cpu().clone() for n, t in tensors.items()}, size

    def adapter_state(self) -> tuple[dict[str, Tensor] | None, str | None]:
        """``(tensors, reason)``: the trainable parameters and the adapter modules' persistent buffers (CPU
        copies), enough to rebuild the trained model from the pristine one, and under ``BEST_PREFIX`` the
        same at ``best_step``; ``(None, why)`` past ``ADAPTER_SAVE_BYTES`` (e.g. full fine-tuning)."""
        tensors, size = self._trained_tensors()
        if tensors is None:
            return None, (f"{size / 2**20:.0f} MB of trained tensors (more than {ADAPTER_SAVE_BYTES // 2**20} MB): "
                          f"{self.method} trains most of the model, so it is not kept")
        if self._best is not None:
            tensors.update({BEST_PREFIX + n: t for n, t in self._best[1].items()})
        return tensors, None

    @torch.no_grad()
    def weights(self) -> dict[str, Tensor]:
        """Merged analysed weights on the CPU (float32), keyed by module name."""
        return {n: dense_weight(m).detach().float().cpu().clone() for n, m in self.analysed}

    def close(self) -> None:
        """Free the model and optimizer state."""
        for attr in ("model", "optimizer", "schedule", "params", "analysed", "tracker", "reg_modules", "hook_modules",
                     "_layer_w0"):
            self.__dict__.pop(attr, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
