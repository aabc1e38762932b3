"""Fidelity against Hugging Face PEFT and across dtypes: VeRA's frozen pair, PiSSA's init, float64.

* VeRA (Kopiczko et al., 2023, arXiv:2310.11454): with the same seed our frozen A and B equal
  PEFT's ``VeraConfig`` A and B element for element, and with the same A, B, d, b the outputs and
  gradients match PEFT's on one Linear and on a tiny model with layers of different shapes.
* PiSSA (Meng et al., 2024, arXiv:2404.02948): same residual base, same ``B @ A`` (and same A, B
  up to the sign of each singular pair), same outputs and gradients as PEFT's
  ``init_lora_weights="pissa"``; ``svd_oversample=0`` reproduces PEFT's ``"pissa_niter_[n]"``.
* Every layer method wraps a float64 Linear (forward, backward, ``effective_weight``), and runs
  forward and backward in bf16 and fp16.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bora_lab import methods

peft = pytest.importorskip("peft")

LAYER_METHODS = [n for n in methods.available() if methods.info(n)["kind"] == "layer"]


class OneLinear(nn.Module):
    def __init__(self, d_in: int = 32, d_out: int = 20):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _tiny(shapes=((16, 24), (24, 24), (24, 12))) -> nn.Sequential:
    """Linear, Tanh, Linear, Tanh, ...: targets are the even indices "0", "2", "4"."""
    layers = []
    for i, (d_in, d_out) in enumerate(shapes):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def _targets(model: nn.Sequential) -> list[str]:
    return [n for n, m in model.named_children() if isinstance(m, nn.Linear)]


# -- VeRA ----------------------------------------------------------------------------------------
def _peft_vera(model: nn.Module, targets: list[str], rank: int, seed: int = 0):
    cfg = peft.VeraConfig(r=rank, target_modules=targets, projection_prng_key=seed, d_initial=0.1)
    return peft.get_peft_model(copy.deepcopy(model), cfg)


def _vera_layer_of(ref, name: str):
    return ref.base_model.model.get_submodule(name)


@pytest.mark.parametrize("name", ["vera", "dvora"])
@pytest.mark.parametrize("seed", [0, 7])
def test_vera_frozen_pair_equals_peft_with_the_same_seed(name, seed):
    base = OneLinear()
    theirs = _vera_layer_of(_peft_vera(base, ["proj"], 4, seed), "proj")
    ours = methods.wrap(copy.deepcopy(base).proj, name, rank=4, seed=seed)
    assert torch.equal(ours.vera.A, theirs.vera_A["default"])  # [r, in], drawn first
    assert torch.equal(ours.vera.B, theirs.vera_B["default"])  # [out, r], drawn second
    torch.testing.assert_close(ours.vera.d, theirs.vera_lambda_d["default"])  # d_initial = 0.1
    assert torch.equal(ours.vera.b, theirs.vera_lambda_b["default"])  # zeros


def test_vera_frozen_pair_equals_peft_on_a_model_of_one_shape():
    """All targets one shape: PEFT's shared pair is exactly the shape of each layer, so no slicing."""
    model = _tiny(((24, 24), (24, 24), (24, 24)))
    ref = _peft_vera(model, _targets(model), 4)
    ours = methods.apply(copy.deepcopy(model), "vera", rank=4)
    for n, layer in methods.adapter_layers(ours):
        theirs = _vera_layer_of(ref, n)
        assert torch.equal(layer.vera.A, theirs.vera_A["default"])
        assert torch.equal(layer.vera.B, theirs.vera_B["default"])


def test_vera_init_bound_is_sqrt6_over_fan_in():
    """PEFT's _kaiming_init: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in); fan_in = in for A, r for B."""
    layer = methods.wrap(nn.Linear(2048, 1536), "vera", rank=8)
    a, b = layer.vera.A, layer.vera.B
    bound_a, bound_b = math.sqrt(6 / 2048), math.sqrt(6 / 8)
    assert a.abs().max() <= bound_a and a.abs().max() > 0.999 * bound_a
    assert b.abs().max() <= bound_b and b.abs().max() > 0.999 * bound_b
    # the variance of U(-b, b) is b^2 / 3 = 2 / fan_in (Kaiming, gain sqrt(2))
    assert abs(a.var().item() * 2048 / 2 - 1) < 0.02
    # the old init (LoRA's A init, a = sqrt(5)) draws the same numbers sqrt(6) times smaller
    old = methods.wrap(nn.Linear(2048, 1536), "vera", rank=8, init="kaiming_a_sqrt5")
    torch.testing.assert_close(a, old.vera.A * math.sqrt(6), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, old.vera.B * math.sqrt(6), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="init must be one of"):
        methods.wrap(nn.Linear(8, 8), "vera", rank=2, init="nope")


def _perturb_vectors(layer) -> None:
    with torch.no_grad():
        layer.vera.d.add_(0.3 * torch.randn_like(layer.vera.d))
        layer.vera.b.add_(0.3 * torch.randn_like(layer.vera.b))


def _copy_vera_into_ours(ours, theirs) -> None:
    """PEFT's sliced shared pair and its vectors into our layer (the only way shapes can differ)."""
    with torch.no_grad():
        ours.vera.A.copy_(theirs.vera_A["default"][:, : ours.in_features])
        ours.vera.B.copy_(theirs.vera_B["default"][: ours.out_features, :])
        ours.vera.d.copy_(theirs.vera_lambda_d["default"])
        ours.vera.b.copy_(theirs.vera_lambda_b["default"])


def _assert_vera_grads(ours, theirs) -> None:
    torch.testing.assert_close(ours.vera.d.grad, theirs.vera_lambda_d["default"].grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.vera.b.grad, theirs.vera_lambda_b["default"].grad, atol=1e-6, rtol=1e-6)


def test_vera_linear_parity_outputs_and_grads():
    base = OneLinear()
    ref = _peft_vera(base, ["proj"], 4)
    theirs = _vera_layer_of(ref, "proj")
    ours = methods.wrap(copy.deepcopy(base).proj, "vera", rank=4)
    _perturb_vectors(ours)  # b = 0 at init would make the test pass trivially
    with torch.no_grad():
        theirs.vera_lambda_d["default"].copy_(ours.vera.d)
        theirs.vera_lambda_b["default"].copy_(ours.vera.b)
    x = torch.randn(6, 32)
    y_ours, y_theirs = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.effective_weight(), theirs.base_layer.weight + theirs.get_delta_weight("default"),
                               atol=1e-6, rtol=1e-6)
    g = torch.randn_like(y_ours)
    (y_ours * g).sum().backward()
    (y_theirs * g).sum().backward()
    _assert_vera_grads(ours, theirs)


def test_vera_tiny_model_parity_with_mixed_shapes():
    """Layers [24,16], [24,24], [12,24]: PEFT slices one [r, 24] / [24, r] pair; ours holds the slices."""
    torch.manual_seed(1)
    model = _tiny()
    ref = _peft_vera(model, _targets(model), 4)
    ours = methods.apply(copy.deepcopy(model), "vera", rank=4)
    wrapped = dict(methods.adapter_layers(ours))
    assert sorted(wrapped) == ["0", "2", "4"]
    for n, layer in wrapped.items():
        theirs = _vera_layer_of(ref, n)
        with torch.no_grad():  # move PEFT's vectors away from init, then give ours PEFT's A, B, d, b
            theirs.vera_lambda_d["default"].add_(0.3 * torch.randn(4))
            theirs.vera_lambda_b["default"].add_(0.3 * torch.randn(layer.out_features))
        _copy_vera_into_ours(layer, theirs)
    # the widest layer's pair is ours without copying; B's bound sqrt(6/r) never depends on the shape
    fresh = dict(methods.adapter_layers(methods.apply(copy.deepcopy(model), "vera", rank=4)))
    assert torch.equal(fresh["2"].vera.A, _vera_layer_of(ref, "2").vera_A["default"])
    assert fresh["0"].vera.A.abs().max() <= math.sqrt(6 / 16)  # ours: its own fan_in 16 (PEFT: 24)
    x = torch.randn(5, 16)
    y_ours, y_theirs = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=1e-6)
    y_ours.pow(2).sum().backward()
    y_theirs.pow(2).sum().backward()
    for n, layer in wrapped.items():
        _assert_vera_grads(layer, _vera_layer_of(ref, n))


# -- PiSSA ---------------------------------------------------------------------------------------
def _peft_pissa(model: nn.Module, targets: list[str], init="pissa", rank=4, alpha=8):
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=init)
    return peft.get_peft_model(copy.deepcopy(model), cfg)


def _align_signs(ours, theirs_a: torch.Tensor) -> torch.Tensor:
    """Per singular pair k, +1 or -1 so that ours.lora_A[k] points like PEFT's lora_A[k]."""
    return torch.sign((ours.lora_A * theirs_a).sum(1))  # (r,)


def _assert_pissa_init_matches(ours, theirs, atol=1e-5) -> None:
    a_t, b_t = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    assert ours.scale == theirs.scaling["default"]
    torch.testing.assert_close(ours.w_res, theirs.base_layer.weight, atol=atol, rtol=1e-5)  # residual base
    torch.testing.assert_close(ours.lora_B @ ours.lora_A, b_t @ a_t, atol=atol, rtol=1e-5)
    sign = _align_signs(ours, a_t)
    assert sign.abs().min() == 1
    torch.testing.assert_close(ours.lora_A * sign.unsqueeze(1), a_t, atol=atol, rtol=1e-5)
    torch.testing.assert_close(ours.lora_B * sign, b_t, atol=atol, rtol=1e-5)


def test_pissa_linear_parity_with_peft_exact_svd():
    base = OneLinear()
    ref = _peft_pissa(base, ["proj"])
    theirs = ref.base_model.model.proj
    ours = methods.wrap(copy.deepcopy(base).proj, "pissa", rank=4, alpha=8)
    _assert_pissa_init_matches(ours, theirs)
    x = torch.randn(6, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=1e-5)  # W_res + s·B@A = W0
    # after training steps the two still agree: perturb ours, copy into PEFT, compare outputs and grads
    with torch.no_grad():
        ours.lora_A.add_(0.2 * torch.randn_like(ours.lora_A))
        ours.lora_B.add_(0.2 * torch.randn_like(ours.lora_B))
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.base_layer.weight.copy_(ours.w_res)  # equal to 1e-6 (above); bitwise for the gradient check
    y_ours, y_theirs = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ours)
    (y_ours * g).sum().backward()
    (y_theirs * g).sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)


def test_pissa_tiny_model_parity_with_peft():
    model = _tiny()
    ref = _peft_pissa(model, _targets(model))
    ours = methods.apply(copy.deepcopy(model), "pissa", rank=4, alpha=8)
    for n, layer in methods.adapter_layers(ours):
        _assert_pissa_init_matches(layer, ref.base_model.model.get_submodule(n))
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("niter", [1, 4])
def test_pissa_oversample_0_is_peft_pissa_niter(niter):
    """PEFT's "pissa_niter_[n]" is svd_lowrank(W, q=r, niter=n): ours with svd_oversample=0, same global seed."""
    base = OneLinear(48, 40)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    theirs = ref.base_model.model.proj
    torch.manual_seed(123)
    theirs.pissa_init("default", f"pissa_niter_{niter}")  # PEFT's own init, called with a known RNG state
    torch.manual_seed(123)
    ours = methods.wrap(copy.deepcopy(base).proj, "pissa", rank=4, alpha=8, svd_niter=niter, svd_oversample=0)
    torch.testing.assert_close(ours.lora_A, theirs.lora_A["default"].weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.lora_B, theirs.lora_B["default"].weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.w_res, theirs.base_layer.weight, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 48)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_pissa_oversample_option_changes_q_only_for_randomized_svd():
    base = nn.Linear(48, 40)
    exact = [methods.wrap(copy.deepcopy(base), "pissa", rank=4, svd_oversample=k) for k in (0, 10)]
    assert torch.equal(exact[0].lora_A, exact[1].lora_A)  # ignored by the exact SVD
    torch.manual_seed(5)
    q_r = methods.wrap(copy.deepcopy(base), "pissa", rank=4, svd_niter=2, svd_oversample=0)
    torch.manual_seed(5)
    q_r10 = methods.wrap(copy.deepcopy(base), "pissa", rank=4, svd_niter=2)  # default: q = r + 10
    assert not torch.allclose(q_r.lora_A, q_r10.lora_A)


# -- dtypes --------------------------------------------------------------------------------------
def _perturb(layer: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def _wrap(name: str, dtype: torch.dtype):
    """As tests/test_methods.py: one config for every method, rank 4 and alpha 8 (16x12 fits all)."""
    return methods.wrap(nn.Linear(16, 12).to(dtype), name, rank=4, alpha=8)


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_float64_forward_backward_and_effective_weight(name):
    # No method is skipped: qlora/qdora/qbora quantise W0 to NF4 codes but dequantise them into the
    # weight's dtype, so they run in float64 too (their base is the dequantised one, by design).
    layer = _wrap(name, torch.float64)
    x0 = torch.randn(5, 16, dtype=torch.float64)
    if methods.info(name)["identity_at_init"]:
        ref = getattr(layer, "reference_weight", lambda: layer.weight0)()
        torch.testing.assert_close(layer(x0), F.linear(x0, ref, layer.bias), atol=1e-10, rtol=1e-10)
    _perturb(layer)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float64
    w = layer.effective_weight()
    assert w.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x, w, layer.bias), atol=1e-10, rtol=1e-10)
    y.pow(2).sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
    assert x.grad.dtype == torch.float64
    if methods.info(name)["mergeable"]:
        with torch.no_grad():
            y = layer(x)
            layer.merge()
            torch.testing.assert_close(layer(x), y, atol=1e-10, rtol=1e-10)
            layer.unmerge()


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(3, 4, dtype=dtype, requires_grad=True)
        F.linear(a, torch.ones(2, 4, dtype=dtype)).sum().backward()
        torch.linalg.vector_norm(torch.ones(3, dtype=dtype), dtype=torch.float32)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", LAYER_METHODS)
def test_half_precision_forward_backward(name, dtype):
    if not _cpu_supports(dtype):
        pytest.skip(f"this torch build ({torch.__version__}) has no {dtype} matmul/backward on CPU; "
                    "the method itself is not the cause")
    layer = _wrap(name, dtype)
    _perturb(layer)
    x = torch.randn(3, 16, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    y.float().pow(2).sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads)
    w = layer.effective_weight()
    torch.testing.assert_close(y.float(), F.linear(x, w, layer.bias).float(), atol=0.1, rtol=0.05)
