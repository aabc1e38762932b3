"""The page in English, Simplified Chinese and Traditional Chinese, with Gradio's own ``gr.I18n``.

How Gradio 6 does it: ``gr.I18n(en={...}, **{"zh-CN": {...}})`` is handed to ``Blocks.launch(i18n=...)``
(``bora_lab.ui.app.launch`` does); a component takes ``i18n("key")`` (an ``I18nData``) wherever it takes
text: ``label``, ``info``, ``placeholder``, a Button's or a Markdown/HTML's value, a Tab's or an
Accordion's title, the labels of ``(label, value)`` choices, and values a handler returns. The browser
swaps the key for the text of its locale. One key per string at most (``"prefix " + t("key")`` works;
two keys in one string do not), no values interpolated, and Dataframe headers are never translated.

The locale: Gradio takes ``navigator.language`` when it is one of its own locales (``en``, ``zh-CN``,
``zh-TW``...), else English; its Settings panel (footer) switches it for the visit. The header's
language picker calls the same switch (``changeLocale``, exported by Gradio's frontend) and keeps the
choice in the browser; ``?lang=zh-TW`` in the address does the same. A Hong Kong or Macau browser
(``zh-HK``, ``zh-MO``, ``zh-Hant``), which Gradio would show in English, gets Traditional Chinese.

The tables: ``locales/<locale>.json``, one flat ``{key: text}`` each. The English of every ``RunConfig``
setting (``field.<name>``, ``field.<name>.help``), settings group (``group.<slug>``), method option
(``option.<method>.<name>``), method (``method.<name>``), task (``task.<name>``) and offline model
(``model.<name>``), and where runs are kept (``footer.storage.<kind>``) is taken from the code that defines it, so a new setting, option or method shows in
English until a locale names it. Method names and formulas stay as they are in every language.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import gradio as gr

LOCALES = ("en", "zh-CN", "zh-TW")
NAMES = {"en": "English", "zh-CN": "简体中文", "zh-TW": "繁體中文"}  # each language in its own words
LOCALE_DIR = Path(__file__).with_name("locales")
STORAGE_KEY = "bora_lab_lang"  # the browser's localStorage key of the visitor's choice
PICKER_LABEL = "Language · 语言 · 語言"  # the same words whatever the page's language


def load_locale(locale: str) -> dict[str, str]:
    """The ``{key: text}`` table of ``locales/<locale>.json``."""
    return json.loads((LOCALE_DIR / f"{locale}.json").read_text(encoding="utf-8"))


def group_key(group: str) -> str:
    """``"Training details"`` -> ``"group.training_details"``."""
    return "group." + re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_")


def generated() -> dict[str, str]:
    """English texts that live in the code: settings, their groups, method options, methods, tasks, models."""
    from bora_lab.config import GROUPS, settings
    from bora_lab.engine.loading import OFFLINE_MODELS
    from bora_lab.engine.tasks import TASKS
    from bora_lab.methods import registry

    from . import form, space

    out: dict[str, str] = {f"footer.storage.{kind}": note for kind, note in space.STORAGE_NOTES.items()}
    for f in settings():
        out[f"field.{f.name}"] = f.metadata["label"]
        out[f"field.{f.name}.help"] = f.metadata["help"]
    out.update({group_key(g): g for g in GROUPS if g})
    out.update({f"option.{s['key']}": s["help"] for s in form.option_specs() if s.get("help")})
    out.update({f"method.{m}": registry.info(m)["description"] for m in registry.available()})
    out.update({f"task.{name}": spec.description for name, spec in TASKS.items()})
    out.update({f"model.{key}": desc.split(" (PyPI")[0] for key, desc in OFFLINE_MODELS.items()})
    return out


@functools.lru_cache(maxsize=1)
def tables() -> dict[str, dict[str, str]]:
    """``{locale: {key: text}}``; English holds every key, the others what they translate."""
    return {loc: ({**generated(), **load_locale(loc)} if loc == "en" else load_locale(loc)) for loc in LOCALES}


@functools.lru_cache(maxsize=1)
def i18n() -> gr.I18n:
    """The app's ``gr.I18n`` (``launch(i18n=i18n())``)."""
    return gr.I18n(**tables())


def t(key: str) -> Any:
    """The translatable text of ``key`` for a component (an ``I18nData``).

    Raises:
        KeyError: ``key`` has no English text (a typo shows when the app is built, not on the page).
    """
    if key not in tables()["en"]:
        raise KeyError(f"no English text for the i18n key {key!r} (bora_lab/ui/locales/en.json)")
    return i18n()(key)


def text(key: str, locale: str = "en") -> str:
    """The plain text of ``key`` in ``locale`` (English where the locale has none), as the page shows it."""
    table = tables()
    return table.get(locale, {}).get(key) or table["en"][key]


# The language picker runs in the browser only: Gradio's ``changeLocale`` (the function behind its
# Settings panel's language menu) is found in the frontend module that exports it.
_SET_LOCALE = """
const KEY = "%(key)s", OK = %(ok)s;
const norm = (l) => {
  l = String(l || "").toLowerCase();
  if (l.startsWith("zh")) return /hant|-tw|-hk|-mo/.test(l) ? "zh-TW" : "zh-CN";
  return l.startsWith("en") ? "en" : null;
};
const setLocale = async (lang) => {
  const urls = performance.getEntriesByType("resource").map((e) => e.name)
    .concat([...document.querySelectorAll("script[src], link[rel=modulepreload]")].map((e) => e.src || e.href));
  for (const url of urls.filter((u) => /\\/core-[\\w-]+\\.js(\\?|$)/.test(u))) {
    try {
      const core = await import(url);
      if (typeof core.changeLocale === "function") { core.changeLocale(lang); retitleTabs(lang); return true; }
    } catch (e) { /* not Gradio's core module */ }
  }
  return false;
};
// Gradio keeps the titles of tabs not yet opened in the language the page loaded in: set them too
const retitleTabs = (lang) => {
  const titles = TITLES[lang] || TITLES.en;
  for (const tab of document.querySelectorAll("button[role=tab][data-tab-id]")) {
    const title = titles[tab.dataset.tabId], text = [...tab.childNodes].find((n) => n.nodeType === 3);
    if (title && text) text.nodeValue = title;
  }
};
"""


def _set_locale_js() -> str:
    """The shared start of the picker's scripts, with the tab titles of every locale."""
    table = tables()
    titles = {loc: {k[4:]: table[loc].get(k) or table["en"][k] for k in table["en"] if k.startswith("tab.")}
              for loc in LOCALES}
    return _SET_LOCALE % {"key": STORAGE_KEY, "ok": json.dumps(list(LOCALES))} + (
        f"const TITLES = {json.dumps(titles, ensure_ascii=False)};\n")


# On page load: ?lang=..., else the visitor's earlier choice, else the browser's Chinese variant; returns
# the picker's value.
_LOAD = """
  let asked = norm(new URLSearchParams(window.location.search).get("lang"));
  if (asked) { try { localStorage.setItem(KEY, asked); } catch (e) {} }
  else { try { asked = norm(localStorage.getItem(KEY)); } catch (e) {} }
  const browser = norm(navigator.language);
  const lang = OK.includes(asked) ? asked : browser;
  const gradios = OK.includes(navigator.language) ? navigator.language : browser === "en" ? "en" : null;
  if (lang && lang !== gradios) await setLocale(lang);  // Gradio chose the page's language by itself
  return lang || "en";
}"""

# The picker changed: switch now, remember it.
_PICK = """
  if (!OK.includes(lang)) return lang;
  try { localStorage.setItem(KEY, lang); } catch (e) {}
  await setLocale(lang);
  return lang;
}"""


def language_picker() -> gr.Dropdown:
    """The header's language menu (wire it with :func:`wire_picker`)."""
    return gr.Dropdown([(NAMES[loc], loc) for loc in LOCALES], value=None, label=PICKER_LABEL,
                       elem_id="bl-lang", scale=0, min_width=240)


def wire_picker(demo: gr.Blocks, picker: gr.Dropdown) -> None:
    """Apply ``?lang=`` or the remembered choice on load; switch when the visitor picks a language."""
    demo.load(None, None, picker, js="async () => {" + _set_locale_js() + _LOAD, show_progress="hidden")
    picker.input(None, picker, picker, js="async (lang) => {" + _set_locale_js() + _PICK, show_progress="hidden")
