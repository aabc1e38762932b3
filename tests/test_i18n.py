"""The page in English, 简体中文 and 繁體中文 (``bora_lab.ui.i18n``, Gradio's ``gr.I18n``).

Every key the UI code names exists in every locale, no text is empty, method names, identifiers and
formulas are the same in every language, the app builds with translated labels and launches with the
translations; in Chromium with a Chinese browser language the Compare tab is in Chinese (screenshot
``/tmp/bora_zh.png``), a Hong Kong browser gets Traditional Chinese and the header's picker switches.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gradio as gr
import pytest
from served_app import free_port, serve_app

from bora_lab.ui import i18n

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "bora_lab" / "ui"
CHINESE = ("zh-CN", "zh-TW")
KEY = re.compile(r'(?<![\w.])t\(\s*"([^"{}]+)"\s*\)')  # t("compare.run")
FAMILY = re.compile(r'(?<![\w.])t\(\s*f"([\w.]+)\{')  # t(f"field.{name}"): a family of keys drawn from the code
NAMES = ("LoRA", "DoRA", "BoRA", "VeRA", "DVoRA", "MoRA", "SBoRA", "PiSSA", "AdaLoRA", "LoRA2", "QLoRA", "AsyLoRA",
         "BitFit", "PEFT", "NF4", "BoRA Lab", "Hugging Face", "MiniLM", "GLUE")
PUNCT = "()[]{},;:.!?'\"（）［］，；：。！？、“”「」"
SAME = ("field.alpha", "memory.heads.help")  # "Alpha", "0 = hidden/128": the same in every language
MATH = re.compile(r"\S*[ΔΛλ·×→√⌊⌋ᵀ²ĪŪ̂⊙‖−]\S*")


def _ui_sources() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(UI.glob("*.py")) if p.name != "i18n.py"}


def _locale_files() -> dict[str, dict[str, str]]:
    return {loc: i18n.load_locale(loc) for loc in i18n.LOCALES}


def test_every_key_the_ui_names_exists_in_every_locale():
    used = {k for src in _ui_sources().values() for k in KEY.findall(src)}
    assert len(used) > 100 and {"compare.run", "tab.compare", "field.model"} <= used
    tables = i18n.tables()
    for loc in i18n.LOCALES:
        missing = sorted(used - set(tables[loc]))
        assert not missing, f"{loc} has no text for {missing} (bora_lab/ui/locales/{loc}.json)"
    generated = i18n.generated()
    for src in _ui_sources().values():  # each family of keys made from names is drawn from the code
        for prefix in FAMILY.findall(src):
            assert any(k.startswith(prefix) for k in generated), prefix
    for loc in CHINESE:  # a translation of a key nobody uses any more is stale
        assert not sorted(set(tables[loc]) - set(tables["en"])), loc


def test_settings_and_methods_come_from_the_code_and_fall_back_to_english(monkeypatch):
    from bora_lab.config import RunConfig
    from bora_lab.methods import registry

    en = i18n.tables()["en"]
    assert en["field.steps"] == RunConfig.__dataclass_fields__["steps"].metadata["label"]
    assert en["method.bora"] == registry.info("bora")["description"]
    assert not any(k.startswith(("field.", "option.", "method.")) for k in i18n.load_locale("en"))  # from the code
    assert i18n.text("field.steps", "zh-CN") == "步数" and i18n.text("field.steps", "zh-TW") == "步數"
    # a setting added later, not yet translated, shows in English (Gradio falls back to the "en" table)
    original = i18n.load_locale
    monkeypatch.setattr(i18n, "load_locale", lambda loc: {k: v for k, v in original(loc).items() if k != "field.steps"}
                        if loc != "en" else original(loc))
    i18n.tables.cache_clear()
    try:
        assert "field.steps" not in i18n.tables()["zh-CN"] and i18n.text("field.steps", "zh-CN") == "Steps"
    finally:
        i18n.tables.cache_clear()


def test_no_locale_has_an_empty_text():
    for loc, table in _locale_files().items():
        assert table, loc
        for key, text in table.items():
            assert isinstance(text, str) and text.strip(), f"{loc}: {key} is empty"
            assert "__i18n__" not in text and "}" not in key, f"{loc}: {key}"
    for key, text in i18n.generated().items():
        assert text.strip(), key


def _kept(en: str) -> set[str]:
    """What must read the same in every language: names, `code`, identifiers and formulas."""
    kept = {n for n in NAMES if re.search(rf"(?<![A-Za-z]){re.escape(n)}(?![a-z])", en)}
    kept |= set(re.findall(r"`[^`]+`", en))
    kept |= {w for w in re.findall(r"[A-Za-z0-9]*_[A-Za-z0-9_]+", en)}  # detach_norm, match_params, t_init
    kept |= {m.strip(PUNCT) for m in MATH.findall(en)} - {""}
    return kept


def test_method_names_identifiers_and_formulas_are_not_translated():
    tables = i18n.tables()
    assert {"s·BA", "LoRA"} <= _kept(tables["en"]["method.rslora"] + " " + tables["en"]["method.lora"])
    checked = 0
    for loc in CHINESE:
        for key, text in tables[loc].items():
            for token in _kept(tables["en"][key]):
                assert token in text, f"{loc}: {key} lost {token!r}: {text}"
                checked += 1
            assert re.search(r"[\u4e00-\u9fff]", text) or key in SAME, f"{loc}: {key} reads as English: {text}"
    assert checked > 300
    assert "LoRA" in tables["zh-CN"]["method.rslora"] and "BoRA" in tables["zh-TW"]["compare.md_view.help"]
    assert "W0 + s·BA" in tables["zh-CN"]["method.lora"] and "||PᵀP−I||²+||QQᵀ−I||²" in \
        tables["zh-TW"]["option.adalora.orth_reg"]


def test_traditional_is_not_simplified():
    cn, tw = i18n.load_locale("zh-CN"), i18n.load_locale("zh-TW")
    assert cn["compare.run"] == "运行" and tw["compare.run"] == "運行"
    assert sum(cn[k] != tw[k] for k in cn) > 0.8 * len(cn)


def test_the_app_builds_with_translated_labels_and_launches_with_the_translations(monkeypatch):
    from bora_lab.config import RunConfig
    from bora_lab.ui import app

    demo = app.build_demo(RunConfig(steps=2))
    config = demo.get_config_file()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}

    def key(text):
        match = re.search(r"__i18n__(\{[^}]*\})", str(text))
        return json.loads(match.group(1))["key"] if match else None

    assert key(by_id["bl-run"]["value"]) == "compare.run" and key(by_id["bl-field-steps"]["label"]) == "field.steps"
    assert key(by_id["bl-field-steps"]["info"]) == "field.steps.help"
    task_label = next(label for label, value in by_id["bl-field-task"]["choices"] if value == "fine_foods")
    assert task_label.startswith("fine_foods: ") and key(task_label) == "task.fine_foods"  # the name stays
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert {b.id for b in tabs} >= {"compare", "history", "lessons", "claims"}
    for tab in tabs:  # every tab title is translated, and the picker can retitle it (tab.<id>)
        assert key(tab.label) == f"tab.{tab.id}", (tab.id, tab.label)
    assert [tuple(c) for c in by_id["bl-lang"]["choices"]] == [(i18n.NAMES[loc], loc) for loc in i18n.LOCALES]
    seen = {}
    monkeypatch.setattr(demo, "launch", lambda **kw: seen.update(kw))
    monkeypatch.setattr(app.space, "prepare", lambda: None)
    monkeypatch.setattr(app.signal, "signal", lambda *a: None)
    app.launch(demo)
    assert isinstance(seen["i18n"], gr.I18n) and set(seen["i18n"].translations_dict) == set(i18n.LOCALES)


def test_the_method_notes_are_one_translated_line_per_method():
    from bora_lab.methods import registry
    from bora_lab.ui import compare_layout, form

    out = compare_layout.methods_changed(["lora", "bora"])
    names = registry.available()
    assert len(out) == 1 + len(names) + len(form.option_methods())
    assert out[0]["visible"] is False  # "select at least one method" hidden
    assert [u["visible"] for u in out[1:1 + len(names)]] == [m in ("lora", "bora") for m in names]
    assert compare_layout.methods_changed([])[0]["visible"] is True


# ------------------------------------------------------------------------------------------------
# In the browser (headless Chromium, as tests/test_browser.py)
# ------------------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("BORA_ZH_SCREENSHOT", "/tmp/bora_zh.png"))


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_a_chinese_browser_gets_the_page_in_chinese(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "BORA_LAB_RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}
    with serve_app(ROOT, env, tmp_path / "app.log", port) as url:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS + ["--lang=zh-CN"])
            tabs = lambda page: [t.inner_text() for t in page.get_by_role("tab").all()]  # noqa: E731

            # Simplified Chinese from the browser's language (navigator.language and Accept-Language)
            page = browser.new_page(locale="zh-CN", viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_function("() => document.querySelector('#bl-run')?.innerText.trim() === '运行'")
            assert tabs(page)[:2] == ["比较", "历史记录"]
            assert "步数" in page.inner_text("#bl-field-steps") and "方法" in page.inner_text("#bl-methods")
            page.wait_for_function("() => document.querySelector('#bl-lang input')?.value === '简体中文'")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            assert "LoRA" in page.inner_text("#bl-method-notes")  # method names as they are

            # a Hong Kong browser: Traditional Chinese (Gradio alone would show English)
            hk = browser.new_page(locale="zh-HK", viewport={"width": 1600, "height": 1000})
            hk.set_default_timeout(60_000)
            hk.goto(url)
            hk.wait_for_function("() => document.querySelector('#bl-run')?.innerText.trim() === '運行'")
            assert tabs(hk)[:3] == ["比較", "歷史記錄", "試一試"]

            # the picker: English now, every tab title too, and remembered on reload
            hk.click("#bl-lang input")
            hk.get_by_role("option", name="English").click()
            hk.wait_for_function("() => document.querySelector('#bl-run')?.innerText.trim() === 'Run'")
            assert tabs(hk)[:3] == ["Compare", "History", "Try it"]
            hk.reload()
            hk.wait_for_function("() => document.querySelector('#bl-lang input')?.value === 'English'")
            assert hk.inner_text("#bl-run").strip() == "Run"
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
