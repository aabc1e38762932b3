"""The "Inside a layer" view: layer checkpoints from real runs, their figures, the tab's handlers, files on disk."""
from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from bora_lab import methods
from bora_lab.config import RunConfig
from bora_lab.methods import METHODS
from bora_lab.figures import layer_views as L
from bora_lab.engine import runstate
from bora_lab.record.layer_store import LayerStore, json_safe
from bora_lab.record import fold, save_results
from bora_lab.engine.trainer import checkpoint_steps, compare
from bora_lab.ui import tab_inside, visitor

LAYER_RUNS = ("lora-r4", "dora-r4", "bora-r4", "sbora_fa-r4", "qlora-r4", "mora-r4", "adalora-r4")
QUERY0 = "bert.encoder.layer.0.attention.self.query"


def tiny(**kw) -> RunConfig:
    base = dict(methods=["lora", "dora", "bora", "sbora_fa", "qlora", "mora", "adalora", "bitfit"], ranks=[4],
                num_layers=2, steps=6, batch_size=4, max_length=32, eval_samples=16, eval_every=6, analyze_every=2,
                layer_checkpoints=2, num_threads=1)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One real comparison of 8 methods on MiniLM cut to 2 layers (about 10 s on 2 cores), saved."""
    torch.manual_seed(0)
    events = list(compare(tiny()))
    done = fold(tiny(), events)
    folder = tmp_path_factory.mktemp("runs") / "20260101-000000-inside"
    save_results(done.results, folder, layers=done.layers)
    return events, done.layers, folder


def _live_session(events, folder) -> visitor.Session:
    """A session whose job replays ``events`` through the app's worker thread (which also saves them)."""
    session = visitor.Session()
    job = visitor.Job(tiny(), folder, compare_fn=lambda cfg, cancel: iter(events)).start()
    assert job.finished.wait(30)
    session.job = job
    return session


# ---------------------------------------------------------------- trainer: what is captured
def test_checkpoint_steps():
    assert checkpoint_steps(RunConfig(steps=150, analyze_every=10, layer_checkpoints=8)) == {
        0, 20, 40, 60, 80, 90, 110, 130, 150}
    steps = checkpoint_steps(RunConfig(steps=150, analyze_every=10, layer_checkpoints=8))
    assert len(steps) == 9 and {0, 150} <= steps and all(s % 10 == 0 for s in steps)
    assert checkpoint_steps(RunConfig(steps=7, analyze_every=2, layer_checkpoints=20)) == {0, 2, 4, 6, 7}
    assert checkpoint_steps(RunConfig(steps=150, layer_checkpoints=0)) == set()
    with pytest.raises(ValueError, match="layer_checkpoints"):
        RunConfig(layer_checkpoints=-1)


def test_layer_checkpoint_events(real):
    events, store, _ = real
    ckpts = [e for e in events if e.kind == "layer_checkpoint"]
    assert {e.run_id for e in ckpts} == set(LAYER_RUNS)  # bitfit is model-level: no weights
    for rid in LAYER_RUNS:
        mine = [e for e in ckpts if e.run_id == rid]
        assert [e.step for e in mine] == sorted(checkpoint_steps(tiny())) == [0, 4, 6]
        assert mine[0].w0 is not None and all(e.w0 is None for e in mine[1:])
        assert list(mine[0].deltas) == [QUERY0, QUERY0.replace(".0.", ".1.")]
        d0 = mine[0].deltas[QUERY0]
        assert d0.dtype == np.float16 and d0.shape == (384, 384) and not d0.any()  # ΔW at step 0 is zero
        assert np.abs(mine[-1].deltas[QUERY0]).max() > 0
        json.dumps(mine[-1].to_dict())  # the event's dict form is JSON
    assert store.run_ids() == list(LAYER_RUNS)


def test_module_subset_under_the_byte_budget(monkeypatch):
    monkeypatch.setattr(runstate, "LAYER_CHECKPOINT_BYTES", 384 * 384 * 2 * 2)  # room for one module
    evs = list(compare(tiny(methods=["lora"], steps=2, layer_checkpoints=1)))
    ck = [e for e in evs if e.kind == "layer_checkpoint"]
    assert len(ck) == 2 and all(list(e.deltas) == [QUERY0] for e in ck)


def test_inspect_is_json_for_every_layer_method():
    for name, cls in METHODS.items():
        if cls.kind != "layer":
            continue
        info = methods.wrap(torch.nn.Linear(24, 20), name, rank=2).inspect()
        assert set(info) >= {"rank", "magnitudes"}, name
        json.dumps(json_safe(info), allow_nan=False)


# ---------------------------------------------------------------- figures from the real runs
@pytest.mark.parametrize("run_id", LAYER_RUNS)
def test_figures_from_real_runs(real, run_id):
    _, store, _ = real
    figs = L.layer_figures(store, run_id, 6, QUERY0)
    assert set(figs) == set(L.FIGURES)
    for key in ("matrices", "norms", "spectrum"):
        assert isinstance(figs[key], go.Figure) and len(figs[key].data) > 0, key
    assert isinstance(figs["method"], go.Figure)
    heat = figs["matrices"].data[2]
    assert np.asarray(heat.z).shape == (96, 96)  # 384 x 384 block-averaged by 4
    assert "downsampled" in figs["matrices"].layout.title.text
    if run_id in ("lora-r4", "qlora-r4"):  # ΔW = s·B·A: rank <= r
        assert L.spectrum(store.delta(run_id, 6, QUERY0))["effective_rank"] <= 4 + 1e-6
        assert "chosen rank 4" in json.dumps(figs["spectrum"].to_plotly_json()["layout"])
    if run_id in ("dora-r4", "bora-r4"):
        names = {t.name for t in figs["norms"].data}
        assert "m_r (learned magnitude)" in names
        assert ("m_c (learned magnitude)" in names) == (run_id == "bora-r4")


def test_sbora_highlights_exactly_the_touched_columns(real):
    _, store, _ = real
    info = store.info("sbora_fa-r4", 6, QUERY0)
    touched = info["touched"]["indices"]
    assert info["touched"]["axis"] == "col" and len(touched) == 4
    delta = store.delta("sbora_fa-r4", 6, QUERY0).astype(np.float32)
    assert np.flatnonzero(np.abs(delta).sum(axis=0)).tolist() == touched  # ΔW lives in those columns only
    fig = L.layer_figures(store, "sbora_fa-r4", 6, QUERY0)["method"]
    highlighted = next(t for t in fig.data if t.name.startswith("touched"))
    assert list(highlighted.x) == touched
    assert "largest change outside them: 0" in fig.layout.title.text
    lines = [s.x0 for s in L.layer_figures(store, "sbora_fa-r4", 6, QUERY0)["matrices"].layout.shapes]
    assert sorted(lines) == touched


def test_method_specific_figures(real):
    _, store, _ = real
    nf4 = L.layer_figures(store, "qlora-r4", 6, QUERY0)["method"]
    codes = next(t for t in nf4.data if t.name == "weights per NF4 code value")
    assert len(codes.x) == 16 and min(codes.x) == -1.0 and max(codes.x) == 1.0
    assert "relative error" in nf4.layout.title.text and "4.127 bits/weight" in nf4.layout.title.text
    mora = L.layer_figures(store, "mora-r4", 6, QUERY0)["method"]
    r_hat = store.info("mora-r4", 6, QUERY0)["mora"]["r_hat"]
    assert r_hat == 54 and np.asarray(mora.data[0].z).shape == (r_hat, r_hat)
    spectrum = L.layer_figures(store, "mora-r4", 6, QUERY0)["spectrum"]
    assert "r̂ 54" in [a.text for a in spectrum.layout.annotations]
    budget = L.layer_figures(store, "adalora-r4", 6, QUERY0)["method"]
    assert budget.data[0].type == "heatmap" and len(budget.data[0].y) == 2  # one row per checkpointed layer
    lora = L.layer_figures(store, "lora-r4", 6, QUERY0)["method"]
    assert not lora.data and lora.layout.annotations  # a message, not an empty plot


def test_block_average_and_downsampling_note():
    mat = np.arange(12, dtype=np.float32).reshape(3, 4)
    small, rows, cols, down = L.block_average(mat, max_cells=2)
    assert down and small.tolist() == [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9) / 2, (10 + 11) / 2]]
    assert rows.tolist() == [0.5, 2.0] and cols.tolist() == [0.5, 2.5]
    rng = np.random.default_rng(0)
    fig = L.matrices_figure(rng.normal(size=(200, 300)), np.zeros((200, 300)), "big")
    assert "downsampled" in fig.layout.title.text and max(np.asarray(fig.data[0].z).shape) <= L.MAX_CELLS
    small_fig = L.matrices_figure(rng.normal(size=(40, 30)), np.zeros((40, 30)), "small")
    assert "downsampled" not in small_fig.layout.title.text


def test_spectrum_matches_the_torch_analysis():
    from bora_lab.analysis.weights import effective_rank

    d = torch.randn(60, 3) @ torch.randn(3, 50)
    ours, ref = L.spectrum(d.numpy()), effective_rank(d)
    assert ours["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-4)  # torch: float32 SVD
    assert ours["rank_at_99"] == ref["rank_at_99"] <= 3
    assert L.spectrum(np.zeros((5, 4)))["effective_rank"] == 0.0


# ---------------------------------------------------------------- disk and the tab
def test_layer_checkpoints_reload_from_disk(real):
    _, store, folder = real
    assert (folder / "layers" / "sbora_fa-r4" / "w0.safetensors").is_file()
    assert sorted(p.name for p in (folder / "layers" / "lora-r4").iterdir()) == [
        "step_0.json", "step_0.safetensors", "step_4.json", "step_4.safetensors", "step_6.json",
        "step_6.safetensors", "w0.safetensors"]
    disk = LayerStore.load(folder)
    assert sorted(disk.run_ids()) == sorted(store.run_ids())
    for rid in store.run_ids():
        assert disk.steps(rid) == store.steps(rid) and disk.modules(rid) == store.modules(rid)
        assert np.array_equal(disk.w0(rid, QUERY0), store.w0(rid, QUERY0))
        assert np.array_equal(disk.delta(rid, 6, QUERY0), store.delta(rid, 6, QUERY0))
    assert disk.info("sbora_fa-r4", 6, QUERY0)["touched"] == store.info("sbora_fa-r4", 6, QUERY0)["touched"]
    assert LayerStore.load(folder / "nowhere").run_ids() == []


def test_tab_live_and_saved(real, tmp_path, monkeypatch):
    monkeypatch.setenv("BORA_LAB_RUNS", str(tmp_path))  # the History tab's folder
    events, _, _ = real
    session = _live_session(events, tmp_path / "20260101-000001-live")
    assert session.job.saved and (session.job.out_dir / "layers" / "bora-r4" / "step_6.json").is_file()
    session.run_dirs.append(session.job.out_dir)
    values = [v for _, v in tab_inside.source_choices(session)]
    assert values[0] == tab_inside.LIVE and session.job.out_dir.name in values
    for source in (tab_inside.LIVE, session.job.out_dir.name):
        runs, modules, slider, status, *figs = tab_inside.pick_source(session, source)
        assert runs["value"] == "lora-r4" and modules["value"] == QUERY0 and slider["value"] == 6
        assert "**lora-r4**" in status and all(isinstance(f, go.Figure) for f in figs)
        status, *figs = tab_inside.render(session, source, "sbora_fa-r4", QUERY0, 5.2)  # snaps to step 6
        assert "step 6" in status and figs[3].data
    frames = list(tab_inside.play(session, tab_inside.LIVE, "bora-r4", QUERY0))
    assert [f[0]["value"] for f in frames] == [0, 4, 6]


def test_tab_says_not_applicable_for_a_model_level_method(real, tmp_path):
    events, _, _ = real
    session = _live_session(events, tmp_path / "20260101-000002-live")
    status, *figs = tab_inside.render(session, tab_inside.LIVE, "bitfit", None, None)
    assert status.startswith("Not applicable: bitfit is a model-level method")
    for fig in figs:
        assert not fig.data and "model-level" in fig.layout.annotations[0].text
    runs = tab_inside.pick_source(session, tab_inside.LIVE)[0]
    assert ("bitfit (no layer checkpoints)", "bitfit") in runs["choices"]


def test_app_has_the_tab():
    from bora_lab.ui.app import build_demo

    config = build_demo(RunConfig(steps=2)).get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"bl-inside-source", "bl-inside-step", "bl-inside-play", "bl-inside-matrices", "bl-inside-method"} <= ids
