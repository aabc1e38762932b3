"""Tests for bora_lab.engine.loading: real pretrained weights, loaded offline.

The SmolLM2 test converts a GGUF file (~20 s) into a temporary cache and is marked ``slow``; it
runs only when selected with ``-m slow`` or with ``BORA_LAB_SLOW=1`` set.
"""

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from bora_lab.engine import loading as models
from bora_lab.engine.loading import (
    OFFLINE_MODELS,
    LoadedModel,
    ModelLoadError,
    default_analysis_module,
    default_targets,
    list_layers,
    load_model,
    model_summary,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every test runs as on a machine with no hub access."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # module fixtures run before the autouse one
    return load_model("minilm", "classification", num_labels=3, num_layers=2, seed=0)


def test_offline_registry_lists_both_models():
    assert set(OFFLINE_MODELS) == {"minilm", "smollm2"}
    assert all(isinstance(v, str) and v for v in OFFLINE_MODELS.values())


def test_minilm_loads_truncated_with_real_weights(minilm):
    model = minilm.model
    assert (minilm.model_id, minilm.kind) == ("minilm", "classification")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    assert minilm.layer_pattern == "bert.encoder.layer"
    # The kept blocks carry the checkpoint's weights, not a fresh init.
    path = models._minilm_folder() / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        expected = f.get_tensor("encoder.layer.1.attention.self.query.weight")  # (384, 384)
    torch.testing.assert_close(model.bert.encoder.layer[1].attention.self.query.weight.detach(), expected)
    summary = model_summary(model)
    assert summary["n_layers"] == 2 and summary["hidden_size"] == 384
    assert summary["architecture"] == "BertForSequenceClassification"
    assert summary["n_params"] == sum(p.numel() for p in model.parameters())


def test_minilm_defaults_and_head(minilm):
    assert minilm.head_modules == ["bert.pooler", "classifier"]
    assert minilm.target_modules_default == ["query", "key", "value", "dense"]
    assert minilm.analysis_module_default == "query"
    assert default_targets(minilm.model) == minilm.target_modules_default
    assert default_analysis_module(minilm.model) == "query"
    assert minilm.model.classifier.out_features == 3


def test_minilm_forward_with_padding(minilm):
    tok = minilm.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["a short one", "a somewhat longer sentence to pad against"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = minilm.model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_list_layers_on_bert(minilm):
    layers = list_layers(minilm.model, "query")
    assert layers == [
        (0, "bert.encoder.layer.0.attention.self.query"),
        (1, "bert.encoder.layer.1.attention.self.query"),
    ]
    dense = list_layers(minilm.model, "dense")
    assert len(dense) == 6 and not any("pooler" in name for _, name in dense)  # 3 per block
    assert list_layers(minilm.model, "attention.self.key")[1] == (1, "bert.encoder.layer.1.attention.self.key")


def test_head_init_depends_on_seed_only(minilm):
    rng_before = torch.get_rng_state()
    same = load_model("minilm", "classification", num_labels=3, num_layers=1, seed=0)
    other = load_model("offline:all-MiniLM-L6-v2", "classification", num_labels=3, num_layers=1, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    # Same seed -> same head, even with a different layer count; the pretrained pooler is untouched.
    assert torch.equal(same.model.classifier.weight, minilm.model.classifier.weight)
    assert not torch.equal(other.model.classifier.weight, minilm.model.classifier.weight)
    assert torch.equal(other.model.bert.pooler.dense.weight, minilm.model.bert.pooler.dense.weight)
    assert other.model_id == "minilm"


def test_regression_head():
    loaded = load_model("minilm", "regression", num_layers=1)
    assert loaded.model.config.num_labels == 1 and loaded.model.config.problem_type == "regression"
    assert loaded.kind == "regression"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"model_id": "minilm", "task_kind": "causal_lm"}, "encoder"),
        ({"model_id": "minilm", "task_kind": "translation"}, "task kind"),
        ({"model_id": "minilm", "task_kind": "classification", "num_layers": 7}, "it has 6"),
        ({"model_id": "minilm", "task_kind": "regression", "num_labels": 3}, "num_labels must be 1"),
    ],
)
def test_bad_requests_raise_model_load_error(kwargs, needle):
    with pytest.raises(ModelLoadError, match=needle):
        load_model(**kwargs)


@pytest.mark.parametrize("model_id", ["no-such-org/definitely-not-a-model-3f9c", "roberta-base-nonexistent-xyz"])
def test_unknown_id_offline_fails_fast_and_clearly(model_id):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(model_id, "classification")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert f"'{model_id}'" in message and "offline" in message and "minilm, smollm2" in message


def test_unreachable_hub_is_detected_without_offline_flag(monkeypatch):
    """No HF_HUB_OFFLINE, but the network probe fails: still a quick, clear error."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr(models.socket, "create_connection", refuse)
    assert models.hub_reachable() is False
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model("no-such-org/definitely-not-a-model-3f9c", "classification")


def test_stale_cache_tmp_folders_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = tmp_path / f".tmp-{models._SMOLLM2_CACHE}-{int(dead.stdout)}-abc123"
    live = tmp_path / f".tmp-{models._SMOLLM2_CACHE}-{os.getpid()}-def456"
    stale.mkdir()
    live.mkdir()
    models._remove_stale_tmp(tmp_path)
    assert not stale.exists() and live.exists()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BORA_LAB_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache(request, monkeypatch, tmp_path):
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get("BORA_LAB_SLOW"):
        pytest.skip("converts a GGUF file (~20 s): run with -m slow or BORA_LAB_SLOW=1")
    monkeypatch.setenv("BORA_LAB_CACHE", str(tmp_path))
    first = load_model("smollm2", "causal_lm")
    cached_dir = tmp_path / models._SMOLLM2_CACHE
    assert (cached_dir / "config.json").exists() and (cached_dir / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == [models._SMOLLM2_CACHE]  # no tmp folder left
    assert first.head_modules == [] and first.target_modules_default == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert first.layer_pattern == "model.layers" and model_summary(first.model)["n_layers"] == 30
    assert first.tokenizer.pad_token == first.tokenizer.eos_token

    start = time.perf_counter()
    second = load_model("smollm2", "causal_lm", num_layers=2)
    assert time.perf_counter() - start < 5
    ids = second.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        full = first.model.model.layers[1].self_attn.q_proj.weight
        torch.testing.assert_close(second.model.model.layers[1].self_attn.q_proj.weight, full)
        assert torch.isfinite(second.model(**ids).logits).all()

    cls = load_model("smollm2", "classification", num_labels=2, num_layers=2)
    assert cls.head_modules == ["score"] and cls.model.config.pad_token_id == cls.tokenizer.pad_token_id
    assert [i for i, _ in list_layers(cls.model, "q_proj")] == [0, 1]
