"""Stage-1 / stage-2 pack throughput on an SD3.5-Medium-sized transformer (random weights, bf16).

Prints, for packs of 1, 4, 8 (stage 1 and stage 2): ms per concept-step, peak GPU memory and model
FLOP utilisation (FLOPs counted with torch's FlopCounterMode on one step), plus our single-concept
step vs the plain peft reference loop. Target on one H100/H200: pack 8 >= 5x the concept-steps per
second of pack 1.

Usage (GPU): python bench/gpu/train_sd35.py [--packs 1,4,8] [--steps 8] [--json out.json]
CPU smoke run of the script itself: python bench/gpu/train_sd35.py --tiny --resolution 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]
from sd35 import build_transformer, device_name, peak_flops, timed  # noqa: E402

from purecc.adapter_files import AdapterManifest, export_slot  # noqa: E402
from purecc.bank import attach_bank  # noqa: E402
from purecc.losses import rng_for, shifted_sigmas_table  # noqa: E402
from purecc.model import base_fingerprint  # noqa: E402
from purecc.recipe import stage_recipe  # noqa: E402
from purecc.trainer import ConceptJob, PackTrainer  # noqa: E402


def synthetic(tr, n: int, latent: int, seed: int, text_len: int = 154):
    """Random latents (N, 16, L, L) and, per prompt role, (embeds (N, T, D), pooled (N, Dp))."""
    g = torch.Generator().manual_seed(seed)
    c = tr.config

    def emb():
        return (torch.randn(n, text_len, c.joint_attention_dim, generator=g),
                torch.randn(n, c.pooled_projection_dim, generator=g))

    return torch.randn(n, 16, latent, latent, generator=g), {"prompt": emb(), "base_prompt": emb(),
                                                             "target_prompt": emb()}


def make_trainer(pipe, stage: int, k: int, latent: int, ext: Path) -> PackTrainer:
    """A ``PackTrainer`` of ``k`` concepts for ``stage`` on precomputed synthetic data."""
    recipe = stage_recipe(stage, steps=10**6, resolution=latent * 8, grad_accum=1)
    jobs = [ConceptJob(f"c{i}", "sks", Path("unused.csv"), recipe, seed=i,
                       extractor_adapter=ext if stage == 2 else None) for i in range(k)]
    t = PackTrainer(pipe, jobs)
    t.setup_precomputed({j.concept_id: synthetic(pipe.transformer, 4, latent, i) for i, j in enumerate(jobs)},
                        synthetic(pipe.transformer, 1, latent, 99)[1]["prompt"])
    return t


def measure_pack(pipe, stage, k, latent, ext, steps, dev) -> dict:
    """Timing, peak memory, FLOPs and MFU of one training step of a pack of ``k`` concepts."""
    t = make_trainer(pipe, stage, k, latent, ext)
    t.train(max_steps=2)  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sec = timed(lambda: t.train(max_steps=1), dev, steps)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    with FlopCounterMode(display=False) as fc:
        t.train(max_steps=1)
    flops = fc.get_total_flops()
    pf = peak_flops(dev)
    return {"stage": stage, "pack": k, "ms_per_concept_step": 1000 * sec / k, "step_ms": 1000 * sec,
            "peak_gib": peak, "tflops_per_step": flops / 1e12, "mfu": flops / sec / pf if pf else None}


def measure_reference(tiny, dev, latent, steps) -> float:
    """ms per step of the plain peft reference loop on its own transformer."""
    from reference_loop import PeftReferenceLoop
    from diffusers import FlowMatchEulerDiscreteScheduler

    tr = build_transformer(tiny, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, seed=1)
    loop = PeftReferenceLoop(tr, shifted_sigmas_table(FlowMatchEulerDiscreteScheduler(shift=3.0)))
    lat, emb = synthetic(tr, 1, latent, 0)
    args = (lat.to(dev), emb["prompt"][0].to(dev), emb["prompt"][1].to(dev))
    for i in range(2):
        loop.step(*args, rng_for(0, "ref", i))
    sec = timed(lambda: loop.step(*args, rng_for(0, "ref", 7)), dev, steps)
    del loop, tr
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return 1000 * sec


def main() -> None:
    """Measure the reference loop and every pack in both stages; print (and write ``--json``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packs", default="1,4,8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test of this script)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent, packs = args.resolution // 8, [int(p) for p in args.packs.split(",")]
    print(f"device: {device_name(dev)}; {'tiny' if args.tiny else 'SD3.5-Medium-sized'} transformer, "
          f"{args.resolution} px, 154 text tokens, bf16 autocast on GPU, {args.steps} timed steps")
    ref_ms = measure_reference(args.tiny, dev, latent, args.steps)
    tr = build_transformer(args.tiny, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    print(f"transformer parameters: {sum(p.numel() for p in tr.parameters()):,}")
    pipe = SimpleNamespace(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    bank = attach_bank(tr, 2 * max(packs))
    print(f"bank: {bank.num_slots} slots x {bank.params_per_slot:,} params on {len(bank.specs)} layers")
    results = {"device": device_name(dev), "reference_stage1_ms": ref_ms, "packs": []}
    with tempfile.TemporaryDirectory() as tmp:
        flat = torch.randn(bank.params_per_slot, generator=torch.Generator().manual_seed(1)) * 0.01
        ext = export_slot(bank, flat, Path(tmp) / "ext", AdapterManifest(
            "ext", "sks", 1, 1, bank.rank, bank.alpha, [], base_fingerprint(tr)))
        for stage in (1, 2):
            base = None
            for k in packs:
                r = measure_pack(pipe, stage, k, latent, ext, args.steps, dev)
                base = base or r["ms_per_concept_step"]
                r["speedup_vs_pack1"] = base / r["ms_per_concept_step"]
                results["packs"].append(r)
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
                print(f"stage {stage} pack {k}: {r['ms_per_concept_step']:.1f} ms/concept-step "
                      f"({r['step_ms']:.1f} ms/step), {r['speedup_vs_pack1']:.2f}x concept-steps/s vs pack 1, "
                      f"peak {r['peak_gib']:.1f} GiB, {r['tflops_per_step']:.2f} TFLOP/step, MFU {mfu}", flush=True)
    ours = next(r for r in results["packs"] if r["stage"] == 1 and r["pack"] == 1)["step_ms"]
    print(f"stage-1 single concept: ours {ours:.1f} ms/step vs peft reference loop {ref_ms:.1f} ms/step "
          f"-> ours runs at {ref_ms / ours:.2f}x the reference's speed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
