"""The example notebook runs top to bottom, offline, and shows plotly figures (so it never rots)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "lora_dora_bora.ipynb"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _kernel() -> str:
    """The ``python3`` kernel (ipykernel); registered for this user if no kernelspec exists yet."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)
    return "python3"


def _outputs(nb, kind: str) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == kind]


def test_notebook_runs_offline_top_to_bottom():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not _outputs(nb, "display_data") and not _outputs(nb, "stream"), "commit the notebook without outputs"
    t0 = time.perf_counter()
    # Run from examples/, as a student opening the file would; nbclient raises on the first failing cell.
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name=_kernel(),
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    elapsed = time.perf_counter() - t0
    assert not _outputs(nb, "error")
    figures = [o for o in _outputs(nb, "display_data") + _outputs(nb, "execute_result") if PLOTLY_MIME in o["data"]]
    assert len(figures) >= 6, "the notebook shows its plotly figures inline"
    assert all(f["data"][PLOTLY_MIME]["data"] for f in figures)  # no empty plots
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    for run_id in ("lora-r4", "dora-r4", "bora-r4"):
        assert f"{run_id}: asymmetry ratio" in text
    assert "done in" in text and elapsed < 240
    assert "dora_col-r1: " in text and "better than lora-r1" in text  # the seeds section's known answer
    assert "rslora-r1: " in text and "not distinguishable from lora-r1" in text
