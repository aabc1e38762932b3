"""Teaching views: method cards, the memory calculator, lessons, and their Gradio tabs.

Card counts are checked against ``trainable_summary`` of a real (tiny, randomly initialised) BERT
with every registered method applied, so a new method is covered without editing this file. The
memory calculator reproduces the worked examples of the lecture notes 'Parameter-Efficient
Fine-Tuning' (EE4016): QLoRA and full fine-tuning memory. Lessons round-trip and bad ones fail
with a message naming the field.
"""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import gradio as gr
import plotly.graph_objects as go
import pytest
from transformers import BertConfig, BertForSequenceClassification

from bora_lab import methods
from bora_lab.config import RunConfig
from bora_lab.methods import registry
from bora_lab.figures.shapes import shapes_figure
from bora_lab.figures.memory_bars import memory_figure
from bora_lab.teach import cards
from bora_lab.teach import lessons as L
from bora_lab.teach import memory as M
from bora_lab.teach.skeleton import count_params, skeleton

TINY = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 32, "num_labels": 2}


@pytest.fixture(scope="module")
def tiny_config():
    cfg = BertConfig(**TINY)
    cfg.architectures = ["BertForSequenceClassification"]
    return cfg


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    return BertForSequenceClassification(tiny_config)


# -------------------------------------------------------------------------------- method cards
@pytest.mark.parametrize("name", registry.available())
def test_card_counts_equal_real_model(name, tiny_config, tiny_model):
    """The card's trainable count (skeleton, no weights) equals trainable_summary of the real model."""
    real = methods.apply(copy.deepcopy(tiny_model), name, rank=4, alpha=8.0)
    card = cards.method_card(name, 32, 64, 4, alpha=8.0, model=tiny_config)
    assert card["trainable"] == methods.trainable_summary(real)["trainable"]
    assert card["model_total_params"] == sum(p.numel() for p in tiny_model.parameters())
    for key in ("formula", "paper", "source", "magnitude_axis", "mergeable"):
        assert key in card
    assert card["forward"]["code"].lstrip().startswith(("def ", "@"))
    assert card["tensors"], "a card lists the method's tensors"
    if card["kind"] == "layer":  # the tensors the constructor made agree with the analytic count
        assert sum(t["numel"] for t in card["tensors"] if t["trainable"]) == card["params_per_layer"]
        assert card["n_layers_wrapped"] == len(methods.find_targets(tiny_model, methods.default_targets(tiny_model)))
    md = cards.card_markdown(card)
    assert name in md and "$$" in md or not card["formula"]
    assert isinstance(shapes_figure(card), go.Figure)


def test_card_shapes_and_quick_count():
    card = cards.method_card("bora", d_in=384, d_out=1536, rank=8, model_total_params=22_713_986, n_layers_wrapped=36)
    shapes = {t["name"]: t["shape"] for t in card["tensors"]}
    assert shapes["lora_A"] == [8, 384] and shapes["lora_B"] == [1536, 8]  # A: [r, in], B: [out, r]
    assert shapes["m_r"] == [1536] and shapes["m_c"] == [384]  # rows = output features, columns = input
    assert card["params_per_layer"] == 8 * (384 + 1536) + 384 + 1536
    assert card["trainable"] == 36 * card["params_per_layer"]
    assert card["percent_of_model"] == pytest.approx(100 * card["trainable"] / 22_713_986)
    assert "adapter_forward" in card["forward"]["qualname"]
    with pytest.raises(ValueError, match="rank"):
        cards.method_card("lora", 16, 16, 32)


def test_minilm_table_matches_bora_table1_style_counts():
    """LoRA r=8 on MiniLM (q, k, v, dense in 6 layers + pooler/classifier), counted by hand."""
    rows = {r["method"]: r for r in cards.cards_table("minilm", rank=8)}
    per_layer = 4 * 8 * (384 + 384) + 8 * (384 + 1536) * 2
    head = 384 * 384 + 384 + 384 * 2 + 2
    assert rows["lora"]["trainable"] == 6 * per_layer + head
    assert rows["lora"]["% of model"] == pytest.approx(100 * rows["lora"]["trainable"] / 22_713_986, abs=1e-4)
    assert set(rows) == set(registry.available())
    assert [c["d_out"] for c in cards.layer_choices("minilm")] == [384, 384, 384, 384, 1536, 384]


def test_skeleton_is_meta_and_counts_big_models_fast():
    spec = M.spec_from_sizes(8_030_261_248, 32, 4096, 128256, n_heads=32, n_kv_heads=8)
    assert spec.config.intermediate_size == 14336  # Llama-3-8B's MLP width, solved from its size
    net = skeleton(spec.config)
    assert all(p.device.type == "meta" for p in net.parameters())
    lora = count_params(net, "lora", rank=16)
    assert lora.trainable == 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)  # q, o + k, v (GQA)


# -------------------------------------------------------------------------------- memory calculator
@pytest.fixture(scope="module")
def llama8b():
    return M.spec_from_sizes(8e9, 32, 4096, 128256, n_heads=32, n_kv_heads=8, name="Llama-3-8B")


def test_lecture_qlora_arithmetic(llama8b):
    """Lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), QLoRA section, 'How does QLoRA reduce
    memory to 14GB?': 4 GB base, 8.5 B per trainable, 0.408 GB."""
    b = M.estimate_memory(llama8b, "lora", rank=16, precision="nf4", optimizer="adamw_8bit",
                          adapter_precision="bf16", grad_precision="fp32", trainable_params=48_000_000,
                          batch_size=1, seq_len=512, quantize_all=True)  # the lecture quantises all 8 B
    assert b["details"]["weights_raw"] == pytest.approx(4.0e9)  # 8 billion x 0.5 bytes
    assert b["details"]["quant_constant_bits"] == pytest.approx(0.127, abs=1e-3)  # double quantisation
    assert b["components"]["weights"] == pytest.approx(8e9 * 4.127 / 8, rel=1e-3)
    assert b["per_trainable_bytes"] == {"base weight": 0.5, "trainable weight": 2.0, "gradient": 4.0, "optimizer": 2.0}
    assert b["per_trainable_total"] == 8.5
    assert b["per_trainable_total"] * b["params"]["trainable"] == pytest.approx(0.408e9)  # "≈ 0.408 GB"
    training = b["total"] - b["components"]["activations"]
    assert 4e9 < training < 5e9  # "about 4-5 GB (depending on the number of trainable parameters)"
    no_dq = M.estimate_memory(llama8b, "lora", precision="nf4", trainable_params=48_000_000, double_quant=False)
    assert no_dq["details"]["quant_constant_bits"] == pytest.approx(0.5)  # 32/64 bits before double quant


def test_realistic_nf4_keeps_embeddings_in_16_bit():
    """bitsandbytes-style: only the blocks' Linear weights in NF4; Llama-3-8B loads in about 5.7 GB."""
    spec = M.spec_from_sizes(8_030_261_248, 32, 4096, 128256, n_heads=32, n_kv_heads=8)
    b = M.estimate_memory(spec, "lora", rank=16, precision="nf4", batch_size=1, seq_len=1)
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert b["details"]["quantized_params"] == linear
    rest = 8_030_261_248 - linear
    assert b["components"]["weights"] == pytest.approx(linear * (4 + 0.126953125) / 8 + rest * 2)
    assert 5.6e9 < b["components"]["weights"] < 5.8e9


def test_lecture_full_finetuning_arithmetic(llama8b):
    """Lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), 'Naively Fine-Tuning LLaMA-3-8B takes
    128GB of RAM!': 32 GB to load in fp32; 16 B per parameter (2 + 2 + 12) = 128 GB to fine-tune in 16-bit."""
    fp32 = M.estimate_memory(llama8b, "lora", precision="fp32", batch_size=1, seq_len=1)
    assert fp32["components"]["weights"] == pytest.approx(32e9, rel=1e-3)
    full = M.estimate_memory(llama8b, "full_model", precision="bf16", optimizer="adamw", batch_size=1, seq_len=1)
    assert full["per_trainable_bytes"] == {"base weight": 0.0, "trainable weight": 2.0, "gradient": 2.0, "optimizer": 12.0}
    state = full["total"] - full["components"]["activations"]
    assert state == pytest.approx(128e9, rel=1e-3)


def test_activation_formula_and_checkpointing():
    spec = M.spec_from_model("minilm")
    s, b, h, a, layers = 128, 16, 384, 12, 6
    plain = M.estimate_memory(spec, "lora", precision="bf16", batch_size=b, seq_len=s)
    per_layer = s * b * h * (34 + 5 * a * s / h)  # Korthikanti et al. 2022, 16-bit
    assert plain["components"]["activations"] == pytest.approx(layers * per_layer)
    fp32 = M.estimate_memory(spec, "lora", precision="fp32", batch_size=b, seq_len=s)
    assert fp32["components"]["activations"] == pytest.approx(2 * layers * per_layer)
    ckpt = M.estimate_memory(spec, "lora", precision="bf16", batch_size=b, seq_len=s, gradient_checkpointing=True)
    assert ckpt["components"]["activations"] == pytest.approx(layers * 2 * s * b * h + per_layer)
    flash = M.estimate_memory(spec, "lora", precision="bf16", batch_size=b, seq_len=s, flash_attention=True)
    assert flash["components"]["activations"] == pytest.approx(layers * s * b * h * 34)
    assert plain["params"]["trainable"] == 480386  # counted on the skeleton, as the card


def test_memory_errors_defaults_and_figure(llama8b):
    with pytest.raises(ValueError, match="precision"):
        M.estimate_memory(llama8b, "lora", precision="fp8")
    with pytest.raises(ValueError, match="optimizer"):
        M.estimate_memory(llama8b, "lora", optimizer="adam_magic")
    with pytest.raises(ValueError, match="too few"):
        M.spec_from_sizes(1e6, 32, 4096, 128256)
    if "qlora" in registry.METHODS:
        assert M.method_defaults("qlora")["precision"] == "nf4"
    assert M.method_defaults("lora") == {}
    b = M.estimate_memory("minilm", "lora", rank=8, batch_size=16, seq_len=64)
    fig = memory_figure(b, measured_mb=900.0, measured_label="process peak RSS")
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == len(M.COMPONENTS) + 1 and fig.data[-1].name == "process peak RSS"
    many = memory_figure({"lora": b, "full": M.estimate_memory("minilm", "full_model")})
    assert list(many.data[0].x) == ["lora", "full"]
    assert M.summary_rows(b)[-1][0] == "total"


# -------------------------------------------------------------------------------- lessons
def test_builtin_lessons_validate_and_fit_a_cpu_class():
    found = L.builtin_lessons()
    ids = [les["id"] for les in found]
    assert len(ids) == len(set(ids)) >= 6
    for wanted in ("lora-couples", "dora-asymmetric", "magnitude-axis", "rank-sweep", "sbora-columns",
                   "mora-high-rank", "qlora-memory"):
        assert wanted in ids
    for les in found:
        s = les["settings"]
        cfg = L.lesson_config(les)
        if s["model"] == "minilm":  # a class on 2-core laptops: small steps, batches and sequences
            assert cfg.steps <= 150 and cfg.batch_size <= 16 and cfg.max_length <= 128 and cfg.task == "fine_foods"
        else:  # the synthetic weight-recovery tasks run in seconds on their toy linear layer
            assert s["model"] == "linear" and s["task"].startswith("synthetic_")
        assert les["view"] in L.VIEWS and les["predict"] and les["look_for"]
        assert isinstance(cfg, RunConfig) and cfg.methods
    assert L.get_lesson("rank-sweep")["settings"]["ranks"] == [1, 2, 4, 8]
    assert L.get_lesson("no-such-lesson") is None


def test_lesson_round_trip(tmp_path):
    cfg = RunConfig(methods=["lora", "bora"], ranks=[4, 8], steps=40, num_layers=2, target_modules=["query"],
                    method_options={"bora": {"detach_norm": False}})
    text = L.save_lesson(cfg, "My lesson: BoRA!", summary="s", predict="p", look_for="l", view="md")
    lesson = L.load_lesson(text)
    assert lesson["id"] == "my-lesson-bora"
    assert L.lesson_config(lesson) == cfg
    path = tmp_path / "lesson.json"
    path.write_text(text)
    assert L.load_lesson(path) == lesson
    subset = L.load_lesson(L.save_lesson({"methods": ["dora"], "steps": 30}, "t", lesson_id="x1"))
    assert subset["settings"] == {"methods": ["dora"], "steps": 30}
    assert L.lesson_config(subset) == RunConfig(methods=["dora"], steps=30)


def _lesson(**changes):
    base = json.loads(L.save_lesson({"methods": ["lora"], "steps": 20}, "T", "s", "p", "l", "loss", "t1"))
    base.update(changes)
    return base


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON: .* line 1"),
    ('["a", "list"]', "must be a JSON object"),
    (json.dumps(_lesson(script="rm -rf /")), "unknown lesson field 'script'"),
    (json.dumps({k: v for k, v in _lesson().items() if k != "title"}), "'title' is missing"),
    (json.dumps(_lesson(settings={"steps": "ten"})), r"'settings.steps' must be a whole number, got str 'ten'"),
    (json.dumps(_lesson(settings={"steps": True})), r"'settings.steps' must be a whole number"),
    (json.dumps(_lesson(settings={"lr": "fast"})), r"'settings.lr' must be a finite number"),
    (json.dumps(_lesson(settings={"ranks": [8, "x"]})), r"'settings.ranks\[1\]' must be a whole number"),
    (json.dumps(_lesson(settings={"methods": "lora"})), r"'settings.methods' must be a list"),
    (json.dumps(_lesson(settings={"epochs": 3})), r"'settings.epochs' is not a RunConfig field"),
    (json.dumps(_lesson(settings={"ranks": [0]})), r"'settings' is invalid: ranks must be >= 1, got 0"),
    (json.dumps(_lesson(settings={"methods": ["Bad Name"]})), r"'settings.methods\[0\]' .* is not a method name"),
    (json.dumps(_lesson(view="3d")), r"'view' = '3d' is not one of"),
    (json.dumps(_lesson(settings={"method_options": {"dora": 1}})), r"'settings.method_options.dora' must be an object"),
    (json.dumps(_lesson(id="../etc/passwd")), r"'id' = '../etc/passwd' must be"),
    (json.dumps(_lesson(title=7)), r"'title' must be a string"),
    ('{"id": NaN}', "NaN"),
])
def test_malformed_lessons_give_clear_errors(bad, message):
    with pytest.raises(L.LessonError, match=message):
        L.load_lesson(bad)


def test_lesson_limits_and_unknown_methods(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(" " * (L.MAX_BYTES + 1))
    with pytest.raises(L.LessonError, match="big.json: .*under 64 KB"):
        L.load_lesson(big)
    with pytest.raises(L.LessonError, match="cannot read"):
        L.load_lesson(tmp_path / "missing.json")
    future = L.load_lesson(_lesson(settings={"methods": ["lora", "method_from_the_future"]}))  # validates
    assert L.missing_methods(future) == ["method_from_the_future"]
    assert L.lesson_config(future).methods == ["lora"]
    with pytest.raises(L.LessonError, match="none of this lesson's methods"):
        L.lesson_config(L.load_lesson(_lesson(settings={"methods": ["method_from_the_future"]})))


# -------------------------------------------------------------------------------- Gradio tabs
def test_tabs_build_and_fill_compare_widgets():
    from bora_lab.ui import form
    from bora_lab.ui.tab_cards import build_cards_tab, render_card
    from bora_lab.ui.tab_lessons import (
        build_lessons_tab,
        lesson_from_url,
        lesson_markdown,
        lesson_updates,
    )
    from bora_lab.ui.tab_memory import build_memory_tab, estimate

    keys = form.input_keys()
    with gr.Blocks() as demo:
        with gr.Tabs():
            with gr.Tab("Compare"):
                widgets = {k: gr.Textbox(label=k) for k in keys}
            build_lessons_tab(widgets)
            build_cards_tab()
            build_memory_tab()
    assert {"lessons", "cards", "memory"} <= {b.id for b in demo.blocks.values() if isinstance(b, gr.Tab)}
    lesson = L.get_lesson("rank-sweep")
    values = dict(zip(keys, lesson_updates(lesson, keys)))
    assert values["ranks"]["value"] == ["1", "2", "4", "8"] and values["steps"]["value"] == 600
    assert values["task"]["value"] == "synthetic_rank" and values["max_length"]["value"] == RunConfig().max_length
    assert values["lr"]["value"] == lesson["settings"]["lr"]
    assert "predict" in lesson_markdown(lesson).lower() and "?lesson=rank-sweep" in lesson_markdown(lesson)
    assert lesson_from_url(SimpleNamespace(query_params={"lesson": "rank-sweep"}))["id"] == "rank-sweep"
    assert lesson_from_url(SimpleNamespace(query_params={"lesson": "nope"})) is None
    assert lesson_from_url(SimpleNamespace(query_params={})) is None and lesson_from_url(None) is None
    md, fig, table = render_card("dora", "minilm", "bert.encoder.layer.*.intermediate.dense|384|1536", "8")
    assert "per output feature" in md and isinstance(fig, go.Figure) and len(table) == len(registry.available())
    assert render_card("lora", "minilm", None, "0")[0].startswith("**Cannot")
    fig, rows, notes = estimate("typed sizes", "", 0, "Llama-3-8B", 8e9, 32, 4096, 128256, 32, 8, "lora", 16, "nf4",
                                "adamw_8bit", 1, 512, False, False, 48e6, "bf16", "fp32", "auto", True, 0, "")
    assert isinstance(fig, go.Figure) and rows[-1][0] == "total" and "8.5 B" in notes
    assert math.isclose(rows[0][1], 4.127, rel_tol=1e-3)  # weights, GB


@pytest.mark.browser
def test_lesson_from_url_preselects_settings_in_browser():
    """``?lesson=rank-sweep`` opens the lesson and fills the Compare widgets (headless Chromium)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from bora_lab.ui.tab_lessons import build_lessons_tab

    with gr.Blocks() as demo:
        with gr.Tabs():
            with gr.Tab("Compare"):
                widgets = {"steps": gr.Number(150, label="Steps", elem_id="t-steps"),
                           "methods": gr.CheckboxGroup(registry.available(), value=["lora", "dora", "bora"],
                                                       label="Methods", elem_id="t-methods"),
                           "model": gr.Textbox("x", label="Model", elem_id="t-model")}
            build_lessons_tab(widgets)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-quic", "--no-first-run", "--disable-sync"])
            page = browser.new_page()
            page.goto(url.rstrip("/") + "/?lesson=rank-sweep")
            page.wait_for_function("() => document.querySelector('#t-steps input')?.value === '600'", timeout=60000)
            assert page.locator("#t-model textarea, #t-model input").first.input_value() == "linear"
            assert page.locator("#t-methods input:checked").count() == 1  # only lora
            page.get_by_role("tab", name="Lessons").click()
            page.locator("#bl-lesson-text").get_by_text("Rank sweep").wait_for(timeout=30000)
            browser.close()
    finally:
        demo.close()


def test_memory_tab_reads_measured_peak_of_saved_runs(tmp_path, monkeypatch):
    from bora_lab.ui.tab_memory import from_saved_run, saved_runs

    monkeypatch.setenv("BORA_LAB_RUNS", str(tmp_path))
    monkeypatch.setenv("BORA_LAB_SHARED_HISTORY", "1")
    run_dir = tmp_path / "20240101-000000-fine_foods-qlora"
    run_dir.mkdir()
    results = {"config": {"model": "minilm", "num_layers": 2, "batch_size": 16, "max_length": 64}, "device": "cpu",
               "peak_mem_kind": "process_peak_rss",
               "runs": [{"run_id": "qlora-r8", "method": "qlora", "rank": 8, "peak_mem_mb": 978.1, "summary": {}},
                        {"run_id": "lora-r8", "method": "lora", "rank": 8, "peak_mem_mb": None, "summary": {}}]}
    (run_dir / "results.json").write_text(json.dumps(results))
    choices = saved_runs(None)
    assert [c[1] for c in choices] == [f"{run_dir}|qlora-r8"]  # runs without a measured peak are left out
    values = from_saved_run(choices[0][1])
    assert values[1:6] == ["minilm", 2, "qlora", 8, registry.METHODS.get("qlora") and "nf4" or "fp32"]
    assert values[-2:] == [978.1, "process_peak_rss"]
    assert all(isinstance(v, dict) for v in from_saved_run("/etc|passwd"))  # only listed runs are opened
    monkeypatch.setenv("BORA_LAB_SHARED_HISTORY", "0")
    assert saved_runs(None) == []
