"""``RunConfig``: the one object the UI, the CLI and the notebook API hand to the trainer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunConfig:
    """A side-by-side comparison: every (method, rank) pair is one run on the same data and seed."""

    model: str = "minilm"  # offline id ("minilm", "smollm2") or any Hugging Face model id
    task: str = "fine_foods"  # offline task, "synthetic_*", "glue/<name>", or a `datasets` id
    methods: list[str] = field(default_factory=lambda: ["lora", "dora", "bora"])  # registry names
    ranks: list[int] = field(default_factory=lambda: [8])  # one run per (method, rank)
    alpha: float = 16.0  # LoRA scaling numerator, s = alpha / r
    lr: float = 1e-3  # peak learning rate (AdamW); 2e-3 already stalls DoRA/BoRA at bs 8 on fine_foods
    steps: int = 150  # optimizer steps per run
    batch_size: int = 8  # defaults sized so lora,dora,bora x 150 steps on MiniLM take < 3 min on 2 CPU cores
    max_length: int = 40  # tokens per example (fine_foods reviews: median 69; 48 gains ~1% accuracy, costs 20%)
    seed: int = 0  # same seed, initial head and batch order for every run
    warmup_ratio: float = 0.06  # linear warm-up then cosine decay (BoRA table 6)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_every: int = 50  # steps between evaluations (and at the end)
    eval_samples: int = 200  # test examples per evaluation, a fixed seeded subset (0 = whole split)
    analyze_every: int = 10  # steps between magnitude/direction snapshots
    target_modules: list[str] | None = None  # None = architecture default (BERT: query,key,value,dense)
    analysis_module: str | None = None  # module type to analyse; None = attention query
    analysis_layers: list[int] | None = None  # layer indices to analyse; None = all
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"dora": {"detach_norm": False}}
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps"
    num_layers: int | None = None  # keep only the first N transformer layers (fast demos/tests)
    lockstep: bool = True  # advance all runs one step at a time (curves grow together)
    train_samples: int = 0  # cap on training examples (0 = all)
    text_column: str | None = None  # column mapping for custom `datasets` ids
    label_column: str | None = None
    num_threads: int = 0  # torch CPU threads while training; 0 = auto (all cores, or fewer when the CPU is busy)
    export_weights: bool = False  # keep the merged analysed weights at the start and end (safetensors)
    layer_checkpoints: int = 8  # analysis steps (besides step 0) whose W, ΔW are kept for "Inside a layer"; 0 = none

    def __post_init__(self):
        if not self.methods:
            raise ValueError("select at least one method")
        if not self.ranks or any((not isinstance(r, int)) or r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        for name in ("steps", "batch_size", "max_length", "eval_every", "analyze_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.layer_checkpoints < 0:
            raise ValueError(f"layer_checkpoints must be >= 0 (0 = none), got {self.layer_checkpoints}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0 = auto), got {self.num_threads}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")

    def run_specs(self) -> list[tuple[str, str, int]]:
        """``(run_id, method, rank)`` for every run, methods outer, ranks inner.

        A method without a rank (full fine-tuning, BitFit, prompts...) runs once, as
        ``(method, method, 0)``, whatever the ranks.
        """
        from bora_lab.methods.registry import METHODS  # late: keep config importable on its own

        specs = []
        for m in self.methods:
            if m in METHODS and not METHODS[m].uses_rank:
                specs.append((m, m, 0))
            else:
                specs.extend((f"{m}-r{r}", m, r) for r in self.ranks)
        return specs

    def run_ids(self) -> list[str]:
        """The run ids of :meth:`run_specs` (``"<method>-r<rank>"``, or ``"<method>"`` without a rank)."""
        return [s[0] for s in self.run_specs()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
