"""The demo's report and grid from real trained adapters (no Ray): loss curves, plots, captions."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from PIL import Image

from cluster.ledger import JobLedger
from cluster.spec import load_batch
from purecc.generate import RenderSettings, Sample, generate, load_concepts, save_png
from purecc.local_train import train_concepts
from purecc.model import load_pipeline
from services.demo import DemoPlan, grid, report, write_batch


def test_report_has_loss_curves_plots_and_captioned_grid(tmp_path, tiny_model_dir):
    plan = DemoPlan(out=tmp_path / "demo", quick=True, port=0)
    plan.out.mkdir()
    batch = load_batch(write_batch(plan, tiny_model_dir))
    jobs_spec = batch.jobs()[:2]
    trained = tmp_path / "trained"
    train_concepts(model=str(tiny_model_dir), concepts=[(j.concept_id, j.trigger, j.manifest) for j in jobs_spec],
                   out=trained, steps={1: 24, 2: 12}, overrides={"resolution": 64, "grad_accum": 1}, progress=False)
    with JobLedger(tmp_path / "l.sqlite") as led:
        led.submit(jobs_spec)
        jobs = [replace(j, state="published", stage1_adapter=str(trained / j.concept_id / "stage1"),
                        adapter=str(trained / j.concept_id / "stage2")) for j in led.jobs()]
    pipe = load_pipeline(str(tiny_model_dir))
    folders = [j.adapter for j in jobs]
    loaded = load_concepts(pipe, folders)
    results = []
    for i, j in enumerate(jobs):
        prompt = f"a {j.spec.trigger} shape on a plain white background, request {i}"
        (img,) = generate(pipe, [Sample(prompt, seed=i, concepts=((j.adapter, 1.0),))], loaded.slot_of_folder,
                          RenderSettings(steps=2, guidance=4.0, width=64, height=64))
        path = save_png(img, plan.out / "images" / f"{i:02d}.png")
        results.append({"name": j.concept_id, "prompt": prompt, "concepts": [(j.concept_id, 1.0)], "seed": i,
                        "latency_s": 0.1 * (i + 1), "image": str(path.relative_to(plan.out)), "server": {}})

    g = Image.open(grid(plan, results))
    assert g.size[0] >= 192 * len(results) and g.size[1] > 192 + 40        # room for captions under the tiles
    below = np.asarray(g.convert("L"))[22 + 192:, :192]
    assert (below < 100).sum() > 20                                         # the prompt is written there

    data = json.loads(report(plan, "tiny", jobs, results, {"total": 1.0}).with_name("report.json").read_text())
    for j in jobs:
        curves = data["loss_curves"][j.concept_id]
        assert curves["stage1"]["total_steps"] == 24 and curves["stage2"]["total_steps"] == 12
        assert len(curves["stage1"]["steps"]) == len(curves["stage1"]["loss"]) == len(curves["stage1"]["mean"])
        # the windowed mean is the mean of the window's step values (buckets of 1 at this length)
        loss = curves["stage2"]["loss"]
        w = curves["stage2"]["window_steps"]
        assert abs(curves["stage2"]["mean"][-1] - sum(loss[-w:]) / w) < 1e-9
        concept = next(c for c in data["concepts"] if c["id"] == j.concept_id)
        assert concept["stage2_loss_last_window"] == curves["stage2"]["mean"][-1]
        plot = Image.open(plan.out / curves["plot"])
        assert plot.size[0] == 2 * 360
    md = (plan.out / "report.md").read_text()
    assert md.count("![") == len(jobs) + 1 and results[0]["prompt"] in md
