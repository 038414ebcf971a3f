"""Wall time of batches of tiny concepts (both stages) on a local Ray cluster.

    1x1   one training at a time, one concept per pack      (4 concepts)
    2x1   two trainings at a time, one concept per pack     (4 concepts)
    1x4   one training at a time, the 4 concepts in a pack  (4 concepts)
    demo  the demo's own batch (services/demo.py: its world base, 3 concepts, one per pack, two at a
          time, its steps and learning rates)
    12x   12 concepts, packs of 4, two at a time

    .venv/bin/python bench/cluster_batch.py [--steps 30] [--num-cpus 2] [--mode both|whole|per-stage]

``--mode``: ``per-stage`` runs every stage as its own Ray Train run (the old path,
``PURECC_RUN_PER_STAGE=1``), ``whole`` runs a pack's whole life in one run, ``both`` runs each
configuration both ways, side by side in this one run of the script. Training time is the sum over
runs and stages of the time the worker spends inside ``PackRecipe.train`` minus the time in its
checkpoint callbacks (each stage's ``stage-timing`` event), i.e. the training steps themselves;
``wall/training`` divides the batch's wall time by it. The script prints ``wall/training = N.NNx``
for the demo batch (in the whole-life mode) and where the worker's time went per phase.

Each configuration gets a fresh storage root and ledger; the Ray cluster is shared (started once,
then one warm-up run so the first configuration does not pay for cold worker processes). On the
tiny model a run's cost is mostly Ray Train start-up, so the ratios measure the orchestration:
how well concurrent runs and packs amortise it. On a GPU the pack also batches the math
(bench/RESULTS.md, H200: a pack of 8 gives 4-7.5x the concept-steps per second of a pack of 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# name -> (max concurrent runs, concepts per pack, concepts)
CONFIGS = {"1x1": (1, 1, 4), "2x1": (2, 1, 4), "1x4": (1, 4, 4), "demo": (2, 1, 3), "12x": (2, 4, 12)}


def make_data(root: Path) -> tuple[Path, list[dict]]:
    from purecc.testbed.samples import SAMPLE_CONCEPTS, write_sample_concepts
    from purecc.tiny import write_tiny_model

    model = write_tiny_model(root / "model")
    manifests = write_sample_concepts(root / "data")
    concepts = [{"id": c.concept_id, "data": str(manifests[c.concept_id]), "trigger": c.trigger_word}
                for c in SAMPLE_CONCEPTS]
    for i in range(2, 11):
        src = SAMPLE_CONCEPTS[i % len(SAMPLE_CONCEPTS)]
        concepts.append({"id": f"{src.concept_id}-{i}", "data": str(manifests[src.concept_id]),
                         "trigger": "zq" + "abcdefghijk"[i] + "x"})
    return model, concepts


def batch(model: Path, storage: Path, concepts: list[dict], concurrent: int, pack: int, steps: int) -> dict:
    every = max(1, steps // 3)
    return {"name": "bench", "base_model": str(model), "storage": str(storage),
            "resources": {"cpus_per_worker": 1, "concepts_per_pack": pack, "max_concurrent": concurrent},
            "defaults": {"resolution": 64, "stage1": {"steps": steps, "grad_accum": 1, "checkpoint_every": every},
                         "stage2": {"steps": steps, "checkpoint_every": every}},
            "concepts": concepts}


def demo_batch(root: Path) -> dict:
    """What ``purecc demo`` submits, written by the demo itself (its base model, concepts and knobs)."""
    import yaml

    from services.demo import DemoPlan, _base_model, write_batch

    plan = DemoPlan(out=root, quick=False, port=0)
    model, _ = _base_model(root)
    return yaml.safe_load(write_batch(plan, model).read_text())


def run_config(name: str, root: Path, model: Path, concepts: list[dict], steps: int,
               mode: str = "whole") -> dict:
    from cluster import api
    from cluster.ledger import JobLedger
    from cluster.spec import validate_batch

    concurrent, pack, n = CONFIGS[name]
    os.environ["PURECC_RUN_PER_STAGE"] = "1" if mode == "per-stage" else "0"
    storage = root / f"store-{name}-{mode}"
    if name == "demo":
        spec = validate_batch({**demo_batch(root / f"demo-{mode}"), "storage": str(storage)})
    else:
        spec = validate_batch(batch(model, storage, concepts[:n], concurrent, pack, steps))
    t0 = time.perf_counter()
    result = api.submit(spec)
    wall = time.perf_counter() - t0
    bad = {k: v for k, v in result.summary.states.items() if v != "published"}
    if bad:
        raise RuntimeError(f"{name}: not published: {bad}")
    timings = {}
    with JobLedger(result.ledger) as led:
        for e in led.events(kind="stage-timing"):
            d = e["detail"]
            timings[(d["pack"], d["stage"])] = d      # one per pack and stage (each member says it)
    train = sum(d["train_s"] for d in timings.values())
    phases: dict[str, float] = {}
    loads: dict[int, float] = {}      # a run's timer is cumulative: its base load once per worker process
    for d in timings.values():
        for k, v in d["phases"].items():
            if k.startswith(f"s{d['stage']}_"):
                phases[k] = phases.get(k, 0.0) + v
            elif k == "load_base":
                loads[d["pid"]] = max(loads.get(d["pid"], 0.0), v)
    phases["load_base"] = sum(loads.values())
    return {"wall": wall, "runs": result.summary.runs_launched, "train": train, "phases": phases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per stage")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--configs", default="demo,12x,1x1,2x1,1x4")
    parser.add_argument("--mode", choices=("both", "whole", "per-stage"), default="both")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    modes = ("per-stage", "whole") if args.mode == "both" else (args.mode,)

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
        got: dict[tuple[str, str], dict] = {}
        for name in names:
            for mode in modes:
                r = got[(name, mode)] = run_config(name, root, model, concepts, args.steps, mode)
                concurrent, pack, n = CONFIGS[name]
                phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["phases"].items()))
                print(f"{name:>4} {mode:>9}: wall {r['wall']:6.1f} s, training {r['train']:5.1f} s, "
                      f"wall/training {r['wall'] / max(r['train'], 1e-9):5.2f}x  ({r['runs']} runs; {n} concepts, "
                      f"{concurrent} at a time, {pack} per pack)", flush=True)
                print(f"      worker phases (s, summed over runs): {phases}", flush=True)
        for name in names:
            if len(modes) == 2:
                old, new = got[(name, "per-stage")], got[(name, "whole")]
                print(f"{name}: per-stage / whole-life wall = {old['wall'] / new['wall']:.2f}x")
        if "demo" in names:
            for mode in modes:
                r = got[("demo", mode)]
                print(f"demo ({mode}): wall/training = {r['wall'] / max(r['train'], 1e-9):.2f}x")
            r = got[("demo", modes[-1])]
            print(f"wall/training = {r['wall'] / max(r['train'], 1e-9):.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
