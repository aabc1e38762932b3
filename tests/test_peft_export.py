"""PEFT export of trained runs: ``PeftModel.from_pretrained`` on the run's base gives the run's logits.

Every exported method is trained for a few steps (MiniLM with 2 layers; the decoder methods on a tiny
Llama, and SmolLM2 when its converted copy is cached), exported, loaded back with PEFT on the same base
model and compared on one batch. Tolerance: ``atol = rtol = 1e-5`` on fp32 logits (measured: at most
1.8e-7 absolute, 4.4e-7 relative, from DoRA's norms and PiSSA's fp64 re-factorisation; 0 for most
methods). QLoRA/QDoRA are compared with what PEFT computes: the same adapter on the full-precision base.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch

from bora_lab import api, methods
from bora_lab.config import RunConfig
from bora_lab.engine.reload import export_peft, load_run
from bora_lab.methods.peft_export import EXPORTABLE, NO_PEFT
from bora_lab.methods.peft_export_common import README_TITLE

peft = pytest.importorskip("peft")

BASE = dict(ranks=[4], num_layers=2, steps=4, batch_size=4, max_length=24, eval_samples=8, eval_every=4,
            analyze_every=4, num_threads=1)
LAYER = ["lora", "rslora", "dora", "asylora", "sbora_fa", "sbora_fb", "pissa", "dora_mag", "adalora", "qlora", "qdora"]
EXACT = [m for m in LAYER if not m.startswith("q")]
TOL = dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
def _logits(model, pipeline, n_prompt: int = 0) -> torch.Tensor:
    model.eval()
    batch = next(iter(pipeline.train_batches))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return logits[:, n_prompt:] if n_prompt and logits.dim() == 3 else logits  # PEFT's causal LM keeps the prompt


def _run_id(method: str) -> str:
    return method if not methods.METHODS[method].uses_rank else f"{method}-r4"


def _peft(loaded, folder: Path):
    return peft.PeftModel.from_pretrained(copy.deepcopy(loaded.pipeline.pristine()), str(folder)).eval()


@pytest.fixture(scope="module")
def layer_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layer_runs")
    results = api.run(RunConfig(methods=LAYER, method_options={"adalora": {"target_rank": 2}}, **BASE),
                      out_dir=out, html=False)
    assert all(r["status"] == "done" and r["adapter"]["saved"] for r in results["runs"])
    return out


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory) -> Path:
    """VeRA on layers of one shape, prompt tuning and P-tuning with PEFT's placement (first)."""
    out = tmp_path_factory.mktemp("model_runs")
    prompts = {"position": "start", "num_virtual_tokens": 4}
    cfg = RunConfig(methods=["vera", "prompt", "ptuning"], target_modules=["query", "value"],
                    method_options={"prompt": prompts, "ptuning": {**prompts, "encoder_hidden": 16}}, **BASE)
    results = api.run(cfg, out_dir=out, html=False)
    assert all(r["status"] == "done" and r["adapter"]["saved"] for r in results["runs"])
    return out


@pytest.mark.parametrize("method", EXACT)
def test_layer_methods_load_in_peft_with_the_run_logits(layer_runs, tmp_path, method):
    loaded = load_run(layer_runs, _run_id(method))
    reference = _logits(loaded.model, loaded.pipeline)
    export_peft(loaded, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("ADALORA" if method == "adalora" else "LORA")
    assert config["r" if method != "adalora" else "init_r"] == {"pissa": 8, "dora_mag": 1}.get(method, 4)
    assert README_TITLE in (tmp_path / "README.md").read_text()
    torch.testing.assert_close(_logits(_peft(loaded, tmp_path), loaded.pipeline), reference, **TOL)


@pytest.mark.parametrize("method, plain", [("qlora", "lora"), ("qdora", "dora")])
def test_quantized_methods_export_the_adapter_for_the_full_precision_base(layer_runs, tmp_path, method, plain):
    loaded = load_run(layer_runs, _run_id(method))
    export_peft(loaded, tmp_path)
    theirs = _logits(_peft(loaded, tmp_path), loaded.pipeline)
    cfg = loaded.cfg
    # what PEFT computes: our trained A, B (and magnitude) over the full-precision W0 instead of the NF4 one
    reference = methods.apply(copy.deepcopy(loaded.pipeline.pristine()), plain, rank=4, alpha=cfg.alpha,
                              target_modules=cfg.target_modules, train_head=cfg.head)
    trained = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert not reference.load_state_dict(trained, strict=False).unexpected_keys
    torch.testing.assert_close(_logits(reference, loaded.pipeline), theirs, **TOL)
    assert not torch.allclose(_logits(loaded.model, loaded.pipeline), theirs, atol=1e-5)  # the NF4 error
    assert "full-precision" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("method", ["vera", "prompt", "ptuning"])
def test_vera_and_prompts_load_in_peft_with_the_run_logits(model_runs, tmp_path, method):
    loaded = load_run(model_runs, _run_id(method))
    reference = _logits(loaded.model, loaded.pipeline)
    export_peft(loaded, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {"vera": "VERA", "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}[method]
    assert config["peft_type"] == expected and config.get("task_type") in (None, "SEQ_CLS")
    torch.testing.assert_close(_logits(_peft(loaded, tmp_path), loaded.pipeline), reference, **TOL)


# -- decoders: prompt tuning, P-tuning and prefix tuning as PEFT's CAUSAL_LM -------------------------
def _tiny_llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method, options", [
    ("prompt", {}), ("ptuning", {"encoder": "mlp", "encoder_hidden": 16}), ("prefix", {}),
    ("prefix", {"reparameterize": True, "encoder_hidden": 16}),
])
def test_decoder_prompt_methods_load_in_peft_after_training(tmp_path, method, options):
    base = _tiny_llama()
    ids = torch.randint(3, 96, (3, 9))
    mask = torch.ones_like(ids)
    ids[0, -3:], mask[0, -3:] = 0, 0  # right padding
    model = methods.apply(copy.deepcopy(base), method, num_virtual_tokens=4, **options).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):  # a few steps: the export must carry trained vectors, not the initial ones
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        ours = model.eval()(input_ids=ids, attention_mask=mask).logits
    methods.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()(
            input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs[:, -ids.shape[1]:], ours, **TOL)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gpt2_conv1d_layers_export(tmp_path, method):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
    ours = methods.apply(copy.deepcopy(base), method, rank=2).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    methods.export_peft(ours, tmp_path)
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()(ids).logits
        torch.testing.assert_close(theirs, ours(ids).logits, **TOL)


def _smollm2_ready() -> bool:
    from bora_lab.engine import loading

    cached = (loading.cache_root() / loading._SMOLLM2_CACHE / "config.json").is_file()
    return cached or bool(os.environ.get("BORA_LAB_SLOW"))


@pytest.mark.slow
def test_smollm2_prefix_and_prompt_runs_load_in_peft(tmp_path):
    if not _smollm2_ready():
        pytest.skip("SmolLM2 is not converted yet (~20 s): run with BORA_LAB_SLOW=1")
    cfg = RunConfig(model="smollm2", task="austen_lm", methods=["prefix", "prompt"], steps=3, num_layers=2,
                    batch_size=2, max_length=24, eval_samples=4, eval_every=3, analyze_every=3, num_threads=1,
                    method_options={"prefix": {"num_virtual_tokens": 4, "reparameterize": True, "encoder_hidden": 16},
                                    "prompt": {"num_virtual_tokens": 4}})
    api.run(cfg, out_dir=tmp_path / "run", html=False)
    for method in ("prefix", "prompt"):
        loaded = load_run(tmp_path / "run", method)
        export_peft(loaded, tmp_path / method)
        n = 4 if method == "prompt" else 0
        torch.testing.assert_close(_logits(_peft(loaded, tmp_path / method), loaded.pipeline, n),
                                   _logits(loaded.model, loaded.pipeline), **TOL)


# -- what has no PEFT equivalent ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from bora_lab.engine.loading import load_model

    return load_model("minilm", "classification", num_labels=2, num_layers=2, seed=0).model


@pytest.mark.parametrize("method", sorted(set(NO_PEFT) - {"adapter"}))
def test_methods_without_a_peft_equivalent_point_to_the_merged_export(minilm, tmp_path, method):
    model = methods.apply(copy.deepcopy(minilm), method, rank=2, target_modules=["query"])
    with pytest.raises(ValueError, match="no PEFT equivalent; use --format merged"):
        methods.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, options, message", [
    ("adapter", {}, "no merged export applies"),
    ("prompt", {}, re.escape("position='start'")),  # after [CLS]: PEFT's classifier would pool a virtual token
    ("ptuning", {"position": "after_first"}, re.escape("position='start'")),
    ("prefix", {}, "past_key_values"),  # PEFT 0.21 cannot run prefix tuning on BERT under transformers 5
    ("vera", {"target_modules": ["query", "dense"]}, "no PEFT equivalent; use --format merged"),  # mixed shapes
])
def test_refusals_say_why(minilm, tmp_path, method, options, message):
    if method == "prefix":
        import inspect

        import transformers

        if "past_key_values" in inspect.signature(transformers.BertModel.forward).parameters:
            pytest.skip("this transformers' BERT takes past_key_values: PEFT's prefix tuning may run")
    model = methods.apply(copy.deepcopy(minilm), method, rank=2, **options)
    with pytest.raises(ValueError, match=message):
        methods.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_method_is_exported_or_refused_and_documented():
    assert set(methods.METHODS) == set(EXPORTABLE) | set(NO_PEFT) and not set(EXPORTABLE) & set(NO_PEFT)
    doc = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", doc, re.M)}
    assert rows == set(methods.METHODS)
