"""Pretrain the tiny SD3-architecture model on the toy world: the committed ``world-base``.

Two phases, both on CPU, both from one seed:

1. the VAE as an autoencoder on world images (reconstruction + a small KL term), after which
   its ``shift_factor`` / ``scaling_factor`` are set from the measured latent statistics, as
   SD3 did for its own VAE;
2. the transformer with flow matching (logit-normal sigmas through the scheduler's shift, the
   velocity loss of ``losses.stage1_loss``) on cached latents, captions encoded once by the
   frozen, randomly initialised CLIP encoders, 10% of captions dropped to "" so classifier-free
   guidance works; the saved weights are an exponential moving average.

The result is written through ``save_pretrained`` (safetensors; transformer and VAE stored in
fp16 to keep the folder small), with ``pretrain.json`` (config, losses, time) and
``CHECKSUMS.sha256`` (``sha256sum -c`` format). It loads with ``load_pipeline(folder)``.

    python -m purecc.pretrain OUT_DIR [--minutes N] [--seed S]

Same machine, same thread count, no ``--minutes``: the same weights. ``--minutes`` caps the
wall-clock time (the phases share it 1:4), which makes the step counts depend on the machine.
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

from .fileio import sha256_file
from .losses import noisy_latents, per_sample_mse, sample_sigma, shifted_sigmas_table
from .tiny import TinyConfig, build_tiny_pipeline
from .world import world_batch

CHECKSUMS = "CHECKSUMS.sha256"
REPORT = "pretrain.json"
PACKAGED_WORLD_BASE = Path(__file__).resolve().parent / "assets" / "world-base"

# 64 px -> 8x8x16 latents -> 16 image tokens; hidden 128 (4 heads x 32), 4 blocks, one with attn2.
WORLD_BASE_MODEL = TinyConfig(seed=0, num_layers=4, dual_attention_layers=(0,), heads=4, head_dim=32,
                              clip_hidden=32, clip_layers=2, vae_channels=(16, 16, 32, 64))


@dataclass(frozen=True)
class PretrainConfig:
    """Data, VAE and transformer schedules of the world base. Times are for 1 CPU thread."""

    seed: int = 0
    model: TinyConfig = field(default_factory=lambda: WORLD_BASE_MODEL)
    images: int = 16384               # world images, rendered once (data seed = seed)
    vae_steps: int = 900
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4           # per latent element, against per-pixel MSE
    steps: int = 2000                 # transformer steps
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    threads: int = 1

    def __post_init__(self) -> None:
        checks = {"images": self.images >= self.batch, "vae_steps": self.vae_steps >= 0,
                  "steps": self.steps >= 1, "batch": self.batch >= 1, "vae_batch": self.vae_batch >= 1,
                  "lr": self.lr > 0, "vae_lr": self.vae_lr > 0, "threads": self.threads >= 1,
                  "caption_dropout": 0.0 <= self.caption_dropout < 1.0,
                  "ema_decay": 0.0 <= self.ema_decay < 1.0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("pretrain config: invalid " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))


def world_base_path() -> Path:
    """The packaged, pretrained world base (a diffusers SD3 folder)."""
    return PACKAGED_WORLD_BASE


# ---------------------------------------------------------------- checksums

def write_checksums(folder: str | Path) -> Path:
    """Write ``CHECKSUMS.sha256`` listing every other file of ``folder`` (sorted, posix paths)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    out = folder / CHECKSUMS
    out.write_text("".join(lines))
    return out


def verify_world_base(path: str | Path | None = None) -> list[str]:
    """Check ``path`` (default: the packaged base) against its ``CHECKSUMS.sha256``.

    Returns the listed files; raises ``ValueError`` naming every file that is missing, differs,
    or is present but unlisted.
    """
    folder = Path(path) if path is not None else world_base_path()
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise ValueError(f"world base: {folder} has no {CHECKSUMS}")
    expected = {}
    for line in listing.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    problems = []
    for name, digest in sorted(expected.items()):
        f = folder / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{name}: sha256 differs from {CHECKSUMS}")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.name != CHECKSUMS}
    problems += [f"{name}: not listed in {CHECKSUMS}" for name in sorted(present - set(expected))]
    if problems:
        raise ValueError(f"world base {folder}: " + "; ".join(problems))
    return sorted(expected)


# ---------------------------------------------------------------- data

def world_pixels(seed: int, n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` world images as uint8 (N, 3, size, size) and their captions."""
    batch = world_batch(seed, n, size)
    pixels = np.stack([np.asarray(img, dtype=np.uint8) for img, _, _ in batch])  # (N, H, W, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [c for _, c, _ in batch]


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


@torch.no_grad()
def encode_captions(pipe, captions: Sequence[str], chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings (N, 77, D) and pooled (N, P) through the pipeline's text encoders."""
    embeds, pooled = [], []
    for i in range(0, len(captions), chunk):
        e, _, p, _ = pipe.encode_prompt(prompt=list(captions[i:i + chunk]), prompt_2=None, prompt_3=None,
                                        device=torch.device("cpu"), do_classifier_free_guidance=False,
                                        max_sequence_length=77)
        embeds.append(e.float())
        pooled.append(p.float())
    return torch.cat(embeds), torch.cat(pooled)


# ---------------------------------------------------------------- phase 1: the VAE

def train_vae(vae, pixels: torch.Tensor, cfg: PretrainConfig, deadline: float | None,
              progress: bool) -> list[float]:
    """Autoencoder training in place; returns the loss of every step."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    losses = []
    for step in tqdm(range(cfg.vae_steps), desc="vae", disable=not progress, unit="step"):
        if deadline is not None and time.monotonic() > deadline:
            break
        idx = torch.randint(0, len(pixels), (cfg.vae_batch,), generator=g)
        x = to_unit(pixels[idx])                                   # (B, 3, H, W)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).mean()
        loss = (recon - x).pow(2).mean() + 0.5 * (recon - x).abs().mean() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for group in opt.param_groups:  # cosine to 10% over the planned steps
            group["lr"] = cfg.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        opt.step()
        losses.append(loss.item())
    vae.eval()
    return losses


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


def train_transformer(pipe, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                      cfg: PretrainConfig, deadline: float | None, progress: bool):
    """Flow-matching training; returns (EMA transformer, per-step losses)."""
    tr = pipe.transformer
    tr.train()
    ema = copy.deepcopy(tr).eval().requires_grad_(False)
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    table = shifted_sigmas_table(pipe.scheduler)
    e_empty, p_empty = encode_captions(pipe, [""])
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    losses = []
    bar = tqdm(range(cfg.steps), desc="transformer", disable=not progress, unit="step")
    for step in bar:
        if deadline is not None and time.monotonic() > deadline:
            break
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=g)
        x0 = latents[idx]                                          # (B, 16, h, w)
        drop = (torch.rand(cfg.batch, generator=g) < cfg.caption_dropout).view(-1, 1, 1)
        e = torch.where(drop, e_empty, embeds[idx])                # (B, 77, D)
        p = torch.where(drop.view(-1, 1), p_empty, pooled[idx])    # (B, P)
        eps = torch.randn(x0.shape, generator=g)
        sigma = sample_sigma(table, cfg.batch, g)
        v = tr(hidden_states=noisy_latents(x0, eps, sigma), timestep=sigma * 1000,
               encoder_hidden_states=e, pooled_projections=p, return_dict=False)[0]
        loss = per_sample_mse(v, eps - x0).mean()  # = stage1_loss(..., precondition=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pt in zip(ema.parameters(), tr.parameters()):
                pe.lerp_(pt, 1.0 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    tr.eval()
    return ema, losses


# ---------------------------------------------------------------- the whole run

def pretrain_world_base(out: str | Path, cfg: PretrainConfig = PretrainConfig(), *,
                        minutes: float | None = None, progress: bool = True) -> Path:
    """Train the world base and write it to ``out`` (must not exist or be empty)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out: {out} exists and is not empty; refusing to overwrite it")
    torch.set_num_threads(cfg.threads)
    start = time.monotonic()
    budget = minutes * 60.0 if minutes else None
    pipe = build_tiny_pipeline(cfg.model)
    pixels, captions = world_pixels(cfg.seed, cfg.images, cfg.model.sample_size)
    t_data = time.monotonic() - start

    vae_losses = train_vae(pipe.vae, pixels, cfg, start + 0.2 * budget if budget else None, progress)
    t_vae = time.monotonic() - start
    raw = encode_world_latents(pipe.vae, pixels)
    shift, scale = float(raw.mean()), float(1.0 / raw.std())
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale
    embeds, pooled = encode_captions(pipe, captions)

    ema, tr_losses = train_transformer(pipe, latents, embeds, pooled, cfg,
                                       start + budget if budget else None, progress)
    pipe.transformer.load_state_dict(ema.state_dict())
    elapsed = time.monotonic() - start
    report = {"config": asdict(cfg), "minutes_cap": minutes, "vae_steps_done": len(vae_losses),
              "transformer_steps_done": len(tr_losses), "vae_shift_factor": shift,
              "vae_scaling_factor": scale, "seconds": {"data": round(t_data, 1), "vae": round(t_vae - t_data, 1),
                                                        "total": round(elapsed, 1)},
              "vae_loss_last100": _tail_mean(vae_losses), "loss_last100": _tail_mean(tr_losses),
              "torch": torch.__version__, "threads": cfg.threads}
    return _save(pipe, out, report)


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
    parser = argparse.ArgumentParser(prog="python -m purecc.pretrain",
                                     description="Pretrain the tiny SD3 model on the toy world.")
    parser.add_argument("out", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock cap (default: none; the full, reproducible schedule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="transformer steps (default 2000)")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default 900)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("vae_steps", args.vae_steps)) if v is not None}
    cfg = replace(PretrainConfig(seed=args.seed, threads=args.threads), **overrides)
    t0 = time.monotonic()
    path = pretrain_world_base(args.out, cfg, minutes=args.minutes)
    print(f"world base written to {path} in {(time.monotonic() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
