"""What produced a result: package versions, the code's commit, the device and the thread count.

Recorded as ``results["environment"]`` so two results.json files can be compared knowing what made
each. Versions are read from the installed distributions' metadata (nothing is imported), the commit
from ``git`` when the package sits in a git checkout.
"""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "gradio", "datasets", "safetensors", "numpy")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch_version() -> str | None:
    """torch's own version string, with its build label (``2.13.0+cpu``, ``2.14.1+cu130``), which the
    distribution metadata may leave out: the build matters for comparing numbers."""
    try:
        import torch
    except ImportError:
        return _version("torch")
    return torch.__version__


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding ``path`` (default: this package), else None."""
    where = Path(path or Path(__file__).resolve().parents[2])
    if not (where / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": dirty}


def device_name(device: Any) -> str:
    """A readable name of a torch device: the GPU's model, or the CPU's."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    if kind == "mps":
        return f"Apple MPS ({platform.machine()})"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine() or "cpu"


def environment(device: Any = "cpu", num_threads: int | None = None) -> dict[str, Any]:
    """The record stored under ``results["environment"]`` (see docs/results_schema.md)."""
    from .. import __version__

    return {
        "bora_lab": __version__,
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {**{name: _version(name) for name in PACKAGES}, "torch": _torch_version()},
        "device": str(device),
        "device_name": device_name(device),
        "num_threads": num_threads,
    }
