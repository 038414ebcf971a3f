"""``purecc demo``: the whole product on one machine, end to end, on the embedded model.

1. the base model (the committed world base when present, else the tiny random model) and the three
   sample concepts are written into the output folder, with a batch spec for them;
2. a local Ray cluster starts on 127.0.0.1; the batch is submitted to Ray Train and trained (stage 1,
   then stage 2, several trainings at once) with live progress until every concept is published;
3. the Serve deployment starts on the same cluster; one request per concept and two-concept
   compositions go over HTTP; the images, a grid PNG (the prompt under every image), a loss-curve
   plot per concept and a report (curves, stage times, latencies) are saved; everything shuts down,
   also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

DEMO_OWNER = "demo"
QUICK = {"steps1": 6, "steps2": 4, "checkpoint_every": 3, "render_steps": 4}
# 300 + 150 steps: with the default layer-wise embeddings, each single concept comes out in its own shape and
# colours (60 + 40 steps drew only the star right); the whole demo stays under 5 minutes on 2 cores
FULL = {"steps1": 300, "steps2": 150, "checkpoint_every": 100, "render_steps": 20}


@dataclass(frozen=True)
class DemoPlan:
    """What one demo run does: where it writes, quick (CI-sized) or full."""

    out: Path
    quick: bool
    port: int
    resolution: int = 64

    @property
    def knobs(self) -> dict:
        """Training steps and render settings of this run's size."""
        return QUICK if self.quick else FULL


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``purecc demo`` to the command line."""
    p = sub.add_parser("demo", help="train the sample concepts on Ray Train, serve them on Ray Serve, "
                                    "query and compose them over HTTP (all on 127.0.0.1)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="output folder (model, data, storage, images, report)")
    p.add_argument("--quick", action="store_true", help="CI-sized run: a few steps per stage")
    p.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (default: a free one)")
    p.add_argument("--force", action="store_true", help="reuse a non-empty --out folder")
    p.set_defaults(func=_demo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_model(out: Path) -> tuple[Path, str]:
    """The committed pretrained world base if the package has it, else a freshly built tiny model."""
    try:
        from purecc.testbed import verify_world_base, world_base_path

        path = world_base_path()
        verify_world_base(path)
        return path, "pretrained world base (purecc/testbed/assets/world-base)"
    except (ImportError, FileNotFoundError, ValueError):
        from purecc.tiny import write_tiny_model

        dest = out / "model"
        if not (dest / "model_index.json").is_file():
            write_tiny_model(dest)
        return dest, "embedded tiny model (random weights)"


def write_batch(plan: DemoPlan, model: Path) -> Path:
    """The demo's sample concepts as a batch spec (two trainings at once, one concept per pack)."""
    from purecc.testbed.samples import DEMO_CONCEPTS, write_sample_concepts

    manifests = write_sample_concepts(plan.out / "data")
    k = plan.knobs
    batch = {
        "name": "demo", "base_model": str(model), "storage": str(plan.out / "storage"),
        "resources": {"gpus_per_worker": 0, "cpus_per_worker": 0.5, "concepts_per_pack": 1,
                      "max_concurrent": 2, "max_failures": 1, "max_attempts": 1},
        "defaults": {"resolution": plan.resolution,
                     "stage1": {"steps": k["steps1"], "checkpoint_every": k["checkpoint_every"],
                                "grad_accum": 1, "lr": 2e-3},
                     "stage2": {"steps": k["steps2"], "checkpoint_every": k["checkpoint_every"], "lr": 1e-3}},
        "concepts": [{"id": c.concept_id, "data": str(manifests[c.concept_id]), "trigger": c.trigger_word}
                     for c in DEMO_CONCEPTS],
    }
    path = plan.out / "batch.yaml"
    path.write_text(yaml.safe_dump(batch, sort_keys=False))
    return path


def train(plan: DemoPlan, batch: Path, ray_tmp: str) -> list:
    """Train the sample concepts as one batch on the local Ray cluster; returns their ledger rows."""
    from cluster import api
    from cluster.progress import LiveTable

    print(f"submitting {batch} to Ray Train (2 trainings at once)", flush=True)
    table = LiveTable()
    result = api.submit(batch, num_cpus=2, ray_temp_dir=ray_tmp, on_tick=table)
    jobs = api.status(result.ledger)
    table.final(jobs)
    bad = [j for j in jobs if j.state != "published"]
    if bad:
        raise RuntimeError("not published: " + ", ".join(f"{j.concept_id} ({j.state}: {j.error})" for j in bad))
    return jobs


def requests_for(jobs) -> list[dict]:
    """One request per concept, two compositions and one without concepts (the base)."""
    from purecc.testbed.samples import SAMPLE_CONCEPTS

    word = {c.concept_id: c.class_word for c in SAMPLE_CONCEPTS}
    ids = [j.concept_id for j in jobs]
    name = lambda cid: f"<{cid}> {word.get(cid, '')}".strip()  # noqa: E731
    # prompts in the world's caption grammar (world.Scene.caption): the base was pretrained on nothing else
    reqs = [{"name": cid, "prompt": f"a {name(cid)} in the center, on a plain white background",
             "concepts": [(cid, 1.0)]}
            for cid in ids]
    reqs.append({"name": f"{ids[0]}+{ids[1]}",
                 "prompt": f"a {name(ids[0])} left of a {name(ids[1])}, on a plain gray background",
                 "concepts": [(ids[0], 1.0), (ids[1], 1.0)]})
    reqs.append({"name": f"{ids[1]}+{ids[2]}",
                 "prompt": f"a {name(ids[1])} above a {name(ids[2])}, on a plain white background",
                 "concepts": [(ids[1], 0.8), (ids[2], 1.0)]})
    reqs.append({"name": "base", "prompt": "a large red circle in the center, on a grid background", "concepts": []})
    return reqs


def serve_and_query(plan: DemoPlan, model: Path, jobs) -> list[dict]:
    """Serve the published concepts and query them over HTTP; returns one record per request."""
    from ray import serve

    from .app import build_app
    from .auth import TokenStore
    from .client import ServiceClient
    from .config import ServiceConfig

    config = ServiceConfig(model=str(model), storage=str(plan.out / "storage"), slots=4, cpus_per_replica=1.0,
                           max_batch_images=4)   # the registry is the storage root; batches can be posted too
    # the service requires tokens, as in production: the demo makes its own (kept in <storage>/auth/)
    _, token = TokenStore(config.tokens_file).create(DEMO_OWNER, ["generate", "submit"])
    serve.start(http_options={"host": "127.0.0.1", "port": plan.port})
    serve.run(build_app(config), name="purecc", route_prefix="/")
    url = f"http://127.0.0.1:{plan.port}"
    client = ServiceClient(url, token=token, timeout=120)
    client.wait_ready(timeout=120)
    served = [c["id"] for c in client.concepts()]
    print(f"service ready at {url}; servable concepts: {served}", flush=True)
    results = []
    for i, req in enumerate(requests_for(jobs)):
        start = time.perf_counter()
        res = client.generate(req["prompt"], concepts=req["concepts"], seed=100 + i, steps=plan.knobs["render_steps"],
                              guidance=4.0, width=plan.resolution, height=plan.resolution)
        latency = time.perf_counter() - start
        (seed, png), = res.images
        path = plan.out / "images" / f"{i:02d}-{req['name'].replace('+', '_and_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        results.append({"name": req["name"], "prompt": req["prompt"], "concepts": req["concepts"], "seed": seed,
                        "latency_s": latency, "image": str(path.relative_to(plan.out)),
                        "server": res.metadata})
        print(f"  POST /v1/generate {req['name']:<28} {latency * 1000:7.0f} ms -> {path.name}", flush=True)
    return results


def grid(plan: DemoPlan, results: list[dict]) -> Path:
    """One row of tiles, upscaled so the tiny images are visible, each with its prompt under it."""
    from PIL import Image

    from purecc.report_plots import captioned_grid

    tiles = [(Image.open(plan.out / r["image"]), r["name"][:30], r["prompt"]) for r in results]
    return captioned_grid(tiles, plan.out / "grid.png")


def _curve(adapter: str | None) -> dict:
    """The loss curve recorded in a local adapter's manifest (empty when there is none)."""
    from purecc.adapter_files import AdapterFileError, read_adapter_manifest

    if not adapter or "://" in adapter:
        return {}
    try:
        return read_adapter_manifest(adapter).metrics.get("loss_curve") or {}
    except AdapterFileError:
        return {}


def loss_curves(plan: DemoPlan, jobs, window_steps: int = 10) -> dict[str, dict]:
    """Per concept: both stages' curves (bucket means and their sliding mean) and a plot of them."""
    from purecc.report_plots import curve_series, plot_loss_curves

    out = {}
    for j in jobs:
        stages = {"stage1": curve_series(_curve(j.stage1_adapter), window_steps),
                  "stage2": curve_series(_curve(j.adapter), window_steps)}
        plot = plot_loss_curves({"stage 1": stages["stage1"], "stage 2 (L_CC + eta L_pure)": stages["stage2"]},
                                plan.out / "plots" / f"{j.concept_id}-loss.png", f"{j.concept_id}: training loss")
        out[j.concept_id] = {**stages, "plot": str(plot.relative_to(plan.out))}
    return out


def report(plan: DemoPlan, model_note: str, jobs, results: list[dict], timings: dict) -> Path:
    """Write report.json and report.md (training times, loss curves and plots, request latencies)."""
    curves = loss_curves(plan, jobs)
    concepts = []
    for j in jobs:
        s2 = curves[j.concept_id]["stage2"]
        concepts.append({
            "id": j.concept_id, "trigger": j.spec.trigger, "state": j.state, "adapter": j.adapter,
            "stage1_s": (j.stage1_ended or 0) - (j.stage1_started or 0),
            "stage2_s": (j.stage2_ended or 0) - (j.stage2_started or 0),
            # sliding means over a window of steps at the start and the end (single steps are noisy)
            "stage2_loss_first_window": s2["mean"][0] if s2 else None,
            "stage2_loss_last_window": s2["mean"][-1] if s2 else None,
            "loss_window_steps": s2["window_steps"] if s2 else None,
        })
    latencies = sorted(r["latency_s"] for r in results)
    data = {"model": model_note, "quick": plan.quick, "timings_s": timings, "concepts": concepts,
            "loss_curves": curves, "requests": results, "latency_p50_s": latencies[len(latencies) // 2],
            "latency_max_s": latencies[-1]}
    (plan.out / "report.json").write_text(json.dumps(data, indent=2, default=str))
    lines = ["# purecc demo report\n", f"model: {model_note}\n", "| concept | stage 1 training s | "
             "stage 2 training s | stage-2 loss, windowed mean first -> last |", "|---|---|---|---|"]
    for c in concepts:
        first, last = c["stage2_loss_first_window"], c["stage2_loss_last_window"]
        loss = f"{first:.4f} -> {last:.4f} (mean of {c['loss_window_steps']} steps)" if first is not None else "n/a"
        lines.append(f"| {c['id']} | {c['stage1_s']:.1f} | {c['stage2_s']:.1f} | {loss} |")
    lines += ["", "## Loss curves", ""] + [f"![{cid} loss]({c['plot']})" for cid, c in curves.items()]
    lines += ["", "| request | latency ms | prompt | image |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['latency_s'] * 1000:.0f} | {r['prompt']} | {r['image']} |" for r in results]
    lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), "", "![grid](grid.png)"]
    path = plan.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(plan: DemoPlan) -> Path:
    """The whole demo: world base, batch, training, serving, queries, grid and report."""
    from cluster.local_ray import start_local_ray

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    model, note = _base_model(plan.out)
    batch = write_batch(plan, model)
    print(f"base model: {note} at {model}", flush=True)
    ray_tmp = tempfile.mkdtemp(prefix="purecc-demo-")  # short path: Ray's sockets live under it
    from .limits import LimitSettings, proxy_environment

    ray = start_local_ray(2, temp_dir=ray_tmp, env=proxy_environment(LimitSettings()))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        timings["setup"] = time.perf_counter() - t0
        jobs = train(plan, batch, ray_tmp)
        timings["train"] = time.perf_counter() - t0 - timings["setup"]
        t1 = time.perf_counter()
        results = serve_and_query(plan, model, jobs)
        timings["serve_and_query"] = time.perf_counter() - t1
        grid(plan, results)
        timings["total"] = time.perf_counter() - t0
        return report(plan, note, jobs, results, timings)
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("shutting down Serve and Ray", flush=True)
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"--out: {out} is not empty (use --force to reuse it, or another folder)")
    out.mkdir(parents=True, exist_ok=True)
    plan = DemoPlan(out=out, quick=args.quick, port=args.port or _free_port())
    try:
        path = run_demo(plan)
    except KeyboardInterrupt:
        print("demo interrupted; everything was shut down", file=sys.stderr)
        return 130
    print(f"done: report {path}, grid {out / 'grid.png'}, images in {out / 'images'}")
    return 0
