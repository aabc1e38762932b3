"""``RunConfig``: the one object the UI, the CLI and the Python API hand to the engine.

Every setting is described once, here: its default, label, help, group and bounds live in the
field's metadata (as a method's options do in its ``AdapterConfig``). The CLI's flags, the app's
widgets and labels, and validation are generated from it, so a new setting is one ``setting(...)``
line. Bounds are checked in ``__post_init__``: a bad value raises ``ValueError`` naming the field.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

MAIN, TRAINING, MODULES, COLUMNS, MORE = ("", "Training details", "Adapted and analysed modules",
                                          "Custom dataset columns", "More settings")
GROUPS = (MAIN, TRAINING, MODULES, COLUMNS, MORE)  # the app's order: main column, then one accordion each
DEVICES = ("auto", "cpu", "cuda", "mps")
SPEED_ONLY = ("num_threads",)  # settings that change how fast a comparison runs, never its numbers
MEASURED_MODELS = ("minilm", "offline:all-minilm-l6-v2", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")  # where methods.rates was measured


def setting(default: Any, label: str, help: str, group: str | None = MORE, *, min: float | None = None,
            above: float | None = None, max: float | None = None, limit: str | None = None,
            choices: tuple | None = None, flag: str | None = None, cli_help: str | None = None,
            factory: Any = None) -> Field:
    """A ``RunConfig`` field with its one description.

    Args:
        default: the default value (``factory`` for lists and dicts).
        label: the app's label, e.g. "Learning rate".
        help: one line for the app's info text and the CLI's help.
        group: the app's group (``GROUPS``); ``None`` keeps the field out of the app's form.
        min, max: inclusive bounds of a number, or of each item of a list of numbers.
        above: an exclusive lower bound (the value must be greater).
        limit: the name of an operator limit (``bora_lab.limits``) that may lower ``max``.
        choices: the allowed values.
        flag: the CLI flag when not ``--<name with dashes>``; ``""`` for no flag.
        cli_help: the CLI's help when it differs from ``help`` (e.g. "comma-separated").
    """
    meta = {"label": label, "help": help, "group": group, "min": min, "above": above, "max": max, "limit": limit, "choices": choices,
            "flag": flag, "cli_help": cli_help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """A side-by-side comparison: every (method, rank) pair is one run on the same data and seed."""

    model: str = setting("minilm", "Model", "offline: minilm (BERT encoder), smollm2 (Llama decoder); "
                         "or any Hugging Face model id", MAIN)
    task: str = setting("fine_foods", "Task", "offline: fine_foods, austen_books, austen_lm, synthetic_*; "
                        "online: glue/<name> or any datasets id", MAIN)
    methods: list[str] = setting(None, "Methods", "one run per method and rank, all on the same seed and batches",
                                 MAIN, factory=lambda: ["lora", "dora", "bora"], cli_help="comma-separated method names")
    ranks: list[int] = setting(None, "Ranks", "one run per rank for each method that has one", MAIN, min=1, max=4096,
                               factory=lambda: [8], cli_help="comma-separated ranks")
    alpha: float = setting(16.0, "Alpha", "LoRA scaling numerator, s = alpha / r", MAIN, min=0)
    # 2e-3 already stalls DoRA/BoRA at batch size 8 on fine_foods
    lr: float = setting(1e-3, "Learning rate", "AdamW peak learning rate", MAIN, above=0, max=1e6)
    per_method_lr: bool = setting(True, "Each method at its suggested rate", "on the default model and task "
                                  "(MiniLM, fine_foods), where the rates were measured (docs/measured/"
                                  "learning_rates.md), each method trains at its own suggested rate; off, with a "
                                  "rate above other than 1e-3, or on any other model or task, every method uses "
                                  "the rate above", MAIN, flag="")
    match_params: str | None = setting(None, "Match parameters to", "give every method the largest rank whose "
                                       "adapter parameters do not exceed this method's at each chosen rank (BoRA "
                                       "paper, table 3); empty = the same rank for all", MAIN)
    method_ranks: dict[str, list[int]] = setting(None, "Ranks per method", "set by match_params: each method's "
                                                 "own ranks", None, factory=dict, flag="")
    lrs: list[float] | None = setting(None, "Learning rates (sweep)", "train every run at each of these rates; "
                                      "each method is then reported at its best rate on the validation split; "
                                      "empty = the one rate above", MAIN, above=0, max=1e6,
                                      cli_help="comma-separated rates, e.g. 3e-4,1e-3,3e-3")
    lr_auto: bool = setting(False, "Auto learning-rate sweep", "sweep each method's suggested rate /3, x1 "
                            "and x3 (docs/measured/learning_rates.md) and report each at its best on validation",
                            MAIN, flag="")
    # defaults sized so lora,dora,bora x 150 steps on MiniLM take < 3 min on 2 CPU cores
    steps: int = setting(150, "Steps", "optimizer steps per run", MAIN, min=1, max=100_000, limit="steps")
    batch_size: int = setting(8, "Batch size", "examples per step", MAIN, min=1, max=1024, limit="batch_size")
    seed: int = setting(0, "Seed", "same seed, initial head and batch order for every run", MAIN, min=0, max=2**32 - 1)
    seeds: list[int] | None = setting(None, "Seeds", "repeat every run with each seed (adapter and head "
                                      "initialisation, data order, dropout; all methods share them within a seed) "
                                      "and report means with 95% intervals; empty = the one seed above", MAIN,
                                      min=0, max=2**32 - 1, cli_help="comma-separated seeds, e.g. 0,1,2")
    baseline: str | None = setting(None, "Baseline", "the method (or run group, e.g. lora-r8) every other is "
                                   "compared with, paired on seeds and test examples; empty = lora, else the first",
                                   MAIN)
    # fine_foods reviews: median 69 tokens; 48 gains ~1% accuracy and costs 20% time
    max_length: int = setting(40, "Max tokens", "tokens per example", TRAINING, min=1, max=8192, limit="max_length")
    num_layers: int | None = setting(None, "Layers kept", "keep only the first N transformer layers (fewer = faster "
                                     "demo); empty or 0 = all", TRAINING, min=1, max=1000)
    train_samples: int = setting(0, "Training examples", "cap on training examples; 0 = all", TRAINING,
                                 min=0, max=10_000_000)
    warmup_ratio: float = setting(0.06, "Warm-up ratio", "share of steps in linear warm-up, then cosine decay "
                                  "(BoRA paper, table 6)", TRAINING, min=0, max=0.999)
    weight_decay: float = setting(0.0, "Weight decay", "AdamW decoupled weight decay", TRAINING, min=0, max=10)
    grad_clip: float = setting(1.0, "Gradient clipping", "max gradient norm; 0 = off", TRAINING, min=0)
    head: str = setting("classifier+pooler", "Trained head", "what of the task head trains with every method: "
                        "classifier+pooler (BERT's pooler too; frozen, MiniLM stays near the majority class), "
                        "classifier, or none; counted apart from the adapter's parameters", TRAINING,
                        choices=("classifier+pooler", "classifier", "none"))
    eval_every: int = setting(50, "Evaluate every", "steps between evaluations (and at the end)", TRAINING,
                              min=1, max=100_000)
    eval_samples: int = setting(200, "Eval examples", "test examples per evaluation, a fixed seeded subset; "
                                "0 = the whole test split", TRAINING, min=0, max=1_000_000,
                                limit="eval_samples")
    val_samples: int = setting(0, "Validation examples", "carved from the training data (seeded, stratified by "
                               "class), evaluated with every evaluation; the best checkpoint is chosen on it, "
                               "the reported numbers stay on the test examples; 0 = none", TRAINING, min=0,
                               max=1_000_000, limit="eval_samples")
    lockstep: bool = setting(True, "Lockstep", "advance all runs one step at a time, so curves grow together",
                             TRAINING, flag="", cli_help="")
    engine: str = setting("auto", "Engine", "shared: runs of layer-level methods share one frozen base and step "
                          "as one batch (same numbers, faster); per_copy: one model copy per run; auto: shared "
                          "when two or more runs can", TRAINING, choices=("auto", "shared", "per_copy"))
    device: str = setting("auto", "Device", "auto = cuda, then mps, then cpu", TRAINING, choices=DEVICES)
    target_modules: list[str] | None = setting(None, "Target modules", "modules to adapt; empty = the "
                                               "architecture's default (BERT: query, key, value, dense)", MODULES,
                                               cli_help="comma-separated module names to adapt (default: the "
                                               "architecture's, BERT: query,key,value,dense)")
    analysis_module: str | None = setting(None, "Analysed module", "module type whose ΔM/ΔD is tracked; empty = "
                                          "the attention query (as in the BoRA paper)", MODULES)
    analyze_every: int = setting(10, "Analyse every", "steps between ΔM/ΔD snapshots", MODULES, min=1, max=100_000)
    analysis_layers: list[int] | None = setting(None, "Analysed layers", "layer indices to analyse, e.g. 0, 2, 4 "
                                                "or 0-3; empty = all", MODULES, min=0, max=1000, flag="--layers",
                                                cli_help="comma-separated layer indices to analyse (default: all)")
    layer_checkpoints: int = setting(8, "Layer checkpoints", "analysis steps (besides step 0) whose W and ΔW are "
                                     "kept for 'Inside a layer'; 0 = none", MODULES, min=0, max=64)
    text_column: str | None = setting(None, "Text column", "custom datasets only; empty = guess", COLUMNS)
    label_column: str | None = setting(None, "Label column", "custom datasets only; empty = guess", COLUMNS)
    method_options: dict[str, dict[str, Any]] = setting(None, "Method options", "per-method options, e.g. "
                                                        '{"dora": {"detach_norm": false}}', None, factory=dict,
                                                        flag="")
    num_threads: int = setting(0, "CPU threads", "torch CPU threads while training; 0 = auto (the cores that "
                               "other processes leave idle now)", MORE, min=0, max=1024)
    export_weights: bool = setting(False, "Export weights", "keep the merged analysed weights at the start and "
                                   "the end (safetensors)", MORE, flag="")
    # docs/distributed.md: Ray for many runs, `accelerate launch` (data parallel) for one big run
    ray: str | None = setting(None, "Ray cluster", "spread the runs over Ray workers, one group per seed (or "
                              "shared-engine group): auto = a local Ray on this machine (a worker per GPU or CPU "
                              "group), or a cluster's address; empty = in this process (pip install '.[ray]')", MORE)
    grad_accum: int = setting(1, "Gradient accumulation", "split each step's batch into this many micro-batches "
                              "(the same batch, less memory); under `accelerate launch` it is also split over "
                              "the processes", MORE, min=1, max=1024)
    grad_checkpointing: bool = setting(False, "Gradient checkpointing", "recompute activations in the backward "
                                       "pass: less memory, slower steps (Hugging Face models)", MORE, flag="")

    def __post_init__(self):
        if self.num_layers == 0:  # the app's and CLI's "0 = all"
            self.num_layers = None
        if not self.seeds:
            self.seeds = None
        elif not isinstance(self.seeds, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise SettingError("seeds", f"must be a list of whole numbers, got {self.seeds!r}")
        if not self.methods:
            raise ValueError("select at least one method")
        if isinstance(self.methods, tuple):
            self.methods = list(self.methods)
        if not isinstance(self.methods, list) or not all(isinstance(m, str) and m.strip() for m in self.methods):
            raise SettingError("methods", f"must be a list of method names, e.g. ['lora', 'dora'], got {self.methods!r}")
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        for f in fields(self):
            check_value(f, getattr(self, f.name))
        if self.seeds:
            self.seed = self.seeds[0]  # the comparison's seed: its eval subset, and the one seed of single runs
        if not self.lrs:
            self.lrs = None
        self._check_budget()

    def _check_budget(self) -> None:
        """Bounds across fields: runs per comparison, snapshots per run, threads per machine."""
        from . import limits

        most = limits.limit("runs")
        if len(self.methods) * len(self.ranks) > most and len(self.run_specs()) > most:
            raise SettingError("methods", f"x ranks make {len(self.run_specs())} runs; at most {most} per comparison")
        snaps, most = self.steps // self.analyze_every, limits.limit("snapshots")
        if snaps > most:
            raise SettingError("analyze_every", f"{self.analyze_every} with {self.steps:,} steps means {snaps:,} "
                               f"ΔM/ΔD snapshots per run; at most {most:,}: analyse every "
                               f"{-(-self.steps // most)} steps or more")
        cores = os.cpu_count() or 1
        if self.num_threads > cores:
            raise SettingError("num_threads", f"must be <= {cores} (the cores of this machine; 0 = auto), "
                               f"got {self.num_threads}")
    def run_seeds(self) -> list[int]:
        """The seeds every run is repeated with: ``seeds``, else ``[seed]``."""
        return list(dict.fromkeys(self.seeds)) if self.seeds else [self.seed]

    def sweeps_lr(self) -> bool:
        """Whether runs are repeated over learning rates (``lr_auto`` or two or more ``lrs``)."""
        return self.lr_auto or len(set(self.lrs or [])) > 1

    def run_lrs(self, method: str) -> list[float]:
        """The learning rates ``method`` trains with: its auto grid, ``lrs``, its suggested rate, or ``[lr]``."""
        from bora_lab.methods.rates import auto_grid, suggested_lr  # late: keep config importable on its own

        if self.lr_auto:
            return auto_grid(method)
        if self.lrs:
            return list(dict.fromkeys(self.lrs))
        return [suggested_lr(method)] if self.suggested_rates_apply() else [self.lr]

    def suggested_rates_apply(self) -> bool:
        """Whether each method trains at its own suggested rate: ``per_method_lr`` on the model and task
        the rates were measured on (MiniLM on fine_foods), with no sweep and ``lr`` left at its default
        (a rate asked for is the rate every method trains at)."""
        default_lr = type(self).__dataclass_fields__["lr"].default
        return bool(self.per_method_lr and self.lr == default_lr and self.task == "fine_foods"
                    and self.model.strip().lower() in MEASURED_MODELS)

    def run_plan(self) -> list[tuple[str, str, int, int, float]]:
        """``(run_id, method, rank, seed, lr)`` for every run: methods outer, then ranks, rates, seeds.

        A method without a rank (full fine-tuning, BitFit, prompts...) runs once per seed and rate, as
        ``(method, method, 0, seed, lr)``, whatever the ranks. Run ids end in ``-lr<rate>`` when the
        rates are swept and in ``-s<seed>`` with several seeds (``lora-r8-lr0.001-s1``); else they are
        ``lora-r8``.
        """
        from bora_lab.methods.registry import METHODS  # late: keep config importable on its own

        seeds = self.run_seeds()
        s_tag = (lambda s: f"-s{s}") if len(seeds) > 1 else (lambda s: "")
        lr_tag = (lambda lr: f"-lr{lr:g}") if self.sweeps_lr() else (lambda lr: "")
        plan = []
        for m in self.methods:
            ranks = self.method_ranks.get(m) or self.ranks
            pairs = [(m, 0)] if m in METHODS and not METHODS[m].uses_rank else [(f"{m}-r{r}", r) for r in ranks]
            plan.extend((rid + lr_tag(lr) + s_tag(s), m, r, s, lr) for rid, r in pairs
                        for lr in self.run_lrs(m) for s in seeds)
        return plan

    def run_specs(self) -> list[tuple[str, str, int]]:
        """``(run_id, method, rank)`` of :meth:`run_plan`."""
        return [(rid, m, r) for rid, m, r, *_ in self.run_plan()]

    def run_ids(self) -> list[str]:
        """The run ids of :meth:`run_specs` (``"<method>-r<rank>"``, or ``"<method>"`` without a rank)."""
        return [s[0] for s in self.run_specs()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def results_key(self) -> str:
        """A hash of what decides the numbers of this comparison: every setting but ``num_threads``
        (speed only) and the run plan (each run's seed and learning rate: the suggested rates may change).
        Two configurations with one key compute the same results; caches of finished comparisons use it."""
        import hashlib
        import json

        settings = {k: v for k, v in self.to_dict().items() if k not in SPEED_ONLY}
        blob = json.dumps({"config": settings, "plan": self.run_plan()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in lr_choice(d).items() if k in known})


class SettingError(ValueError):
    """A setting out of its bounds: ``str()`` names it (``"steps must be >= 1, got 0"``); the app
    says ``label + problem`` instead (``"Steps must be >= 1, got 0"``)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem

    def for_people(self) -> str:
        """The message with the field's label in place of its name."""
        f = RunConfig.__dataclass_fields__.get(self.name)
        return f"{f.metadata['label'] if f else self.name} {self.problem}"


def check_value(f: Field, value: Any) -> None:
    """Check ``value`` against the bounds and choices of field ``f``.

    Raises:
        ValueError: ``"<name> must be >= <min>, got <value>"`` and the like.
    """
    meta, name = f.metadata, f.name
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise SettingError(name, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    lo, above, hi = meta.get("min"), meta.get("above"), meta.get("max")
    if meta.get("limit"):
        from .limits import limit

        hi = min(hi, limit(meta["limit"])) if hi is not None else limit(meta["limit"])
    if lo is None and above is None and hi is None:
        return
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SettingError(name, f"must be a number, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise SettingError(name, f"must be a finite number, got {v}")
        if lo is not None and v < lo:
            raise SettingError(name, f"must be >= {lo}, got {_shown(v)}")
        if above is not None and v <= above:
            raise SettingError(name, f"must be > {above}, got {_shown(v)}")
        if hi is not None and v > hi:
            raise SettingError(name, f"must be <= {hi:,}, got {_shown(v)}")


def _shown(v: float) -> str:
    """A number for a message: ``1,000,000``, or ``a 4,000-digit number`` (never a page of digits)."""
    if isinstance(v, int) and abs(v) >= 10**30:
        try:
            digits = f"{len(str(abs(v))):,}"
        except ValueError:  # longer than Python converts to text (4,300 digits by default)
            digits = f"~{int(abs(v).bit_length() * 0.30103) + 1:,}"
        return f"a {digits}-digit number"
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def settings(group: str | None = "any") -> list[Field]:
    """The ``RunConfig`` fields, in order; only those of ``group`` when given (``None``: not in the app)."""
    return [f for f in fields(RunConfig) if group == "any" or f.metadata.get("group") == group]


def default_of(f: Field) -> Any:
    """The default value of a ``RunConfig`` field."""
    return f.default_factory() if f.default is MISSING else f.default


def lr_choice(settings: dict[str, Any], given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``settings`` with ``per_method_lr`` off where a learning rate was asked for and the per-method
    choice was not: a rate given (a ``--lr`` flag in ``given``, or ``lr`` in a saved file or lesson that
    predates ``per_method_lr``) is the rate every method trains at."""
    given = settings if given is None else given
    if "per_method_lr" not in given and ("lr" in given or ("lr" in settings and "per_method_lr" not in settings)):
        return {**settings, "per_method_lr": False}
    return settings
