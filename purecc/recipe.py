"""Training recipes (method knobs) with the seed's defaults; validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class StageRecipe:
    """One stage's hyper-parameters. Defaults are stage 1's; use ``stage_recipe(2)`` for stage 2."""

    stage: int = 1
    steps: int = 1000
    lr: float = 4e-4
    batch_size: int = 1              # samples per concept per micro-step
    grad_accum: int = 4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    precondition: bool = True        # x0-parameterised loss (stage 1 default on, stage 2 off)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    eta: float = 2.0                 # stage 2: weight of L_pure
    lambda_mode: str = "fixed"       # stage 2: "fixed" or "adaptive"
    lambda_value: float = 1.0
    lambda_max: float = 2.0
    extractor: str = "stage1"        # stage 2: "stage1" (base + stage-1 LoRA) or "base"
    resolution: int = 512
    crop: str = "center"
    flip_prob: float = 0.0
    rank: int = 4
    alpha: float = 4.0
    checkpoint_every: int = 100
    # "auto": bf16 autocast on CUDA, none elsewhere (what bench/RESULTS.md measured); "no", "bf16", or
    # "fp16" (autocast with a dynamic loss scale per concept), as diffusers' --mixed_precision names them
    mixed_precision: str = "auto"
    # T5 tokens of the prompts (diffusers' SD3 trainer default, 77); recorded in the adapter manifest
    # so that serving encodes prompts the way training did
    max_sequence_length: int = 77
    # "mean": train on the VAE posterior's mean (the default: every testbed figure was measured so);
    # "sample": a fresh draw from the posterior every step, as diffusers' trainer does
    latent_sampling: str = "mean"

    def __post_init__(self) -> None:
        checks = {
            "stage": self.stage in (1, 2), "steps": self.steps >= 1, "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "lambda_mode": self.lambda_mode in ("fixed", "adaptive"),
            "extractor": self.extractor in ("stage1", "base"), "eta": self.eta >= 0,
            "resolution": self.resolution >= 16 and self.resolution % 16 == 0,
            "rank": self.rank >= 1, "checkpoint_every": self.checkpoint_every >= 1,
            "max_grad_norm": self.max_grad_norm > 0, "lambda_max": self.lambda_max >= 0,
            "mixed_precision": self.mixed_precision in MIXED_PRECISION,
            "max_sequence_length": 1 <= self.max_sequence_length <= 512,
            "latent_sampling": self.latent_sampling in ("mean", "sample"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("recipe: invalid " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    def to_dict(self) -> dict:
        """The recipe as a plain dict of its fields (``from_dict`` is the inverse)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StageRecipe":
        """Inverse of ``to_dict`` (JSON turns the betas tuple into a list)."""
        fields = dict(data)
        if "betas" in fields:
            fields["betas"] = tuple(fields["betas"])
        return cls(**fields)


STAGE2_DEFAULTS = dict(stage=2, steps=800, lr=1e-4, grad_accum=1, precondition=False)


def stage_recipe(stage: int, **overrides) -> StageRecipe:
    """The seed's recipe for ``stage`` (1: lr 4e-4, 1000 steps, 1 x 4; 2: lr 1e-4, 800 steps, eta 2)."""
    base = StageRecipe() if stage == 1 else StageRecipe(**STAGE2_DEFAULTS)
    if "betas" in overrides:
        overrides["betas"] = tuple(overrides["betas"])
    return replace(base, **overrides)
