"""Serving benchmarks on the tiny model (CPU), ratios measured in one run.

(a) hot-loading a concept into a bank slot (the service's AdapterSlots path: host cache -> slot,
    evicting the least recently used) vs diffusers ``load_lora_weights`` + ``delete_adapters`` of
    the same adapter folder; target: >= 10x faster. Also shown: the cold path (registry files ->
    verify sha256 -> slot) and the bare slot copy.
(b) 8 requests with 8 different concept sets: sent concurrently (batched by the service) vs one
    after another, through HTTP on 127.0.0.1; plus the same comparison in-process (one
    ``generate`` call of 8 samples vs 8 calls of 1), which isolates the compute effect.
(c) p50/p99 latency under a bounded concurrent load (closed loop: ``--concurrency`` clients).

Usage: python bench/serve_adapters.py [--steps 28] [--requests 64] [--concurrency 8] [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from purecc.adapter_files import AdapterManifest, export_slot
from purecc.bank import attach_bank
from purecc.generate import RenderSettings, Sample, generate
from purecc.model import base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry
from purecc.tiny import write_tiny_model
from services.adapter_cache import AdapterSlots, HostAdapterCache, adapter_version

NUM_CONCEPTS = 8
SIZE = 64


def publish_random_concepts(model: Path, root: Path, n: int) -> AdapterRegistry:
    """n adapters with random A and B (seeded), published to a registry under ``root``."""
    tr = load_pipeline(str(model)).transformer
    bank = attach_bank(tr, 1)
    fp = base_fingerprint(tr)
    registry = AdapterRegistry(root / "registry")
    for i in range(n):
        flat = torch.randn(bank.params_per_slot, generator=torch.Generator().manual_seed(i)) * 0.1
        manifest = AdapterManifest(concept_id=f"c{i}", trigger=f"t{i}x", stage=2, steps=1, rank=bank.rank,
                                   alpha=bank.alpha, targets=[], base_fingerprint=fp)
        registry.publish(f"c{i}", export_slot(bank, flat, root / "staging" / f"c{i}", manifest))
    return registry


# ----- (a) hot-load vs diffusers --------------------------------------------------------------
def time_slot_loads(model: Path, registry: AdapterRegistry, *, host_capacity: int, rounds: int) -> float:
    """Seconds per load through AdapterSlots with 2 slots cycling over 4 concepts (every acquire loads)."""
    tr = load_pipeline(str(model)).transformer
    bank = attach_bank(tr, 2)
    host = HostAdapterCache(registry, bank, base_fingerprint=base_fingerprint(tr), capacity=host_capacity)
    wanted = [(m.concept_id, adapter_version(m)) for m in registry.list()[:4]]

    async def run() -> float:
        slots = AdapterSlots(bank, host)
        for cid_version in wanted:              # fill the host cache (when it can hold them)
            (await slots.acquire([cid_version], timeout=5)).release()
        start = time.perf_counter()
        for i in range(rounds):
            (await slots.acquire([wanted[i % 4]], timeout=5)).release()
        assert slots.loads == rounds + 4        # every acquire really loaded
        return (time.perf_counter() - start) / rounds
    return asyncio.run(run())


def time_slot_copy(model: Path, registry: AdapterRegistry, rounds: int) -> float:
    """Seconds per bare ``AdapterBank.load_slot`` of one host-cached adapter (no AdapterSlots bookkeeping)."""
    tr = load_pipeline(str(model)).transformer
    bank = attach_bank(tr, 2)
    flat = HostAdapterCache(registry, bank, base_fingerprint=base_fingerprint(tr)).get("c0").flat
    start = time.perf_counter()
    for i in range(rounds):
        bank.load_slot(i % 2, flat)
    return (time.perf_counter() - start) / rounds


def time_diffusers_loads(model: Path, registry: AdapterRegistry, rounds: int) -> float:
    """Seconds per diffusers ``load_lora_weights`` + ``delete_adapters`` cycle of one adapter folder."""
    pipe = load_pipeline(str(model))
    folder = registry.path_of("c0")
    pipe.load_lora_weights(folder, adapter_name="warmup_adapter")   # the first call wraps the modules
    pipe.delete_adapters(["warmup_adapter"])
    start = time.perf_counter()
    for i in range(rounds):
        pipe.load_lora_weights(folder, adapter_name=f"concept_adapter_{i}")
        pipe.delete_adapters([f"concept_adapter_{i}"])
    return (time.perf_counter() - start) / rounds


# ----- (b), (c) through the service --------------------------------------------------------------
def concept_sets(n: int) -> list[list[tuple[str, float]]]:
    """n distinct concept sets over the 8 concepts (singles and pairs, weights in [0.5, 1.2])."""
    rng = random.Random(0)
    n_c = NUM_CONCEPTS
    ids = [(i,) for i in range(n_c)] + [(i, j) for i in range(n_c) for j in range(i + 1, n_c)]
    rng.shuffle(ids)
    return [[(f"c{i}", round(rng.uniform(0.5, 1.2), 2)) for i in s] for s in ids[:n]]


def request_body(concepts, seed: int, steps: int) -> dict:
    """The ``/v1/generate`` JSON body for one request composing ``concepts`` ((id, weight) pairs)."""
    prompt = "a shape " + " and ".join(f"<{c}>" for c, _ in concepts)
    return {"prompt": prompt, "concepts": [{"id": c, "weight": w} for c, w in concepts], "seed": seed,
            "steps": steps, "guidance": 5.0, "width": SIZE, "height": SIZE}


# the bench's bearer token (run_service issues one; the service refuses requests without)
AUTH: dict[str, str] = {}


def post(url: str, body: dict) -> tuple[int, float, dict]:
    """POST ``body`` to ``/v1/generate``: (status code, seconds taken, the JSON answer or {} on an error)."""
    import requests

    start = time.perf_counter()
    resp = requests.post(url + "/v1/generate", json=body, headers=AUTH, timeout=300)
    took = time.perf_counter() - start
    return resp.status_code, took, resp.json() if resp.status_code == 200 else {}


def batched_vs_sequential(url: str, steps: int, rounds: int = 3) -> tuple[float, float, list[int]]:
    """Median seconds for 8 requests sent one after another vs all at once, and the pass sizes seen."""
    bodies = [request_body(cs, seed=i, steps=steps) for i, cs in enumerate(concept_sets(8))]
    for b in bodies:                                  # warm: every concept resident
        assert post(url, b)[0] == 200
    seq, par, sizes = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for b in bodies:
            post(url, b)
        seq.append(time.perf_counter() - start)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda b: post(url, b), bodies))
        par.append(time.perf_counter() - start)
        assert all(code == 200 for code, _, _ in results)
        sizes = sorted({r["batch_images"] for _, _, r in results})
    return statistics.median(seq), statistics.median(par), sizes


def in_process_batching(model: Path, registry: AdapterRegistry, steps: int) -> tuple[float, float]:
    """Seconds for 8 ``generate`` calls of one sample each vs one call of 8 samples."""
    from purecc.generate import load_concepts

    pipe = load_pipeline(str(model))
    loaded = load_concepts(pipe, [registry.path_of(f"c{i}") for i in range(NUM_CONCEPTS)])
    settings = RenderSettings(steps=steps, guidance=5.0, width=SIZE, height=SIZE)
    samples = [Sample("a shape", i, tuple(cs)) for i, cs in enumerate(concept_sets(8))]
    generate(pipe, samples[:1], loaded.slot_of, settings)
    start = time.perf_counter()
    for s in samples:
        generate(pipe, [s], loaded.slot_of, settings)
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    generate(pipe, samples, loaded.slot_of, settings)
    return one_by_one, time.perf_counter() - start


def load_test(url: str, steps: int, total: int, concurrency: int) -> dict:
    """Closed-loop load of ``total`` requests from ``concurrency`` clients: counts, latency quantiles, medians."""
    rng = random.Random(1)
    sets = concept_sets(32)
    bodies = [request_body(rng.choice(sets), seed=i, steps=steps) for i in range(total)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:       # closed loop: at most `concurrency` in flight
        results = list(pool.map(lambda b: post(url, b), bodies))
    wall = time.perf_counter() - start
    ok = sorted(t for code, t, _ in results if code == 200)
    q = statistics.quantiles(ok, n=100, method="inclusive")
    served = [r for code, _, r in results if code == 200]

    def med(key):
        return statistics.median(r["timings"][key] for r in served)

    return {"ok": len(ok), "rejected": sum(code == 503 for code, _, _ in results), "wall": wall,
            "p50": q[49], "p99": q[98], "queue_ms": med("queue_ms"), "load_ms": med("adapter_load_ms"),
            "denoise_ms": med("denoise_ms"), "batch": statistics.mean(r["batch_images"] for r in served)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_loading(model: Path, registry: AdapterRegistry, rounds: int) -> None:
    """Measure and print (a): slot hot-load, cold load and bare copy vs diffusers loading."""
    hot = time_slot_loads(model, registry, host_capacity=8, rounds=rounds)
    cold = time_slot_loads(model, registry, host_capacity=1, rounds=rounds // 4)
    copy = time_slot_copy(model, registry, rounds)
    diff = time_diffusers_loads(model, registry, max(rounds // 10, 5))
    print("\n(a) loading one concept")
    print(f"  slot hot-load (host cache -> slot, via AdapterSlots)  {1e3 * hot:8.3f} ms")
    print(f"  slot cold load (registry files, sha256, -> slot)     {1e3 * cold:8.3f} ms")
    print(f"  bare slot copy (AdapterBank.load_slot)                {1e3 * copy:8.3f} ms")
    print(f"  diffusers load_lora_weights + delete_adapters         {1e3 * diff:8.3f} ms")
    print(f"  RATIO diffusers / hot-load = {diff / hot:.1f}x (target >= 10x);  "
          f"diffusers / cold = {diff / cold:.1f}x")


def report_service(url: str, cfg, args, in_process: tuple[float, float]) -> None:
    """Measure and print (b) and (c) against the running service at ``url``."""
    seq, par, sizes = batched_vs_sequential(url, args.steps)
    print(f"\n(b) 8 requests, 8 different concept sets (batch_wait {1e3 * cfg.batch_wait_s:g} ms)")
    print(f"  HTTP one after another {seq:6.3f} s   concurrent (batched, pass sizes {sizes}) {par:6.3f} s")
    print(f"  RATIO throughput batched / one-by-one over HTTP = {seq / par:.2f}x")
    one_by_one, batched = in_process
    print(f"  in-process: 8 generate calls {one_by_one:6.3f} s   one call of 8 {batched:6.3f} s   "
          f"RATIO {one_by_one / batched:.2f}x")
    r = load_test(url, args.steps, args.requests, args.concurrency)
    print(f"\n(c) {args.requests} requests, {args.concurrency} concurrent clients, 1-2 concepts each "
          f"(max_ongoing {cfg.max_ongoing_requests}, max_queued {cfg.max_queued_requests})")
    print(f"  ok {r['ok']}  rejected(503) {r['rejected']}  throughput {r['ok'] / r['wall']:.2f} req/s  "
          f"mean pass size {r['batch']:.1f}")
    print(f"  latency p50 {1e3 * r['p50']:.0f} ms   p99 {1e3 * r['p99']:.0f} ms   "
          f"RATIO p99/p50 = {r['p99'] / r['p50']:.2f}")
    print(f"  medians: queue {r['queue_ms']:.0f} ms, adapter load {r['load_ms']:.1f} ms, "
          f"denoise {r['denoise_ms']:.0f} ms")


def run_service(model: Path, registry: AdapterRegistry, root: Path, args, in_process) -> None:
    """Start a local Ray cluster and the service on 127.0.0.1, run ``report_service``, shut both down."""
    from cluster.local_ray import start_local_ray

    ray = start_local_ray(2, temp_dir=root / "ray")
    from ray import serve

    from services.app import build_app
    from services.auth import AuthSettings, TokenStore
    from services.config import ServiceConfig

    port = args.port or free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        tokens = root / "tokens.json"
        AUTH["Authorization"] = "Bearer " + TokenStore(tokens).create("bench", ["generate"])[1]
        # rate limits above the load test's own bounds: the bench measures the service, not the limiter
        auth = AuthSettings(tokens=str(tokens), requests_per_minute=60_000, burst=1_000)
        cfg = ServiceConfig(model=str(model), registry=str(registry.root), slots=NUM_CONCEPTS, cpus_per_replica=1.0,
                            max_batch_images=8, max_ongoing_requests=16, max_queued_requests=64, auth=auth)
        serve.run(build_app(cfg), name="bench", route_prefix="/")
        report_service(f"http://127.0.0.1:{port}", cfg, args, in_process)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    """Build the tiny model and random concepts in a temporary folder and run (a), (b) and (c)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--load-rounds", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)    # as in the replica (1 CPU -> OMP_NUM_THREADS=1); 2 threads thrash on a busy box
    root = Path(tempfile.mkdtemp(prefix="purecc-bench-"))
    try:
        model = write_tiny_model(root / "model")
        registry = publish_random_concepts(model, root, NUM_CONCEPTS)
        print(f"torch threads {torch.get_num_threads()}, tiny model, {SIZE} px, {args.steps} steps, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        report_loading(model, registry, args.load_rounds)
        in_process = in_process_batching(model, registry, args.steps)
        run_service(model, registry, root, args, in_process)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
