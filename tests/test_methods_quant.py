"""NF4 quantiser and the QLoRA family (qlora, qdora, qbora): properties beyond the registry-wide tests."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bora_lab import methods
from bora_lab.methods import nf4
from bora_lab.methods.qlora import NF4Linear, paged_adamw, storage_report

QUANT = ["qlora", "qdora", "qbora"]
D_IN, D_OUT, RANK = 24, 16, 4


# -- NF4 code book and storage -------------------------------------------------------------------
def test_codebook_is_the_published_nf4():
    code = nf4.codebook()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, distinct
    assert code[0].item() == -1.0 and code[-1].item() == 1.0 and 0.0 in code.tolist()
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7  # the asymmetric type: 8 positive, 7 negative
    torch.testing.assert_close(code, torch.tensor(nf4.NF4_PAPER_VALUES), atol=0, rtol=0)


def test_dynamic_map_for_double_quant():
    dm = nf4.dynamic_map()
    assert dm.shape == (256,) and torch.all(dm[1:] >= dm[:-1])
    assert dm.min() >= -1 and dm.max() == 1.0 and 0.0 in dm.tolist()


def _blocks(w, bs=nf4.BLOCKSIZE):
    flat = w.reshape(-1)
    nb = math.ceil(flat.numel() / bs)
    return F.pad(flat, (0, nb * bs - flat.numel())).view(nb, bs)


@pytest.mark.parametrize("shape", [(16, 24), (33, 7), (128, 96)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_bound(shape, double_quant):
    w = torch.randn(shape) * 0.05
    w[1] = 0.0  # zero rows must stay exactly zero
    q = nf4.quantize(w, double_quant=double_quant)
    deq = nf4.dequantize(q)
    assert deq.shape == w.shape and deq.dtype == w.dtype
    assert torch.all(deq[1] == 0)
    # Each weight is off by at most half the widest gap between code values times its block's
    # absmax, plus the error double quantisation makes in that absmax.
    half_gap = (nf4.codebook().diff().max() / 2).item()
    true_absmax = _blocks(w).abs().amax(dim=1)  # (nb,)
    absmax_err = (nf4.dequantize_absmax(q) - true_absmax).abs()
    if not double_quant:
        assert torch.equal(nf4.dequantize_absmax(q), true_absmax)
    bound = true_absmax * half_gap + absmax_err + 1e-7  # (nb,)
    err = _blocks(deq - w).abs()
    assert torch.all(err <= bound.unsqueeze(1))
    stats = nf4.error_stats(w, q)
    assert stats["max_abs_error"] <= bound.max().item()
    assert stats["relative_error"] < 0.12 and stats["sqnr_db"] > 18


def test_packing_two_codes_per_byte_high_nibble_first():
    w = torch.tensor([[-1.0, 1.0, 0.0]])  # codes 0, 15, 7 (+ one padding code 7)
    q = nf4.quantize(w, double_quant=False)
    assert q.packed.dtype == torch.uint8 and q.packed.tolist() == [0x0F, 0x77]
    assert nf4.code_indices(q).tolist() == [[0, 15, 7]]
    assert torch.equal(nf4.dequantize(q), w)


def test_memory_shows_the_saving():
    w = torch.randn(256, 256)
    q = nf4.quantize(w)
    # 4 bits + 8/64 (absmax codes) + 32/(64·256) (second-level scales) + one fp32 offset
    assert 4.12 < q.bits_per_param() < 4.2
    assert q.nbytes() == 256 * 256 // 2 + 1024 + 4 * 4 + 4
    assert nf4.quantize(w, double_quant=False).bits_per_param() == pytest.approx(4.5)
    stats = nf4.error_stats(w, q)
    assert stats["compression_vs_fp32"] > 7.7 and stats["compression_vs_bf16"] > 3.8


def test_histogram_data_for_the_ui():
    w = torch.randn(64, 48)
    h = nf4.histogram(w, bins=20)
    assert len(h["edges"]) == 21 and len(h["counts"]) == 20 and sum(h["counts"]) == w.numel()
    assert h["code_values"] == nf4.codebook().tolist() and sum(h["code_counts"]) == w.numel()
    assert all(isinstance(c, int) for c in h["counts"] + h["code_counts"])
    # every block's largest |w| lands exactly on ±1, so both end codes are used
    assert h["code_counts"][0] + h["code_counts"][-1] >= w.numel() // nf4.BLOCKSIZE


# -- QLoRA layers --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", QUANT)
def test_identity_to_the_dequantised_base(name):
    base = nn.Linear(D_IN, D_OUT)
    original = base.weight.detach().clone()
    layer = methods.wrap(base, name, rank=RANK)
    ref = layer.reference_weight()
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(layer(x), F.linear(x, ref, base.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.effective_weight(), ref, atol=1e-6, rtol=1e-5)
    assert not torch.equal(ref, original)  # quantised: close to, but not, the fp32 weight
    assert (ref - original).norm() / original.norm() < 0.12


@pytest.mark.parametrize("name", QUANT)
def test_base_is_stored_in_nf4_only(name):
    layer = methods.wrap(nn.Linear(64, 32), name, rank=RANK)
    assert isinstance(layer.base, NF4Linear) and layer.base.packed.dtype == torch.uint8
    dense = [k for k, t in layer.state_dict().items() if t.numel() >= 64 * 32]
    assert dense == []  # no dense copy of W0 anywhere (buffers or parameters)
    mem = layer.memory_bytes()
    assert mem["base_nf4"] < mem["base_bf16"] / 3 and mem["bits_per_weight"] < 4.6
    assert methods.METHODS[name].optimizer == "paged_adamw"


@pytest.mark.parametrize("name", QUANT)
def test_merge_keeps_the_nf4_storage(name):
    layer = methods.wrap(nn.Linear(D_IN, D_OUT), name, rank=RANK)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    packed = layer.base.packed.clone()
    x = torch.randn(3, D_IN)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert layer.base.merged_weight is None and torch.equal(layer.base.packed, packed)


def test_model_storage_report_shows_the_saving():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    dense = sum(p.numel() * 4 for p in model.parameters())
    methods.apply(model, "qlora", rank=4, target_modules=["0", "2"])
    rep = storage_report(model)
    assert rep["nf4_layers"] == 2 and rep["quantized_weights"] == 128 * 256 + 256 * 64
    assert 4.1 < rep["bits_per_weight"] < 4.2
    assert rep["model_bytes_dense_fp32"] > dense  # the dense model plus the adapters
    assert rep["model_bytes"] < 0.25 * rep["model_bytes_dense_fp32"]


def test_bf16_keeps_the_quantisation_constants_in_fp32():
    layer = methods.wrap(nn.Linear(D_IN, D_OUT), "qlora", rank=RANK)
    w32 = layer.reference_weight()
    layer = layer.to(torch.bfloat16)
    assert layer.base.absmax2.dtype == torch.float32 and layer.base.offset.dtype == torch.float32
    assert layer.base.absmax.dtype == torch.uint8 and layer.base.compute_dtype == torch.bfloat16
    torch.testing.assert_close(layer.reference_weight(), w32.to(torch.bfloat16))


def test_options_are_checked():
    lin = nn.Linear(D_IN, D_OUT)
    with pytest.raises(ValueError, match="backend"):
        methods.wrap(lin, "qlora", backend="nope")
    with pytest.raises(ValueError, match="blocksize"):
        methods.wrap(lin, "qlora", blocksize=48)
    if not nf4.bnb_available():
        with pytest.raises(ValueError, match="bitsandbytes"):
            methods.wrap(lin, "qlora", backend="bitsandbytes")
    fields = {f["name"]: f for f in methods.config_fields("qdora")}
    assert {"rank", "alpha", "detach_norm", "eps", "blocksize", "double_quant", "backend"} <= set(fields)
    assert fields["backend"]["choices"] == ["auto", "torch", "bitsandbytes"]


def test_paged_optimizer_does_not_apply_on_cpu():
    layer = methods.wrap(nn.Linear(D_IN, D_OUT), "qlora", rank=RANK)
    opt, note = paged_adamw(layer.parameters(), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and "CPU" in note
    assert "CPU" in layer.optimizer_hint("cpu")


@pytest.mark.parametrize("name", QUANT)
def test_trains_with_decreasing_loss(name):
    layer = methods.wrap(nn.Linear(D_IN, D_OUT), name, rank=RANK)
    x = torch.randn(64, D_IN)
    y = F.linear(x, layer.reference_weight() + 0.3 * torch.randn(D_OUT, D_IN))
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(25):
        loss = F.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]


# -- bitsandbytes fast path (runs only where bitsandbytes is installed) ----------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bitsandbytes_gives_the_same_dequantised_weights(device):
    pytest.importorskip("bitsandbytes")
    w = (torch.randn(96, 200) * 0.02).to(device)
    ours, theirs = nf4.quantize(w), nf4.quantize_bnb(w)
    # Same layout: the 4-bit codes agree (up to rare ties at a midpoint) ...
    agree = (nf4.code_indices(ours) == nf4.code_indices(theirs)).float().mean().item()
    assert agree > 0.999
    # ... and the 8-bit absmax codes at most one step apart (bitsandbytes' native search is not exact).
    assert (ours.absmax.int() - theirs.absmax.int()).abs().max() <= 1
    # Both kernels read one storage identically.
    torch.testing.assert_close(nf4.dequantize_bnb(ours), nf4.dequantize(ours), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(nf4.dequantize(theirs), nf4.dequantize_bnb(theirs), atol=1e-6, rtol=1e-5)
    assert (nf4.dequantize(ours) - nf4.dequantize_bnb(theirs)).abs().max() < 0.01 * w.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_bitsandbytes_backend_matches_torch_backend(device):
    pytest.importorskip("bitsandbytes")
    base = nn.Linear(64, 48).to(device)
    fast = methods.wrap(base, "qlora", rank=RANK, backend="bitsandbytes")
    slow = methods.wrap(base, "qlora", rank=RANK, backend="torch")
    slow.load_state_dict(fast.state_dict())  # same storage, same adapter
    with torch.no_grad():
        fast.lora_B.normal_()
        slow.lora_B.copy_(fast.lora_B)
    x = torch.randn(4, 64, device=device)
    torch.testing.assert_close(fast(x), slow(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.effective_weight(), slow.effective_weight(), atol=1e-5, rtol=1e-5)
