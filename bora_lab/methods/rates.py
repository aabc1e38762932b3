"""Each method's suggested learning rate for the default model (MiniLM) and task (fine-food reviews).

A comparison at one shared learning rate is unfair to the methods that need another one (full
fine-tuning far lower; prompts, VeRA and magnitude-only methods far higher), and the papers compare
methods at their own best rates (BoRA paper, Wang et al. 2024, arXiv:2412.06441, table 9). Every value
below was measured by the sweep in ``docs/measured/learning_rates.md`` (the commands are there):
each method trained at its earlier rate /3, x1 and x3 (and beyond where the best sat at an edge),
chosen on the validation accuracy of 200 held-out training reviews (seed 0; LoRA, DoRA and BoRA over
seeds 0, 1, 2). ``NOTES`` says where the choice is less sure. The learning-rate sweep's ``auto`` grid
centres on these rates, and by default (``RunConfig.per_method_lr``) every method trains at its own.
"""
from __future__ import annotations

DEFAULT = 1e-3
SUGGESTED_LR: dict[str, float] = {
    "lora": 1e-3, "dora": 1e-3, "bora": 1e-3,
    "full": 0.0001,
    "full_model": 9e-05,
    "head": 0.001,
    "features": 0.03,
    "rslora": 0.001,
    "dora_col": 0.001,
    "dora_mag": 0.03,
    "pissa": 0.000333,
    "prompt": 0.01,
    "ptuning": 0.03,
    "prefix": 0.00333,
    "bitfit": 0.001,
    "adapter": 0.001,
    "lora2": 0.01,
    "adalora": 0.01,
    "vera": 0.03,
    "dvora": 0.01,
    "asylora": 0.003,
    "sbora_fa": 0.001,
    "sbora_fb": 0.001,
    "mora": 0.003,
    "qlora": 0.001,
    "qdora": 0.001,
    "qbora": 0.001,
}
# how each value was chosen (the grid of the sweep) and where it is less sure
NOTES: dict[str, str] = {
    "lora": "best of 3.33e-4, 1e-3, 3e-3 over seeds 0, 1, 2", "dora": "best of 3.33e-4, 1e-3, 3e-3 over seeds 0, 1, 2",
    "bora": "best of 3.33e-4, 1e-3, 3e-3 over seeds 0, 1, 2",
    "full": "best of 3.33e-05, 0.0001, 0.0003",
    "full_model": "best of 1e-05, 3e-05, 9e-05, 0.00027, 0.00081",
    "head": ("best of 0.000333, 0.001, 0.003, 0.01, 0.03, 0.1; at the majority class at every rate tried, and "
             "truly so: the best linear classifier of the frozen features, fitted exactly on as many reviews "
             "as a run sees (1,200), is too (benchmarks/linear_probe.py)"),
    "features": ("best of 0.000333, 0.001, 0.003, 0.01, 0.03, 0.1; at the majority class at every rate tried, "
                 "and truly so: the best linear classifier of the frozen features, fitted exactly on as many "
                 "reviews as a run sees (1,200), is too (benchmarks/linear_probe.py)"),
    "rslora": "best of 0.000333, 0.001, 0.003",
    "dora_col": "best of 0.000333, 0.001, 0.003",
    "dora_mag": "best of 0.00333, 0.01, 0.03, 0.1, 0.3",
    "pissa": "best of 3.3e-05, 0.0001, 0.000333, 0.001, 0.003",
    "prompt": ("best of 0.00333, 0.01, 0.03, 0.09; learns on seed 0 (0.725) but seeds 1 and 2 sit near the "
               "majority class (0.680, 0.665) in 150 steps"),
    "ptuning": ("best of 0.00333, 0.01, 0.03, 0.1; learns on seed 0 (0.715) but seeds 1 and 2 sit at the "
                "majority class (0.655, 0.640) in 150 steps"),
    "prefix": ("best of 0.0003, 0.001, 0.00333, 0.01, 0.03; at the majority class at every rate tried in 150 steps; "
               "at 600 steps it learns (0.700 test accuracy)"),
    "bitfit": ("best of 0.001, 0.003, 0.009, 0.01, 0.03, 0.1; at the majority class at every rate tried in 150 steps; "
               "at 600 steps it learns (0.785 test accuracy)"),
    "adapter": "best of 0.000333, 0.001, 0.003",
    "lora2": ("best of 0.000333, 0.001, 0.003, 0.01, 0.03 (0.01 confirmed over seeds 0, 1, 2): its singular "
              "values start at zero, so ΔW grows slowly and at LoRA's rate it stays at the majority class"),
    "adalora": ("best of 0.000333, 0.001, 0.003, 0.01, 0.03, 0.1 over seeds 0, 1, 2 at 0.01 and 0.03 (0.03 won "
                "on seed 0 but stayed at the majority class on seeds 1 and 2): its singular values start at zero "
                "and P, Q at std 0.02, so ΔW grows slowly and at LoRA's rate it stays at the majority class"),
    "vera": "best of 0.00333, 0.01, 0.03, 0.1",
    "dvora": "best of 0.00333, 0.01, 0.03",
    "asylora": "best of 0.000333, 0.001, 0.003, 0.01",
    "sbora_fa": "best of 0.000333, 0.001, 0.003",
    "sbora_fb": "best of 0.000333, 0.001, 0.003",
    "mora": "best of 0.000333, 0.001, 0.003, 0.01",
    "qlora": "best of 0.000333, 0.001, 0.003",
    "qdora": "best of 0.000333, 0.001, 0.003",
    "qbora": "best of 0.000333, 0.001, 0.003",
}
AUTO_FACTORS = (1 / 3, 1.0, 3.0)  # the auto grid: each method's suggested rate / 3, x1, x3


def suggested_lr(method: str) -> float:
    """The suggested learning rate of ``method`` (``DEFAULT`` when none is recorded)."""
    return SUGGESTED_LR.get(method, DEFAULT)


def source(method: str) -> str:
    """Where ``method``'s suggested rate comes from, in words (the method cards show it)."""
    if method not in NOTES:
        return "not measured: LoRA's rate"
    return f"measured on validation: {NOTES[method]} (docs/measured/learning_rates.md)"


def auto_grid(method: str) -> list[float]:
    """The ``auto`` sweep's rates for ``method``: its suggested rate / 3, x1 and x3 (3 significant digits)."""
    return [float(f"{suggested_lr(method) * f:.3g}") for f in AUTO_FACTORS]
