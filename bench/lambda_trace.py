"""What lambda* does during stage 2: each candidate's per-step value, by noise level, on the testbed.

Trains stage 2 of the five sample concepts (one pack, the paper's recipe: layer-wise embeddings, the
whole stage-1 model as extractor) from one seed's stage-1 adapters of ``bench/quality.py``
(``runs/quality/seed<S>/dreambooth-emb``), once per lambda mode, for a short run, and reads the
trainer's own per-step metrics (``lambda``, ``cos_r``, ``sigma``, ``l_cc``, ``l_pure``; the same dict
TensorBoard gets). It prints, per mode, the share of steps where lambda* is clamped to 0, its mean,
its mean per sigma third, the mean cosine between R and the trainable model's concept increment,
and ``eta * l_pure / l_cc``: how much of the stage-2 loss is L_pure. With lambda* = 0, L_pure is
``||v_full - v_base||^2``: it pulls the complete caption's prediction and the base caption's
towards each other, whatever the extractor says.

    python bench/lambda_trace.py [--seed 0] [--steps 200] [--modes adaptive increment extractor]

Needs the stage-1 run of ``bench/quality.py`` for that seed (``--train-only --methods dreambooth-emb``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from purecc.local_train import train_concepts
from purecc.recipe import LAMBDA_MODES
from purecc.testbed import world_base_path
from purecc.testbed.samples import SAMPLE_CONCEPTS
from quality import TRAIN_KEEP, Method, copy_stage1, sample_concept_specs   # bench/, this script's folder

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "bench" / "results" / "lambda_trace.json"
THIRDS = ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0001))


class Collect:
    """A ``PackLogger`` that keeps every step's scalars in memory."""

    def __init__(self):
        self.rows: list[dict] = []

    def log_metrics(self, metrics: dict) -> None:
        self.rows.append({k: float(metrics[k]) for k in ("lambda", "cos_r", "sigma", "l_cc", "l_pure")
                          if isinstance(metrics.get(k), (int, float))} | {"concept_id": metrics["concept_id"]})

    def log_images(self, *args, **kwargs) -> None:
        pass


def summarise(rows: Sequence[dict], eta: float) -> dict:
    lam, sig = np.array([r["lambda"] for r in rows]), np.array([r["sigma"] for r in rows])
    out = {"steps": len(rows), "lambda_zero": float((lam <= 1e-8).mean()), "lambda_mean": float(lam.mean()),
           "cos_r": float(np.mean([r["cos_r"] for r in rows])),
           "pure_share": float(eta * np.mean([r["l_pure"] for r in rows]) / np.mean([r["l_cc"] for r in rows]))}
    for i, (lo, hi) in enumerate(THIRDS):
        sel = (sig >= lo) & (sig < hi)
        out[f"lambda_mean_sigma{i}"] = float(lam[sel].mean()) if sel.any() else float("nan")
    return out


def trace(mode: str, stage1: Path, seed: int, steps: int, eta: float, work: Path) -> list[dict]:
    run = work / mode
    for c in SAMPLE_CONCEPTS:
        copy_stage1(stage1, run, c.concept_id)
    log = Collect()
    train_concepts(model=str(world_base_path()), concepts=sample_concept_specs(), out=run, stages=(2,),
                   steps={2: steps}, overrides={**TRAIN_KEEP, "embeddings": "layerwise", "eta": eta},
                   extractor="stage1", lambda_mode=mode, seed=seed, progress=False, logger=log)
    return log.rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/lambda_trace.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--modes", nargs="+", choices=LAMBDA_MODES, default=["adaptive", "increment", "extractor"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--eta", type=float, default=Method.eta,
                        help="stage 2's weight of L_pure (default: the bench rows' %(default)s, as recorded)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stage1 = args.work / f"seed{args.seed}" / "dreambooth-emb"
    if not all((stage1 / c.concept_id / "stage1").is_dir() for c in SAMPLE_CONCEPTS):
        print(f"error: --work: no stage-1 run at {stage1} (python bench/quality.py --train-only --seeds "
              f"{args.seed} --methods dreambooth-emb)", file=sys.stderr)
        return 2
    eta, t0, result = args.eta, time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="lambda-trace-") as tmp:
        for mode in args.modes:
            result[mode] = summarise(trace(mode, stage1, args.seed, args.steps, eta, Path(tmp)), eta)
    seconds = time.perf_counter() - t0
    print(f"stage 2 of the 5 sample concepts, seed {args.seed}, {args.steps} steps each, eta {eta} "
          f"({seconds / 60:.1f} min)")
    print("| lambda mode | concept-steps | lambda* = 0 | mean | mean, sigma < 1/3 | 1/3-2/3 | > 2/3 | cos(R, v_full - v_base) "
          "| eta * L_pure / L_CC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, s in result.items():
        print(f"| {mode} | {s['steps']} | {s['lambda_zero']:.2f} | {s['lambda_mean']:.3f} | "
              f"{s['lambda_mean_sigma0']:.3f} | {s['lambda_mean_sigma1']:.3f} | {s['lambda_mean_sigma2']:.3f} | "
              f"{s['cos_r']:+.3f} | {s['pure_share']:.2f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": " ".join(["python bench/lambda_trace.py", *sys.argv[1:]]),
                               "seed": args.seed, "steps": args.steps, "eta": eta,
                               "seconds": round(seconds, 1), "modes": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
