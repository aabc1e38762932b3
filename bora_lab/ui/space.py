"""Running as a Hugging Face Space: where runs are kept, and ZeroGPU.

* **Runs folder.** ``$BORA_LAB_RUNS`` when set; else, on a Space (``SPACE_ID`` set), the Space's
  persistent storage ``/data/runs`` when ``/data`` is writable, or a temporary folder (gone when the
  Space restarts); else ``./runs``. The page's footer says which (:func:`storage_note`).
* **ZeroGPU** (``SPACES_ZERO_GPU`` set by Hugging Face): the trainer runs inside the ``spaces``
  package's ``@spaces.GPU``, which lends a GPU to one call at a time in a forked process. ``spaces``
  is preinstalled there and imported only then. The fork cannot see the app's ``threading.Event``,
  so Stop reaches it through a file the child polls; its events come back pickled.
"""
from __future__ import annotations

import functools
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bora_lab.limits import limit, on_space

PERSISTENT = Path("/data")  # Hugging Face mounts a Space's persistent storage here


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


@functools.lru_cache(maxsize=1)
def _temporary_runs() -> Path:
    return Path(tempfile.mkdtemp(prefix="bora_lab_runs_"))


def runs_root() -> tuple[Path, str]:
    """``(folder, kind)``: where the app saves runs and ``"set"``, ``"persistent"``, ``"temporary"``
    or ``"local"`` (see the module docstring)."""
    if os.environ.get("BORA_LAB_RUNS"):
        return Path(os.environ["BORA_LAB_RUNS"]), "set"
    if not on_space():
        return Path("runs"), "local"
    if _writable(PERSISTENT):
        return PERSISTENT / "runs", "persistent"
    return _temporary_runs(), "temporary"


STORAGE_NOTES = {  # runs_root()'s kind -> the footer's line (translated on the page: footer.storage.<kind>)
    "persistent": "Runs are kept in persistent storage /data: they survive a restart of the Space.",
    "temporary": "Runs are kept in a temporary folder and vanish when the Space restarts "
                 "(add persistent storage to keep them).",
    "set": "Runs are kept in the folder set by BORA_LAB_RUNS.",
    "local": "Runs are kept in ./runs (set BORA_LAB_RUNS to change it).",
}


def storage_note() -> str:
    """One line for the page's footer: where this server keeps the runs (no server path beyond /data)."""
    return STORAGE_NOTES[runs_root()[1]]


def zero_gpu() -> bool:
    """Whether this is a ZeroGPU Space (Hugging Face sets ``SPACES_ZERO_GPU=true`` there)."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def gpu_seconds(cfg: Any) -> int:
    """ZeroGPU seconds to reserve for ``cfg``: the 2-core CPU estimate (a GPU is faster) plus 30 s
    to load, at least 60, at most ``BORA_LAB_MAX_GPU_S``; the cap when there is no estimate."""
    from bora_lab.engine.estimate import estimate

    cap = limit("gpu_s")
    seconds = estimate(cfg, "cpu")["seconds"]
    return cap if seconds is None else int(min(cap, max(60.0, seconds + 30.0)))


def _train_in_fork(cfg: Any, stop_file: str) -> Iterator[Any]:
    """The trainer, as ZeroGPU's forked worker runs it: Stop arrives as ``stop_file`` appearing."""
    from bora_lab.engine.trainer import compare

    cancel, done = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            if os.path.exists(stop_file):
                cancel.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield from compare(cfg, cancel)
    finally:
        done.set()


@functools.lru_cache(maxsize=1)
def _gpu_trainer() -> Callable[..., Iterator[Any]]:
    import spaces  # preinstalled on Spaces; imported only on ZeroGPU

    return spaces.GPU(duration=lambda cfg, stop_file: gpu_seconds(cfg))(_train_in_fork)


def prepare() -> None:
    """Before the server starts: on ZeroGPU, import ``spaces`` and decorate the trainer now, since
    ZeroGPU looks for ``@spaces.GPU`` functions when the app launches."""
    if zero_gpu():
        _gpu_trainer()


def on_device(compare_fn: Callable, default: Callable) -> Callable:
    """``compare_fn`` itself, or, on ZeroGPU and when it is the real trainer (``default``), the same
    comparison inside ``@spaces.GPU`` with Stop passed on to the forked worker."""
    if compare_fn is not default or not zero_gpu():
        return compare_fn
    trainer = _gpu_trainer()

    def run(cfg: Any, cancel: threading.Event) -> Iterator[Any]:
        stop_file = Path(tempfile.gettempdir()) / f"bora_lab_stop_{secrets.token_hex(8)}"
        ended = threading.Event()

        def pass_stop_on() -> None:
            while not ended.wait(0.5):
                if cancel.is_set():
                    stop_file.touch()
                    return

        threading.Thread(target=pass_stop_on, daemon=True).start()
        try:
            yield from trainer(cfg, str(stop_file))
        finally:
            ended.set()
            stop_file.unlink(missing_ok=True)

    return run
