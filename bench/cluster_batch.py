"""Wall time of a batch of 4 tiny concepts (both stages) on a local Ray cluster, three ways:

    1x1   one training at a time, one concept per run       (8 runs, one after another)
    2x1   two trainings at a time, one concept per run      (8 runs, two at once)
    1x4   one training at a time, the 4 concepts in a pack  (2 runs)

    .venv/bin/python bench/cluster_batch.py [--steps 30] [--num-cpus 2]

Each configuration gets a fresh storage root and ledger; the Ray cluster is shared (started once,
then one warm-up run so the first configuration does not pay for cold worker processes). On the
tiny model a run's cost is mostly Ray Train start-up, so the ratios measure the orchestration:
how well concurrent runs and packs amortise it. On a GPU the pack also batches the math
(bench/RESULTS.md, H200: a pack of 8 gives 4-7.5x the concept-steps per second of a pack of 1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"1x1": (1, 1), "2x1": (2, 1), "1x4": (1, 4)}   # name -> (max concurrent runs, concepts per pack)


def make_data(root: Path) -> tuple[Path, list[dict]]:
    from purecc.testbed.samples import SAMPLE_CONCEPTS, write_sample_concepts
    from purecc.tiny import write_tiny_model

    model = write_tiny_model(root / "model")
    manifests = write_sample_concepts(root / "data")
    concepts = [{"id": c.concept_id, "data": str(manifests[c.concept_id]), "trigger": c.trigger_word}
                for c in SAMPLE_CONCEPTS]
    concepts.append({"id": "zigzag-star-2", "data": str(manifests["zigzag-star"]), "trigger": "zqy"})
    return model, concepts


def batch(model: Path, storage: Path, concepts: list[dict], concurrent: int, pack: int, steps: int) -> dict:
    every = max(1, steps // 3)
    return {"name": "bench", "base_model": str(model), "storage": str(storage),
            "resources": {"cpus_per_worker": 1, "concepts_per_pack": pack, "max_concurrent": concurrent},
            "defaults": {"resolution": 64, "stage1": {"steps": steps, "grad_accum": 1, "checkpoint_every": every},
                         "stage2": {"steps": steps, "checkpoint_every": every}},
            "concepts": concepts}


def run_config(name: str, root: Path, model: Path, concepts: list[dict], steps: int) -> tuple[float, int]:
    from cluster import api
    from cluster.spec import validate_batch

    concurrent, pack = CONFIGS[name]
    spec = validate_batch(batch(model, root / f"store-{name}", concepts, concurrent, pack, steps))
    t0 = time.perf_counter()
    result = api.submit(spec)
    wall = time.perf_counter() - t0
    bad = {k: v for k, v in result.summary.states.items() if v != "published"}
    if bad:
        raise RuntimeError(f"{name}: not published: {bad}")
    return wall, result.summary.runs_launched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per stage")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--configs", default="1x1,2x1,1x4")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    names = args.configs.split(",")

    from cluster.local_ray import start_local_ray

    root = Path(tempfile.mkdtemp(prefix="purecc-bench-"))
    ray_dir = tempfile.mkdtemp(prefix="pcb-", dir="/tmp")   # short: Ray's socket paths are length-limited
    ray = start_local_ray(args.num_cpus, temp_dir=ray_dir)
    try:
        model, concepts = make_data(root)
        if not args.no_warmup:
            t = time.perf_counter()
            run_config("1x4", root / "warmup", model, concepts[:1], 2)
            print(f"warm-up (1 concept, 2 steps): {time.perf_counter() - t:.1f} s", flush=True)
        walls = {}
        for name in names:
            walls[name], runs = run_config(name, root, model, concepts, args.steps)
            print(f"{name:>4}: {walls[name]:7.1f} s  ({runs} runs; {CONFIGS[name][0]} at a time, "
                  f"{CONFIGS[name][1]} concept(s) per run)", flush=True)
        if "1x1" in walls:
            for name in names:
                if name != "1x1":
                    print(f"speed-up 1x1 / {name}: {walls['1x1'] / walls[name]:.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
