"""Layer checkpoints: ``W0`` and ``ΔW`` of the analysed modules at a few steps, in memory and on disk.

The trainer yields a ``LayerCheckpoint`` event at step 0 and at up to ``RunConfig.layer_checkpoints``
later analysis steps; :class:`LayerStore` collects them (``ResultsAccumulator.layers``) and
``save_results`` writes them into the run folder::

    layers/<run_id>/w0.safetensors         # W at step 0, one float16 tensor [out, in] per module
    layers/<run_id>/step_<n>.safetensors   # ΔW = W_n − W_0 (computed in float32, stored float16)
    layers/<run_id>/step_<n>.json          # {module: inspect() dict} (magnitudes, touched indices...)

``ΔW`` rather than ``W_n`` is stored because float16 keeps ~3 significant digits: an update of 1e-4
on a weight of 0.05 would vanish from ``W_n`` but keeps its digits in ``ΔW``. The merged weight is
``W0 + ΔW``. numpy and safetensors only (no torch), so the UI reads saved runs without torch.

    store = LayerStore.load("runs/demo")            # lazy: tensors are read when asked for
    store.run_ids(); store.steps("bora-r8"); store.modules("bora-r8")
    w0, dw = store.w0("bora-r8", name), store.delta("bora-r8", 150, name)
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

LAYERS_DIR = "layers"
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")


def json_safe(obj: Any) -> Any:
    """Strict JSON: NaN/inf floats become None (JSON has no NaN; inspect() may report an infinite SQNR)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _read(path: Path, key: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.get_tensor(key)


class LayerStore:
    """Layer checkpoints of the runs of one comparison (see the module docstring).

    Arrays added in memory are kept as given (never modified); arrays of a loaded folder are read
    from disk on each request. Everything is keyed by run id, step and full module name.
    """

    def __init__(self) -> None:
        self._w0: dict[str, dict[str, np.ndarray | Path]] = {}  # run -> module -> array (or its file)
        self._deltas: dict[str, dict[int, dict[str, np.ndarray | Path]]] = {}  # run -> step -> module -> ΔW
        self._info: dict[str, dict[int, dict[str, dict]]] = {}  # run -> step -> module -> inspect()

    # -- filling -------------------------------------------------------------------------------
    def add(self, run_id: str, step: int, deltas: dict[str, np.ndarray], info: dict[str, dict],
            w0: dict[str, np.ndarray] | None = None) -> None:
        """Record one checkpoint (a ``LayerCheckpoint`` event's fields)."""
        if w0:
            self._w0.setdefault(run_id, {}).update(w0)
        self._deltas.setdefault(run_id, {})[int(step)] = dict(deltas)
        self._info.setdefault(run_id, {})[int(step)] = dict(info)

    def copy(self) -> LayerStore:
        """A store with its own indexes over the same (read-only) arrays: safe to read while this
        one keeps growing in another thread (take the copy under the writer's lock)."""
        new = LayerStore()
        new._w0 = {r: dict(m) for r, m in self._w0.items()}
        new._deltas = {r: {s: dict(m) for s, m in steps.items()} for r, steps in self._deltas.items()}
        new._info = {r: {s: dict(m) for s, m in steps.items()} for r, steps in self._info.items()}
        return new

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(s) for s in self._deltas.values())

    def run_ids(self) -> list[str]:
        """Runs with at least one checkpoint, in the order they were added."""
        return [r for r, steps in self._deltas.items() if steps]

    def steps(self, run_id: str) -> list[int]:
        """Checkpointed steps of ``run_id``, ascending ([] if none)."""
        return sorted(self._deltas.get(run_id, {}))

    def modules(self, run_id: str) -> list[str]:
        """Checkpointed module names of ``run_id`` (those of its first checkpoint)."""
        steps = self.steps(run_id)
        return list(self._deltas[run_id][steps[0]]) if steps else []

    def w0(self, run_id: str, module: str) -> np.ndarray:
        """``W`` at step 0, ``[out, in]`` float16."""
        value = self._w0[run_id][module]
        return _read(value, module) if isinstance(value, Path) else value

    def delta(self, run_id: str, step: int, module: str) -> np.ndarray:
        """``ΔW = W_step − W_0``, ``[out, in]`` float16."""
        value = self._deltas[run_id][int(step)][module]
        return _read(value, module) if isinstance(value, Path) else value

    def weight(self, run_id: str, step: int, module: str) -> np.ndarray:
        """The merged ``W = W0 + ΔW`` at ``step`` (float32)."""
        return self.w0(run_id, module).astype(np.float32) + self.delta(run_id, step, module).astype(np.float32)

    def info(self, run_id: str, step: int, module: str) -> dict[str, Any]:
        """The module's ``inspect()`` at ``step`` (``{}`` if it has none)."""
        return self._info.get(run_id, {}).get(int(step), {}).get(module, {})

    def infos(self, run_id: str, module: str | None = None) -> dict[int, dict[str, Any]]:
        """``{step: inspect()}`` of one module, or ``{step: {module: inspect()}}`` with ``module=None``."""
        per_step = self._info.get(run_id, {})
        if module is None:
            return {s: dict(v) for s, v in sorted(per_step.items())}
        return {s: v[module] for s, v in sorted(per_step.items()) if module in v}

    def nbytes(self) -> int:
        """Bytes of the arrays held in memory (loaded folders hold none)."""
        arrays = [a for run in self._w0.values() for a in run.values()]
        arrays += [a for run in self._deltas.values() for step in run.values() for a in step.values()]
        return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))

    # -- files ---------------------------------------------------------------------------------
    def save(self, run_folder: str | Path) -> Path:
        """Write every checkpoint under ``<run_folder>/layers/`` (layout in the module docstring).

        Checkpoints never change once recorded, so files already there are kept (a running
        comparison is flushed every few seconds); new ones are written beside and renamed into
        place, so a reader or a crash never meets a half-written file.
        """
        from safetensors.numpy import save_file

        def atomic(path: Path, write) -> None:
            if path.exists():
                return
            tmp = path.with_name(f".{path.name}.tmp")
            write(tmp)
            os.replace(tmp, path)

        root = Path(run_folder) / LAYERS_DIR
        for run_id in self.run_ids():
            folder = root / run_id
            folder.mkdir(parents=True, exist_ok=True)
            if run_id in self._w0:
                mods = list(self._w0[run_id])
                atomic(folder / "w0.safetensors", lambda t, r=run_id, ms=mods: save_file(
                    {m: np.ascontiguousarray(self.w0(r, m)) for m in ms}, str(t)))
            for step in self.steps(run_id):
                mods = list(self._deltas[run_id][step])
                info = json_safe(self._info[run_id].get(step, {}))
                atomic(folder / f"step_{step}.json", lambda t, i=info: t.write_text(json.dumps(i, allow_nan=False)))
                atomic(folder / f"step_{step}.safetensors", lambda t, r=run_id, st=step, ms=mods: save_file(
                    {m: np.ascontiguousarray(self.delta(r, st, m)) for m in ms}, str(t)))
        return root

    @classmethod
    def load(cls, run_folder: str | Path) -> LayerStore:
        """The checkpoints saved in a run folder (empty if it has none); tensors are read lazily."""
        from safetensors import safe_open

        store = cls()
        root = Path(run_folder) / LAYERS_DIR
        if not root.is_dir():
            return store
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            run_id = folder.name
            w0 = folder / "w0.safetensors"
            if w0.is_file():
                with safe_open(str(w0), framework="numpy") as f:
                    store._w0[run_id] = {k: w0 for k in f.keys()}
            steps = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
            for step, path in steps:
                meta = path.with_suffix(".json")
                info = json.loads(meta.read_text()) if meta.is_file() else {}
                with safe_open(str(path), framework="numpy") as f:
                    keys = set(f.keys())
                order = [k for k in info if k in keys] + sorted(keys - set(info))  # the json keeps model order
                store._deltas.setdefault(run_id, {})[step] = {k: path for k in order}
                store._info.setdefault(run_id, {})[step] = info
        return store
