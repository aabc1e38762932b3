"""Events the engine yields. Plain dataclasses: the CLI prints them, the UI turns them into plots,
``ResultsAccumulator`` folds them into the results dict (the engine keeps no results of its own).

Every event has ``kind`` and ``to_dict()`` (JSON-ready). ``run_id`` is ``"<method>-r<rank>"``.
Order: ``ComparisonStarted``, then per run ``RunStarted``, ``Step``/``Analysis``/``Eval``...,
``RunFinished``, with ``Progress`` after every step, and last ``ComparisonDone``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Event:
    kind: str = field(init=False, default="event")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ComparisonStarted(Event):
    """Facts about the whole comparison, known before the first step."""

    task: dict[str, Any]  # the task's info (name, kind, metric, ...; see the results schema)
    device: str
    peak_mem_kind: str | None
    lockstep: bool
    num_threads: int | None  # torch CPU threads (None on a GPU)
    threads_reason: str  # why that many, for people ("auto: both cores idle")
    environment: dict[str, Any]  # versions, commit, device name (engine.environment)
    engines: dict[str, str] = field(default_factory=dict)  # run id -> "shared" (one frozen base) or why per-copy
    kind: str = field(init=False, default="comparison_started")
    config: dict[str, Any] | None = None  # the config as run, when the engine settled part of it (matched ranks)
    matched: dict[str, Any] | None = None  # match_params: the matched ranks and counts (methods.matching)


@dataclass
class RunStarted(Event):
    run_id: str
    method: str
    rank: int
    trainable_params: int
    total_params: int
    device: str
    analysed_modules: list[str]  # full module names tracked by the analysis ([] if not applicable)
    kind: str = field(init=False, default="run_started")
    # Extra facts: "task" (task info dict), "trainable_pct", "adapter_params", "head_params" (trainable_params
    # split into the method's own and the task head's), "magnitude_axis", "peak_mem_kind", "lockstep".
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step(Event):
    run_id: str
    step: int  # 1-based optimizer step
    loss: float
    lr: float
    step_s: float  # wall time of this step (forward, backward, optimizer), seconds
    peak_mem_mb: float  # peak memory so far (CUDA allocator, or process RSS on CPU)
    kind: str = field(init=False, default="step")


@dataclass
class Eval(Event):
    run_id: str
    step: int
    metrics: dict[str, float]  # e.g. {"accuracy": 0.81, "f1": 0.79, "loss": 0.42}
    kind: str = field(init=False, default="eval")
    # {"name": "correct" | "squared_error" | "token_loss", "values": [one per test example, in the eval
    # set's fixed order], "higher_is_better": bool}
    per_example: dict[str, Any] | None = None
    val_metrics: dict[str, float] | None = None  # the same metrics on the validation split (val_samples > 0)


@dataclass
class Analysis(Event):
    run_id: str
    step: int
    snapshot: dict[str, Any]  # WeightTracker.snapshot(): from_start / step_to_step ΔM, ΔD per module + mean
    kind: str = field(init=False, default="analysis")
    cost_s: float = 0.0  # wall time of this snapshot (effective_weight() + tracker), seconds


@dataclass
class LayerCheckpoint(Event):
    """The checkpointed modules' weights at one analysis step (for the "Inside a layer" view).

    ``deltas`` hold ``ΔW = W_t − W_step0`` (computed in float32, stored as float16 numpy arrays
    ``[out, in]``: storing ``W_t`` in float16 would round away small updates); ``w0`` holds the
    step-0 weights, on the first checkpoint only. Not JSON: ``to_dict()`` gives shapes and ``info``.
    """

    run_id: str
    step: int
    deltas: dict[str, Any]  # module name -> ΔW, numpy float16 [out, in]
    info: dict[str, dict[str, Any]]  # module name -> the module's inspect() (plain lists and numbers)
    kind: str = field(init=False, default="layer_checkpoint")
    w0: dict[str, Any] | None = None  # module name -> W at step 0 (numpy float16), first checkpoint only
    cost_s: float = 0.0  # wall time of the capture, seconds

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "run_id": self.run_id, "step": self.step, "cost_s": self.cost_s,
                "shapes": {k: list(v.shape) for k, v in self.deltas.items()}, "info": self.info}


@dataclass
class Progress(Event):
    done_steps: int  # over all runs
    total_steps: int
    elapsed_s: float
    eta_s: float
    kind: str = field(init=False, default="progress")


@dataclass
class AdapterState(Event):
    """A run's trained tensors at its end (done or cancelled): trainable parameters and the adapter
    modules' buffers (masks, pruned ranks), on the CPU. Not JSON: ``to_dict()`` gives names and sizes.
    ``tensors`` is None when the run trains too much of the model to keep (see ``reason``)."""

    run_id: str
    step: int
    tensors: dict[str, Any] | None
    config: dict[str, Any]  # the model's ``bora_lab_config`` (method, options, targets, head)
    reason: str | None = None
    kind: str = field(init=False, default="adapter_state")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "run_id": self.run_id, "step": self.step, "reason": self.reason,
                "tensors": {k: list(v.shape) for k, v in (self.tensors or {}).items()}}


@dataclass
class RunFinished(Event):
    run_id: str
    status: str  # "done", "cancelled", "nan", "oom" or "error" (the accumulator adds the summary)
    kind: str = field(init=False, default="run_finished")


@dataclass
class RunError(Event):
    run_id: str
    message: str  # one line, for people (e.g. "loss became NaN at step 12; try a smaller learning rate")
    kind: str = field(init=False, default="error")
    status: str = "error"  # "nan" (non-finite loss), "diverged", "oom" (out of memory) or "error" (bad input, other)


@dataclass
class Cancelled(Event):
    message: str
    kind: str = field(init=False, default="cancelled")


@dataclass
class ComparisonDone(Event):
    status: str  # "done" or "cancelled"
    elapsed_s: float  # wall time of the training (model loading and tokenisation excluded)
    kind: str = field(init=False, default="comparison_done")
    # With RunConfig.export_weights: {run_id: {"start": {module: Tensor}, "end": {...}}} (CPU, not JSON).
    weights: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "status": self.status, "elapsed_s": self.elapsed_s,
                "weights": sorted(self.weights)}
