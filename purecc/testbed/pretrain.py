"""Pretrain the tiny SD3-architecture model on the toy world: the committed ``assets/world-base``.

Two phases from one seed:

1. the VAE as an autoencoder on world images (reconstruction + a small KL term; crops first,
   whole images last), after which its ``shift_factor`` / ``scaling_factor`` are set from the
   measured latent statistics, as SD3 did for its own VAE;
2. the transformer with flow matching (logit-normal sigmas through the scheduler's shift, the
   velocity loss of ``purecc.losses.stage1_loss``) on cached latents, captions encoded once by the
   frozen, randomly initialised CLIP encoders, 10% of captions dropped to "" so classifier-free
   guidance works; the saved weights are an exponential moving average.

The result is written through ``save_pretrained`` (safetensors; transformer and VAE stored in
fp16 to keep the folder small), with ``pretrain.json`` (config, step counts, losses, times) and
``CHECKSUMS.sha256`` (``sha256sum -c`` format). It loads with ``purecc.model.load_pipeline(folder)``.

    python -m purecc.testbed.pretrain OUT_DIR [--preset NAME] [--minutes N] [--seed S] [--init DIR]

Presets: ``gpu-4x`` gave the committed base (``WORLD_BASE_MODEL``: a 4x VAE, 16x16 latents, 64 image
tokens) in two runs on one H200, the second continuing the first's transformer:

    python -m purecc.testbed.pretrain A --preset gpu-4x --vae-steps 2024 --vae-full-steps 337 --steps 1941
    python -m purecc.testbed.pretrain OUT --preset gpu-4x --init A --vae-steps 0 --vae-full-steps 0 \
        --steps 1800 --lr 1e-3

(the first was planned by ``--minutes 8``: 6.6 min; the second took 4.2 min; their reports are
``bench/results/world_base_4x_gpu_run1_pretrain.json`` and the base's own ``pretrain.json``).
``cpu-4x`` is the same model sized for this project's 2-core machine (an hour; far too little, see
bench/RESULTS.md). ``cpu`` and ``gpu`` train the previous base (``WORLD_BASE_8X_MODEL``, 8x VAE, 16 image
tokens; ``--preset gpu --minutes 7`` on one H200 gave it). ``--minutes N`` times a few steps of each phase
first and sets the step counts so the whole run fits N minutes on this machine; the planned counts are
recorded, and ``--vae-steps/--vae-full-steps/--steps`` with them reproduce the run. Same machine, same
counts, same thread count: the same weights on CPU (on CUDA, as close as cuDNN allows).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..losses import noisy_latents, per_sample_mse, sample_sigma, shifted_sigmas_table
from ..offline import quiet_libraries
from ..tiny import TinyConfig, build_tiny_pipeline
from .world import CONCEPT_LOOKS, world_batch
from .world_base import write_checksums

REPORT = "pretrain.json"

# The previous base: 64 px -> 8x8x16 latents -> 16 image tokens; hidden 128 (4 heads x 32), 4 blocks,
# one with attn2. Its VAE is what limits it: the VAE's round trip alone reads pattern 0.42 (2 px stripes
# are a quarter of an 8 px latent cell), and the base draws patterns at 0.41.
WORLD_BASE_8X_MODEL = TinyConfig(seed=0, num_layers=4, dual_attention_layers=(0,), heads=4, head_dim=32,
                                 clip_hidden=32, clip_layers=2, vae_channels=(16, 16, 32, 64))
# The committed base: the same transformer on a 4x VAE, 16x16x16 latents -> 8x8 = 64 image tokens (a 4x
# VAE's round trip reads pattern 0.79, shape 0.97). A training step on CPU costs ~1.2x the 8x base's (the
# 154 text tokens dominate), rendering 1.3x (bench/RESULTS.md, "World base").
WORLD_BASE_MODEL = TinyConfig(seed=0, num_layers=4, dual_attention_layers=(0,), heads=4, head_dim=32,
                              clip_hidden=32, clip_layers=2, vae_channels=(16, 32, 64), max_image_size=256)


@dataclass(frozen=True)
class PretrainConfig:
    """Data, VAE and transformer schedules of the world base (the ``cpu`` preset by default)."""

    seed: int = 0
    model: TinyConfig = field(default_factory=lambda: WORLD_BASE_8X_MODEL)
    device: str = "cpu"
    images: int = 16384               # world images, rendered once (data seed = seed)
    vae_steps: int = 2400             # on vae_crop x vae_crop crops (convolutions do not care)
    vae_full_steps: int = 200         # then on whole images (the mid-block attention does)
    vae_crop: int = 32
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_latent_noise: float = 0.1     # z = mean + noise * std * N(0, 1) while training
    kl_weight: float = 1e-4           # per latent element, against per-pixel MSE
    steps: int = 1800                 # transformer steps
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    threads: int = 1
    # Leave the sample concepts' looks (world.CONCEPT_LOOKS) out of the data. Off for the committed
    # base's presets, which were trained before those looks were reserved (so they reproduce it).
    reserve_concept_looks: bool = False
    # Continue from this saved base (its VAE and transformer; same model config) instead of a fresh
    # initialisation: a second run with ``vae_steps = vae_full_steps = 0`` trains its transformer further.
    init: str = ""

    def __post_init__(self) -> None:
        checks = {"images": self.images >= self.batch, "vae_steps": self.vae_steps >= 0,
                  "vae_full_steps": self.vae_full_steps >= 0,
                  "vae_crop": self.vae_crop % 8 == 0 and 8 <= self.vae_crop <= self.model.sample_size,
                  "steps": self.steps >= 1, "batch": self.batch >= 1, "vae_batch": self.vae_batch >= 1,
                  "lr": self.lr > 0, "vae_lr": self.vae_lr > 0, "threads": self.threads >= 1,
                  "caption_dropout": 0.0 <= self.caption_dropout < 1.0,
                  "ema_decay": 0.0 <= self.ema_decay < 1.0, "device": self.device in ("cpu", "cuda")}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("pretrain config: invalid " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))


PRESETS: dict[str, PretrainConfig] = {
    "cpu": PretrainConfig(),
    # Larger batches, more data, more steps. The previous (8x) base: this preset planned to 7 minutes
    # on one H200 (`--preset gpu --minutes 7`; step counts in bench/results/world_base_8x_pretrain.json).
    "gpu": PretrainConfig(device="cuda", images=65536, vae_steps=6000, vae_full_steps=1000, vae_batch=64,
                          steps=8000, batch=256, warmup=300, ema_decay=0.999),
    # The 4x-VAE model. ``cpu-4x``: 59 min on this project's 2-core machine (2 threads); its base
    # draws patterns and backgrounds but shapes at 0.25 (bench/RESULTS.md). ``gpu-4x``: the committed
    # base (two runs on one H200, module docstring).
    "cpu-4x": PretrainConfig(model=WORLD_BASE_MODEL, images=32768, vae_steps=2400, vae_full_steps=400,
                             steps=1800, threads=2, reserve_concept_looks=True),
    # Batch 1024 (the 8x base's 32 ms steps at 256 looked launch-bound): 105 ms a step on an H200, so
    # 3.3x the time for 4x the samples; lr raised a little with the batch.
    "gpu-4x": PretrainConfig(model=WORLD_BASE_MODEL, device="cuda", images=65536, vae_steps=6000,
                             vae_full_steps=1000, vae_batch=64, steps=8000, batch=1024, lr=1.5e-3, warmup=300,
                             ema_decay=0.999, reserve_concept_looks=True),
}


# ---------------------------------------------------------------- data

def world_pixels(seed: int, n: int, size: int, reserve_concept_looks: bool = True
                 ) -> tuple[torch.Tensor, list[str]]:
    """``n`` world images as uint8 (N, 3, size, size) and their captions."""
    batch = world_batch(seed, n, size, reserved=CONCEPT_LOOKS if reserve_concept_looks else frozenset())
    pixels = np.stack([np.asarray(img, dtype=np.uint8) for img, _, _ in batch])  # (N, H, W, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [c for _, c, _ in batch]


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


@torch.no_grad()
def encode_captions(pipe, captions: Sequence[str], chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings (N, L, D) and pooled (N, P) through the pipeline's text encoders (without T5,
    L = 77 CLIP tokens + 77 zero T5 tokens, as the pipeline and the trainer encode prompts)."""
    device = pipe.text_encoder.device
    embeds, pooled = [], []
    for i in range(0, len(captions), chunk):
        e, _, p, _ = pipe.encode_prompt(prompt=list(captions[i:i + chunk]), prompt_2=None, prompt_3=None,
                                        device=device, do_classifier_free_guidance=False,
                                        max_sequence_length=77)
        embeds.append(e.float())
        pooled.append(p.float())
    return torch.cat(embeds), torch.cat(pooled)


def _draw(n: int, high: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Random indices from the CPU generator (the same on every device), moved to ``device``."""
    return torch.randint(0, high, (n,), generator=g).to(device)


def _randn(shape, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(device)


# ---------------------------------------------------------------- phase 1: the VAE

def _vae_batch(pixels: torch.Tensor, crop: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """A random batch in [-1, 1], cropped to ``crop`` px at a multiple of 8 (the latent grid)."""
    x = to_unit(pixels[_draw(batch, len(pixels), g, pixels.device)])
    size = x.shape[-1]
    if crop < size:
        ox, oy = (int(v) * 8 for v in torch.randint(0, (size - crop) // 8 + 1, (2,), generator=g))
        x = x[..., oy:oy + crop, ox:ox + crop]
    return x                                                       # (B, 3, crop, crop)


def _vae_step(vae, opt, x: torch.Tensor, cfg: PretrainConfig, g: torch.Generator) -> torch.Tensor:
    dist = vae.encode(x).latent_dist
    z = dist.mean + cfg.vae_latent_noise * dist.std * _randn(dist.mean.shape, g, x.device)
    recon = vae.decode(z).sample
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
    loss = (recon - x).pow(2).mean() + 0.5 * (recon - x).abs().mean() + cfg.kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return loss.detach()


def train_vae(vae, pixels: torch.Tensor, cfg: PretrainConfig, progress: bool) -> list[float]:
    """Autoencoder training in place: crops first, whole images last; returns per-step losses."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    total = cfg.vae_steps + cfg.vae_full_steps
    losses = []
    for step in tqdm(range(total), desc="vae", disable=not progress, unit="step"):
        crop = cfg.vae_crop if step < cfg.vae_steps else pixels.shape[-1]
        for group in opt.param_groups:  # cosine to 10% over the planned steps
            group["lr"] = cfg.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        losses.append(_vae_step(vae, opt, _vae_batch(pixels, crop, cfg.vae_batch, g), cfg, g))
    vae.eval()
    return [float(v) for v in losses]


@torch.no_grad()
def encode_world_latents(vae, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Posterior means (N, 16, h, w), unscaled."""
    return torch.cat([vae.encode(to_unit(pixels[i:i + chunk])).latent_dist.mean
                      for i in range(0, len(pixels), chunk)])


# ---------------------------------------------------------------- phase 2: the transformer

def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class _FlowStep:
    """One flow-matching step of the transformer on cached latents and caption embeddings."""

    def __init__(self, transformer, sigma_table: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor],
                 latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, cfg: PretrainConfig):
        self.tr, self.table, self.cfg = transformer, sigma_table, cfg
        self.e_empty, self.p_empty = empty                                  # (1, L, D), (1, P)
        self.latents, self.embeds, self.pooled = latents, embeds, pooled   # (N, 16, h, w), (N, L, D), (N, P)
        self.opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay)

    def __call__(self, step: int, g: torch.Generator) -> torch.Tensor:
        cfg, dev = self.cfg, self.latents.device
        idx = _draw(cfg.batch, len(self.latents), g, dev)
        x0 = self.latents[idx]
        drop = (torch.rand(cfg.batch, generator=g) < cfg.caption_dropout).to(dev).view(-1, 1, 1)
        e = torch.where(drop, self.e_empty, self.embeds[idx])
        p = torch.where(drop.view(-1, 1), self.p_empty, self.pooled[idx])
        eps = _randn(x0.shape, g, dev)
        sigma = sample_sigma(self.table, cfg.batch, g).to(dev)
        v = self.tr(hidden_states=noisy_latents(x0, eps, sigma), timestep=sigma * 1000,
                    encoder_hidden_states=e, pooled_projections=p, return_dict=False)[0]
        loss = per_sample_mse(v, eps - x0).mean()  # = stage1_loss(..., precondition=False)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.tr.parameters(), 1.0)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        self.opt.step()
        return loss.detach()


def train_transformer(pipe, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                      cfg: PretrainConfig, progress: bool):
    """Flow-matching training; returns (EMA transformer, per-step losses)."""
    pipe.transformer.train()
    ema = copy.deepcopy(pipe.transformer).eval().requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(pipe.transformer.parameters())
    flow_step = _FlowStep(pipe.transformer, shifted_sigmas_table(pipe.scheduler), encode_captions(pipe, [""]),
                          latents, embeds, pooled, cfg)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    losses = []
    bar = tqdm(range(cfg.steps), desc="transformer", disable=not progress, unit="step")
    for step in bar:
        losses.append(flow_step(step, g))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - min(cfg.ema_decay, (1 + step) / (10 + step)))
        if step % 100 == 0:  # a host sync, so not every step
            bar.set_postfix(loss=f"{float(torch.stack(losses[-100:]).mean()):.4f}")
    pipe.transformer.eval()
    return ema, [float(v) for v in losses]


# ---------------------------------------------------------------- planning by wall-clock

def _seconds_per_step(fn, warmup: int = 3, timed: int = 10) -> float:
    for i in range(warmup):
        fn(i)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(timed):
        fn(i)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / timed


def plan_steps(pipe, pixels: torch.Tensor, cfg: PretrainConfig, seconds: float) -> PretrainConfig:
    """Step counts that fit ``seconds`` on this machine: a few steps of each phase are timed on
    copies of the models (the run itself is untouched); the VAE gets a quarter of the time,
    split between crops and whole images as in ``cfg``; the transformer the rest."""
    g = torch.Generator().manual_seed(12345)
    vae = copy.deepcopy(pipe.vae).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    size = pixels.shape[-1]

    def vae_step(crop: int) -> torch.Tensor:
        return _vae_step(vae, opt, _vae_batch(pixels, crop, cfg.vae_batch, g), cfg, g)

    t_crop = _seconds_per_step(lambda i: vae_step(cfg.vae_crop))
    t_full = _seconds_per_step(lambda i: vae_step(size))
    tr = copy.deepcopy(pipe.transformer).train()
    n, dev, h = 4 * cfg.batch, pixels.device, size // cfg.model.vae_factor
    e, p = encode_captions(pipe, [""])                               # (1, L, D), (1, P)
    step = _FlowStep(tr, shifted_sigmas_table(pipe.scheduler), (e, p), torch.randn(n, 16, h, h, device=dev),
                     torch.randn(n, *e.shape[1:], device=dev), torch.randn(n, p.shape[1], device=dev), cfg)
    t_tr = _seconds_per_step(lambda i: step(i, g))
    share_full = cfg.vae_full_steps * t_full / max(1e-9, cfg.vae_steps * t_crop + cfg.vae_full_steps * t_full)
    vae_seconds = 0.25 * seconds
    return replace(cfg, vae_steps=int(vae_seconds * (1 - share_full) / t_crop),
                   vae_full_steps=int(vae_seconds * share_full / t_full),
                   steps=max(cfg.warmup + 1, int(0.75 * seconds / t_tr)))


# ---------------------------------------------------------------- the whole run

def pretrain_world_base(out: str | Path, cfg: PretrainConfig = PretrainConfig(), *,
                        minutes: float | None = None, progress: bool = True) -> Path:
    """Train the world base and write it to ``out`` (must not exist or be empty).

    ``minutes``: plan the step counts to fit this wall-clock time (``plan_steps``).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out: {out} exists and is not empty; refusing to overwrite it")
    quiet_libraries()
    torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda":  # as reproducible as cuDNN allows; TF32 matmuls (the H200's fp32 path)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        torch.backends.cuda.matmul.allow_tf32 = True
    start, cpu_start = time.monotonic(), time.process_time()
    device = torch.device(cfg.device)
    pipe = build_tiny_pipeline(cfg.model)
    if cfg.init:
        _load_init(pipe, Path(cfg.init))
    pipe = pipe.to(device)
    pixels, captions = world_pixels(cfg.seed, cfg.images, cfg.model.sample_size, cfg.reserve_concept_looks)
    pixels = pixels.to(device)
    if minutes:
        spent = time.monotonic() - start
        cfg = plan_steps(pipe, pixels, cfg, max(60.0, minutes * 60.0 - 2 * spent - 30.0))
    t_data = time.monotonic() - start

    vae_losses = train_vae(pipe.vae, pixels, cfg, progress)
    t_vae = time.monotonic() - start
    raw = encode_world_latents(pipe.vae, pixels)
    shift, scale = float(raw.mean()), float(1.0 / raw.std())
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    embeds, pooled = encode_captions(pipe, captions)

    ema, tr_losses = train_transformer(pipe, (raw - shift) * scale, embeds, pooled, cfg, progress)
    pipe.transformer.load_state_dict(ema.state_dict())
    seconds = {"data_and_planning": t_data, "vae": t_vae - t_data, "total": time.monotonic() - start,
               "cpu_total": time.process_time() - cpu_start}
    report = {"config": asdict(cfg), "minutes_planned": minutes, "vae_shift_factor": shift,
              "vae_scaling_factor": scale, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "vae_loss_last100": _tail_mean(vae_losses), "loss_last100": _tail_mean(tr_losses),
              "torch": torch.__version__, "device_name": _device_name(device)}
    return _save(pipe.to("cpu"), out, report)


def _load_init(pipe, folder: Path) -> None:
    """Load a saved base's VAE and transformer (as fp32) into ``pipe``, built from the same model config;
    its text encoders must equal ``pipe``'s (they are not trained, only rebuilt from the seed)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"init: {folder} is not a saved world base (no model_index.json)")
    for name, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL)):
        saved = cls.from_pretrained(folder, subfolder=name, torch_dtype=torch.float32)
        try:
            getattr(pipe, name).load_state_dict(saved.state_dict())
        except RuntimeError as exc:
            raise ValueError(f"init: {folder}'s {name} does not match the preset's model config") from exc
        if name == "vae":
            pipe.vae.register_to_config(shift_factor=saved.config.shift_factor,
                                        scaling_factor=saved.config.scaling_factor)
    from transformers import CLIPTextModelWithProjection
    te = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32)
    if any(not torch.equal(a, b) for a, b in zip(te.state_dict().values(), pipe.text_encoder.state_dict().values())):
        raise ValueError(f"init: {folder}'s text encoder differs from the one this config builds (another seed?)")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _tail_mean(values: list[float], n: int = 100) -> float | None:
    tail = values[-n:]
    return round(sum(tail) / len(tail), 5) if tail else None


def _save(pipe, out: Path, report: dict) -> Path:
    """Write the pipeline (fp16 transformer/VAE), the report and the checksums; atomically named."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_checksums(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``OUT_DIR [--preset cpu|gpu] [--minutes N] [--seed S] ...``; trains and writes the world base."""
    parser = argparse.ArgumentParser(prog="python -m purecc.testbed.pretrain",
                                     description="Pretrain the tiny SD3 model on the toy world.")
    parser.add_argument("out", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--minutes", type=float, default=None,
                        help="plan the step counts to fit this many minutes (default: the preset's counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE steps on crops")
    parser.add_argument("--vae-full-steps", type=int, default=None, help="VAE steps on whole images")
    parser.add_argument("--steps", type=int, default=None, help="transformer steps")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="transformer peak learning rate")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this saved base (use with --vae-steps 0 --vae-full-steps 0)")
    args = parser.parse_args(argv)
    counts = {"vae_steps": args.vae_steps, "vae_full_steps": args.vae_full_steps, "steps": args.steps,
              "lr": args.lr, "init": str(args.init) if args.init else None}
    cfg = replace(PRESETS[args.preset], seed=args.seed, threads=args.threads or PRESETS[args.preset].threads,
                  **{k: v for k, v in counts.items() if v is not None})
    t0 = time.monotonic()
    path = pretrain_world_base(args.out, cfg, minutes=args.minutes)
    print(f"world base written to {path} in {(time.monotonic() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
