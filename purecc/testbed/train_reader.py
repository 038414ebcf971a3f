"""Train the world reader on freshly rendered world images, and measure it on held-out seeds.

Every step renders a new batch (``world_batch(TRAIN_SEED0 + step, batch)``, the concepts' reserved
looks included: the reader has to read them, and the committed reader was trained on the world before
they were reserved), so the reader never sees an image twice; evaluation uses seeds from
``EVAL_SEED0`` up, which training never reaches.
Images are perturbed (shift, blur, noise, colour jitter) so that the reader also reads the
softer, noisier pictures a diffusion model draws.

    python -m purecc.testbed.train_reader OUT_DIR [--steps N] [--init DIR --seed S --lr LR]

``--init`` continues a saved reader (same config) instead of a fresh one; give it another ``--seed`` so
that its batches are new images (step seeds are ``TRAIN_SEED0 + seed * steps + step``). The committed
reader is two runs on one CPU thread: the defaults (2400 steps, 8.4 min; pattern 0.913 on clean renders,
mostly striped read as checkered and back), then

    python -m purecc.testbed.train_reader OUT --steps 3000 --seed 1 --lr 1e-3 --init FIRST

(9.9 min; pattern 0.992 clean, 0.986 degraded; its ``reader.json`` records this second run).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .world import BACKGROUNDS, POSITIONS, Scene, world_batch
from .reader import VOCAB, ReaderConfig, WorldReader, images_to_tensor, load_reader, outputs_to_facts, save_reader
from .facts import scene_facts

TRAIN_SEED0 = 1_000_000
EVAL_SEED0 = 9_000_000
IGNORE = -100


@dataclass(frozen=True)
class ReaderTraining:
    """Schedule of the reader's training (the committed reader's first run used these defaults)."""

    seed: int = 0
    steps: int = 2400
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment_prob: float = 0.8
    threads: int = 1
    init: str = ""                   # continue this saved reader (its weights) instead of a fresh one


def scene_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Class indices: ``background`` (B,), ``present`` and each attribute (B, P); IGNORE where absent."""
    b, p = len(scenes), len(POSITIONS)
    out = {"background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
           "present": torch.zeros(b, p, dtype=torch.long)}
    for attr in VOCAB:
        out[attr] = torch.full((b, p), IGNORE, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            j = POSITIONS.index(obj.position)
            out["present"][i, j] = 1
            for attr, words in VOCAB.items():
                out[attr][i, j] = words.index(getattr(obj, attr))
    return out


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = 2
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def augment(x: torch.Tensor, g: torch.Generator, prob: float) -> torch.Tensor:
    """Per image, with probability ``prob``: shift by up to 2 px, blur, noise and jitter colours."""
    out = x.clone()
    for i in range(len(x)):
        if torch.rand((), generator=g) >= prob:
            continue
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        img = F.pad(x[i:i + 1], (2, 2, 2, 2), mode="replicate")[..., 2 + dy:66 + dy, 2 + dx:66 + dx]
        sigma = float(torch.rand((), generator=g)) * 1.2
        if sigma > 0.3:
            img = _gaussian_blur(img, sigma)
        gain = 1 + 0.08 * (torch.rand(1, 3, 1, 1, generator=g) - 0.5)
        bias = 0.08 * (torch.rand(1, 3, 1, 1, generator=g) - 0.5)
        noise = torch.randn(img.shape, generator=g) * float(torch.rand((), generator=g)) * 0.1
        out[i] = (img * gain + bias + noise).clamp(-1, 1)[0]
    return out


def reader_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropies of the background, presence and attribute heads."""
    loss = F.cross_entropy(out["background"], target["background"])
    for name in ("present", *VOCAB):
        logits = out[name]                                      # (B, P, K)
        loss = loss + F.cross_entropy(logits.flatten(0, 1), target[name].flatten(), ignore_index=IGNORE)
    return loss


def train_reader(cfg: ReaderTraining = ReaderTraining(), model: ReaderConfig = ReaderConfig(),
                 progress: bool = True) -> tuple[WorldReader, list[float]]:
    """Train a reader on fresh world batches; returns (reader in eval mode, per-step losses)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    reader = (load_reader(cfg.init) if cfg.init else WorldReader(model)).train()
    opt = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    bar = tqdm(range(cfg.steps), desc="reader", disable=not progress, unit="step")
    for step in bar:
        batch = world_batch(TRAIN_SEED0 + cfg.seed * cfg.steps + step, cfg.batch, reserved=frozenset())
        x = augment(images_to_tensor([im for im, _, _ in batch]), g, cfg.augment_prob)
        loss = reader_loss(reader(x), scene_targets([s for _, _, s in batch]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # cosine to zero
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    return reader.eval(), losses


def fact_accuracy(reader: WorldReader, n: int = 512, seed: int = EVAL_SEED0,
                  degrade: bool = False) -> dict[str, float]:
    """Accuracy per fact kind on ``n`` fresh world images (``degrade``: with training perturbations).

    ``present`` is judged at all five positions; an attribute only where an object stands.
    """
    batch = world_batch(seed, n, reserved=frozenset())
    x = images_to_tensor([im for im, _, _ in batch])
    if degrade:
        x = augment(x, torch.Generator().manual_seed(seed), 1.0)
    with torch.no_grad():
        out = reader(x)
    read = outputs_to_facts(out)
    hits: dict[str, list[bool]] = {k: [] for k in ("background", "present", *VOCAB)}
    for seen, (_, _, scene) in zip(read, batch):
        truth = scene_facts(scene)
        hits["background"].append(seen["background"] == truth["background"])
        for pos in POSITIONS:
            hits["present"].append((f"{pos}.shape" in seen) == (f"{pos}.shape" in truth))
        for key, value in truth.items():
            if key != "background":
                hits[key.split(".")[1]].append(seen.get(key) == value)
    acc = {k: sum(v) / len(v) for k, v in hits.items()}
    acc["all_facts"] = sum(sum(v) for k, v in hits.items() if k != "present") / sum(
        len(v) for k, v in hits.items() if k != "present")
    return acc


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``OUT_DIR [--steps N] [--threads T]``; trains, measures and writes a reader."""
    parser = argparse.ArgumentParser(prog="python -m purecc.testbed.train_reader")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=ReaderTraining.steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=ReaderTraining.seed)
    parser.add_argument("--lr", type=float, default=ReaderTraining.lr, help="peak learning rate (cosine to 0)")
    parser.add_argument("--init", type=Path, default=None, help="continue this saved reader")
    args = parser.parse_args(argv)
    cfg = ReaderTraining(steps=args.steps, threads=args.threads, seed=args.seed, lr=args.lr,
                         init=str(args.init) if args.init else "")
    t0 = time.monotonic()
    reader, losses = train_reader(cfg)
    seconds = time.monotonic() - t0
    report = {"training": asdict(cfg), "seconds": round(seconds, 1),
              "loss_last50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
              "accuracy_clean": fact_accuracy(reader), "accuracy_degraded": fact_accuracy(reader, degrade=True),
              "eval": f"512 images of world_batch({EVAL_SEED0}, 512)"}
    save_reader(reader, args.out, report)
    print(f"reader written to {args.out} in {seconds / 60:.1f} min; accuracy {report['accuracy_clean']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
