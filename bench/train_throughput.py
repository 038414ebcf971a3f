"""Training throughput on the tiny model (CPU), ratios measured in one run.

(a) our single-concept stage-1 step vs the plain reference loop (diffusers + peft add_adapter +
    AdamW, same loss, same data); target: ours >= 0.9x the reference's steps per second.
(b) concept-steps per second for packs of 1, 2, 4, 8 (ratio to pack 1), stage 1 and stage 2.
(c) stage 2 at the largest pack, the default (the base caption's branch detached, so it runs in the
    no-grad call) against the paper's gradient (both trainable branches in the graph), alternated.

Every recipe is the default with ``embeddings: none`` (synthetic latents and prompt embeddings, no
trigger positions to put concept embeddings at).

Usage: python bench/train_throughput.py [--steps 30] [--resolution 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loop import PeftReferenceLoop  # noqa: E402

from purecc.adapter_files import AdapterManifest, export_slot  # noqa: E402
from purecc.bank import attach_bank  # noqa: E402
from purecc.losses import rng_for, shifted_sigmas_table  # noqa: E402
from purecc.model import base_fingerprint  # noqa: E402
from purecc.recipe import stage_recipe  # noqa: E402
from purecc.tiny import TinyConfig, build_tiny_pipeline  # noqa: E402
from purecc.trainer import ConceptJob, PackTrainer  # noqa: E402


def synthetic(transformer, n_images: int, latent: int, seed: int):
    """Random latents (N, 16, L, L) and, per prompt role, (embeds (N, 154, D), pooled (N, Dp))."""
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    lat = torch.randn(n_images, 16, latent, latent, generator=g)

    def emb():
        return (torch.randn(n_images, 154, c.joint_attention_dim, generator=g),
                torch.randn(n_images, c.pooled_projection_dim, generator=g))

    return lat, {"prompt": emb(), "base_prompt": emb(), "target_prompt": emb()}


def pack_rate(pipe, stage: int, k: int, steps: int, latent: int, extractor_dir: Path | None, **recipe_kw) -> float:
    """Concept-steps per second of a pack of k concepts (after 2 warm-up steps)."""
    # the LoRA path alone: the synthetic data has no trigger positions for concept embeddings
    recipe = stage_recipe(stage, steps=10**6, resolution=latent * 8, grad_accum=1, embeddings="none", **recipe_kw)
    jobs = [ConceptJob(f"c{i}", "sks", Path("unused.csv"), recipe, seed=i,
                       extractor_adapter=extractor_dir if stage == 2 else None) for i in range(k)]
    t = PackTrainer(pipe, jobs)
    data = {j.concept_id: synthetic(pipe.transformer, 4, latent, i) for i, j in enumerate(jobs)}
    empty = synthetic(pipe.transformer, 1, latent, 99)[1]["prompt"]
    t.setup_precomputed(data, empty)
    t.train(max_steps=2)
    sync(pipe)
    start = time.perf_counter()
    t.train(max_steps=steps)
    sync(pipe)
    return k * steps / (time.perf_counter() - start)


def sync(pipe) -> None:
    """Wait for queued CUDA work when the transformer is on a GPU (no-op on CPU)."""
    if next(pipe.transformer.parameters()).is_cuda:
        torch.cuda.synchronize()


_LOOPS: dict[int, PeftReferenceLoop] = {}


def reference_rate(pipe_factory, steps: int, latent: int) -> float:
    """Steps per second of the plain peft reference loop (after 2 warm-up steps)."""
    pipe = pipe_factory()
    if id(pipe) not in _LOOPS:
        _LOOPS[id(pipe)] = PeftReferenceLoop(pipe.transformer, shifted_sigmas_table(pipe.scheduler))
    loop = _LOOPS[id(pipe)]
    lat, emb = synthetic(pipe.transformer, 4, latent, 0)
    dev = next(pipe.transformer.parameters()).device

    def run(i):
        return loop.step(lat[i % 4:i % 4 + 1].to(dev), emb["prompt"][0][i % 4:i % 4 + 1].to(dev),
                         emb["prompt"][1][i % 4:i % 4 + 1].to(dev), rng_for(0, "ref", i))

    for i in range(2):
        run(i)
    sync(pipe)
    start = time.perf_counter()
    for i in range(steps):
        run(i)
    sync(pipe)
    return steps / (time.perf_counter() - start)


def extractor_adapter(pipe, root: Path) -> Path:
    """A stage-1 adapter for stage-2 packs (random weights: only speed is measured)."""
    bank = pipe.transformer.adapter_bank
    flat = torch.randn(bank.params_per_slot, generator=torch.Generator().manual_seed(1)) * 0.1
    fp = base_fingerprint(pipe.transformer)
    return export_slot(bank, flat, root / "ext", AdapterManifest("ext", "sks", 1, 1, bank.rank, bank.alpha, [], fp))


def main(argv: list[str] | None = None) -> None:
    """Run (a), (b) and (c) and print their rates and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--packs", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny ops: 1 is fastest)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    latent = args.resolution // 8
    cfg = TinyConfig(max_image_size=max(512, args.resolution))

    def factory():
        return build_tiny_pipeline(cfg)

    packs = [int(p) for p in args.packs.split(",")]
    print(f"tiny model, {args.resolution} px, {args.steps} timed steps, torch threads {torch.get_num_threads()}, "
          "embeddings none")

    # (a) alternate the two loops for a few rounds and keep each one's best (the machine may be shared)
    single, ref_pipe = factory(), factory()
    ours = ref = 0.0
    for _ in range(args.rounds):
        ours = max(ours, pack_rate(single, 1, 1, args.steps, latent, None))
        ref = max(ref, reference_rate(lambda: ref_pipe, args.steps, latent))
    print(f"(a) stage-1 steps/s (best of {args.rounds}): ours {ours:.2f}, reference (peft add_adapter + AdamW) "
          f"{ref:.2f}, ratio ours/reference = {ours / ref:.2f}x (target >= 0.9x)")
    ours_pipe = factory()
    attach_bank(ours_pipe.transformer, 2 * max(packs))
    with tempfile.TemporaryDirectory() as tmp:
        ext = extractor_adapter(ours_pipe, Path(tmp))
        for stage in (1, 2):
            rates = {k: pack_rate(ours_pipe, stage, k, args.steps, latent, ext) for k in packs}
            cells = ", ".join(f"pack {k}: {r:.2f} ({r / rates[packs[0]]:.2f}x)" for k, r in rates.items())
            print(f"(b) stage {stage} concept-steps/s: {cells}")
        k, rate = max(packs), {True: 0.0, False: 0.0}
        for _ in range(args.rounds):
            for detach in (True, False):
                rate[detach] = max(rate[detach], pack_rate(ours_pipe, 2, k, args.steps, latent, ext,
                                                           detach_base=detach))
        print(f"(c) stage 2, pack {k}, concept-steps/s (best of {args.rounds}): detached base branch (default) "
              f"{rate[True]:.2f}, paper's gradient {rate[False]:.2f}, ratio = {rate[True] / rate[False]:.2f}x")


if __name__ == "__main__":
    main()
