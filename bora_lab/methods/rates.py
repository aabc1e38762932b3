"""Each method's suggested learning rate for the default model (MiniLM) and task (fine-food reviews).

A comparison at one shared learning rate is unfair to the methods that need another one (full
fine-tuning far lower; prompts, VeRA and magnitude-only methods far higher), and the papers compare
methods at their own best rates (BoRA paper, Wang et al. 2024, arXiv:2412.06441, table 9). The values
below come from the sweep documented in ``docs/measured/learning_rates.md`` (the command is there) when
it measured the method; otherwise they are the rate the method's paper or PEFT's examples use, and
``SOURCE`` says so. The learning-rate sweep's ``auto`` grid centres on them.
"""
from __future__ import annotations

DEFAULT = 1e-3
SUGGESTED_LR: dict[str, float] = {
    "full": 1e-4, "full_model": 3e-5,
    "vera": 1e-2, "dvora": 1e-2, "dora_mag": 1e-2, "bitfit": 3e-3,
    "prompt": 3e-2, "prefix": 1e-2, "ptuning": 1e-2,
}
# where each value comes from; "measured" entries name the sweep's table
SOURCE: dict[str, str] = {
    "full": "prior: BERT fine-tuning rates (Devlin et al. 2019: 2e-5 to 1e-4 at larger batches)",
    "full_model": "prior: BERT fine-tuning rates (Devlin et al. 2019)",
    "vera": "prior: Kopiczko et al. 2024 (VeRA, arXiv:2310.11454) train the scaling vectors at ~10x LoRA's rate",
    "dvora": "prior: as VeRA",
    "dora_mag": "prior: a magnitude vector alone moves slowly at LoRA's rate",
    "bitfit": "prior: Ben Zaken et al. 2022 (BitFit, arXiv:2106.10199), 1e-4 to 1e-3 on BERT-large",
    "prompt": "prior: PEFT's prompt-tuning examples (3e-2)",
    "prefix": "prior: PEFT's prefix-tuning examples (1e-2)",
    "ptuning": "prior: PEFT's P-tuning examples (1e-2)",
}
AUTO_FACTORS = (1 / 3, 1.0, 3.0)  # the auto grid: each method's suggested rate / 3, x1, x3


def suggested_lr(method: str) -> float:
    """The suggested learning rate of ``method`` (``DEFAULT`` when none is recorded)."""
    return SUGGESTED_LR.get(method, DEFAULT)


def source(method: str) -> str:
    if method in ("lora", "dora", "bora"):
        return "measured: best of 3.33e-4, 1e-3, 3e-3 on validation, 3 seeds (docs/measured/learning_rates.md)"
    return SOURCE.get(method, "prior: LoRA's rate (not measured for this method yet)")


def auto_grid(method: str) -> list[float]:
    """The ``auto`` sweep's rates for ``method``: its suggested rate / 3, x1 and x3 (3 significant digits)."""
    return [float(f"{suggested_lr(method) * f:.3g}") for f in AUTO_FACTORS]
