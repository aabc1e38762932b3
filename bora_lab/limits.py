"""Operator limits: what one request may ask of this machine, and what a public server exposes.

BoRA Lab may run as a public Hugging Face Space, where every visitor (and every API client) can ask
for anything. The bounds here are enforced by ``RunConfig`` itself, so the app, the API, lessons and
the CLI all meet them in one place. Each has a generous default on your own machine, a tighter one
when ``SPACE_ID`` is set (Hugging Face sets it on a Space), and an environment variable to change it:

| limit | variable | default | on a Space |
| --- | --- | ---: | ---: |
| steps per run | ``BORA_LAB_MAX_STEPS`` | 100,000 | 2,000 |
| runs per comparison (methods × ranks) | ``BORA_LAB_MAX_RUNS`` | 64 | 12 |
| batch size | ``BORA_LAB_MAX_BATCH`` | 1,024 | 64 |
| tokens per example | ``BORA_LAB_MAX_LENGTH`` | 8,192 | 512 |
| eval examples | ``BORA_LAB_MAX_EVAL_SAMPLES`` | 1,000,000 | 2,000 |
| ΔM/ΔD snapshots per run (steps / analyse every) | ``BORA_LAB_MAX_SNAPSHOTS`` | 10,000 | 500 |
| upload size (MB) | ``BORA_LAB_MAX_UPLOAD_MB`` | 20 | 5 |
| steps per comparison in the app (runs × steps) | ``BORA_LAB_MAX_COMPARISON_STEPS`` | 10,000,000 | 6,000 |
| comparisons waiting in the app's training queue | ``BORA_LAB_MAX_QUEUE`` | 1,000 | 40 |
| ZeroGPU seconds reserved for one comparison, at most | ``BORA_LAB_MAX_GPU_S`` | 600 | 300 |

The last three concern the app's shared training queue only (``bora_lab.ui.training_queue``): one
comparison trains at a time, and a long one makes everyone behind it wait.

Switches (``1``/``0``): ``BORA_LAB_REUSE_RUNS`` (the app computes identical settings once: a
finished comparison is shown again, a running one is watched; default on), ``BORA_LAB_PRIVATE_RUNS`` (each visitor lists, opens and downloads only
their own runs; default on a Space), ``BORA_LAB_ALLOW_LOCAL_PATHS`` (the app accepts a server path
as model or task; default off: only ids; the CLI and the Python API always accept paths).
"""
from __future__ import annotations

import os

LIMITS: dict[str, tuple[str, int, int]] = {  # name -> (variable, default, default on a Space)
    "steps": ("BORA_LAB_MAX_STEPS", 100_000, 2_000),
    "runs": ("BORA_LAB_MAX_RUNS", 64, 12),
    "batch_size": ("BORA_LAB_MAX_BATCH", 1_024, 64),
    "max_length": ("BORA_LAB_MAX_LENGTH", 8_192, 512),
    "eval_samples": ("BORA_LAB_MAX_EVAL_SAMPLES", 1_000_000, 2_000),
    "snapshots": ("BORA_LAB_MAX_SNAPSHOTS", 10_000, 500),
    "upload_mb": ("BORA_LAB_MAX_UPLOAD_MB", 20, 5),
    "comparison_steps": ("BORA_LAB_MAX_COMPARISON_STEPS", 10_000_000, 6_000),
    "queue": ("BORA_LAB_MAX_QUEUE", 1_000, 40),
    "gpu_s": ("BORA_LAB_MAX_GPU_S", 600, 300),
}


def on_space() -> bool:
    """Whether this process serves a Hugging Face Space (``SPACE_ID`` is set there)."""
    return bool(os.environ.get("SPACE_ID"))


def limit(name: str) -> int:
    """The bound ``name`` of :data:`LIMITS`, from its variable or the (Space) default.

    Raises:
        ValueError: the variable is set but is not a positive whole number.
    """
    var, local, space = LIMITS[name]
    raw = os.environ.get(var, "").strip()
    if not raw:
        return space if on_space() else local
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{var} must be a positive whole number, got {raw!r}")
    return int(raw)


def _switch(var: str, default: bool) -> bool:
    raw = os.environ.get(var, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


def private_runs() -> bool:
    """Each visitor sees only their own runs (default on a Space)."""
    return _switch("BORA_LAB_PRIVATE_RUNS", on_space())


def allow_local_paths() -> bool:
    """The app accepts a server path as model or task (default off)."""
    return _switch("BORA_LAB_ALLOW_LOCAL_PATHS", False)


def reuse_runs() -> bool:
    """The app computes identical settings once (default on; ``0`` trains every Run afresh, e.g. to time it)."""
    return _switch("BORA_LAB_REUSE_RUNS", True)
