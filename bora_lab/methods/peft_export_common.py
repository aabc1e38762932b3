"""What the PEFT exports share: the modules PEFT saves with the adapter, the base model's name, and
the notes appended to the README.md of an export (:mod:`bora_lab.methods.peft_export`,
:mod:`bora_lab.methods.peft_export_prompts`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .whole_model import head_module_names

README_TITLE = "## Exported by BoRA Lab"


def saved_modules(model: nn.Module, meta: dict[str, Any]) -> list[str] | None:
    """PEFT ``modules_to_save``: the trained head, and any new classifier (its random init is the run's)."""
    heads = set(meta["head_modules"]) | {n for n in head_module_names(model, "classifier")}
    return sorted({h.rsplit(".", 1)[-1] for h in heads}) or None


def set_base_name(config: Any, model: nn.Module, name: str | None) -> None:
    """Record the base model in the PEFT config, unless the model knows its own path: PEFT then records that
    path itself (and warns when given another name, such as BoRA Lab's offline ids ``minilm``)."""
    if name and not getattr(getattr(model, "config", None), "name_or_path", None):
        config.base_model_name_or_path = name


def write_notes(directory: Path, method: str, notes: list[str], base: str | None = None) -> None:
    """Append what the export is (and what base it needs) to the README.md PEFT wrote (or a new one)."""
    readme = directory / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    where = f" the base model (BoRA Lab model `{base}`)" if base else " the base model"
    lines = [README_TITLE, "", f"Method trained in BoRA Lab: `{method}`. Load with `peft.PeftModel.from_pretrained("
             f"base_model, this_folder)` on{where}, with the same number of layers and labels as the run.", "",
             *[f"- {n}" for n in notes], ""]
    readme.write_text(text.rstrip() + ("\n\n" if text else "") + "\n".join(lines), encoding="utf-8")
