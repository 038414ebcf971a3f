import json
import subprocess
import sys
import textwrap

import pytest
import torch

from purecc.data import Preprocess, concept_latents, read_concept_manifest
from purecc.losses import noisy_latents, rng_for, sample_sigma, stage1_loss
from purecc.model import load_pipeline
from purecc.recipe import stage_recipe
from purecc.trainer import CheckpointError, ConceptJob, PackTrainer

IDS = {"checkered-star": "zqx", "striped-circle": "vlk", "dotted-diamond": "bxj"}


def _jobs(manifests, recipe, ids=IDS, seeds=(11, 22, 33)):
    return [ConceptJob(cid, trig, manifests[cid], recipe, seed=s) for (cid, trig), s in zip(ids.items(), seeds)]


def _train(model_dir, jobs, **kw):
    t = PackTrainer(load_pipeline(str(model_dir)), jobs)
    t.setup()
    t.train(**kw)
    return t


def test_packed_concept_matches_alone(tiny_model_dir, sample_manifests):
    recipe = stage_recipe(1, steps=20, resolution=64, grad_accum=2, lr=1e-3)
    jobs = _jobs(sample_manifests, recipe)
    pack = _train(tiny_model_dir, jobs)
    alone = _train(tiny_model_dir, jobs[:1])
    a = alone.bank.read_slot(alone.concepts["checkered-star"].slot)
    p = pack.bank.read_slot(pack.concepts["checkered-star"].slot)
    assert (p - a).norm() / a.norm() < 1e-4
    assert pack.concepts["checkered-star"].losses == pytest.approx(alone.concepts["checkered-star"].losses, rel=1e-4)
    # the other concepts trained too, each in its own slot
    others = [pack.bank.read_slot(pack.concepts[c].slot) for c in ("striped-circle", "dotted-diamond")]
    assert all((o - p).norm() > 1e-3 for o in others)


def test_packed_stage2_concept_matches_alone(tiny_model_dir, sample_manifests, tmp_path):
    s1 = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=3, resolution=64, grad_accum=1)))
    for cid in IDS:
        s1.export(cid, tmp_path / cid)
    recipe = stage_recipe(2, steps=20, resolution=64, lr=1e-3, lambda_mode="adaptive")
    jobs = [ConceptJob(cid, trig, sample_manifests[cid], recipe, seed=4, extractor_adapter=tmp_path / cid)
            for cid, trig in IDS.items()]
    pack, alone = _train(tiny_model_dir, jobs), _train(tiny_model_dir, jobs[1:2])
    a = alone.bank.read_slot(alone.concepts["striped-circle"].slot)
    p = pack.bank.read_slot(pack.concepts["striped-circle"].slot)
    assert (p - a).norm() / a.norm() < 1e-4


def test_stage2_pack_mixing_both_gradients_matches_each_alone(tiny_model_dir, sample_manifests, tmp_path):
    """A pack where every concept detaches the base branch (one no-grad call holds it) and a pack where one
    member keeps the paper's gradient (both branches in the graph) train each member as it trains alone."""
    s1 = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=3, resolution=64, grad_accum=1)))
    for cid in IDS:
        s1.export(cid, tmp_path / cid)
    detached = stage_recipe(2, steps=8, resolution=64, grad_accum=2, lr=1e-3, eta=1.0, detach_base=True)
    paper = stage_recipe(2, steps=8, resolution=64, grad_accum=2, lr=1e-3, eta=1.0, detach_base=False)

    def job(cid, recipe):
        return ConceptJob(cid, IDS[cid], sample_manifests[cid], recipe, seed=4, extractor_adapter=tmp_path / cid)

    def slot(t, cid):
        return t.bank.read_slot(t.concepts[cid].slot)

    alone = {("dotted-diamond", "d"): _train(tiny_model_dir, [job("dotted-diamond", detached)]),
             ("checkered-star", "p"): _train(tiny_model_dir, [job("checkered-star", paper)]),
             ("checkered-star", "d"): _train(tiny_model_dir, [job("checkered-star", detached)])}
    all_detached = _train(tiny_model_dir, [job("checkered-star", detached), job("dotted-diamond", detached)])
    mixed = _train(tiny_model_dir, [job("checkered-star", paper), job("dotted-diamond", detached)])
    for pack, star in ((all_detached, "d"), (mixed, "p")):
        for cid, kind in (("checkered-star", star), ("dotted-diamond", "d")):
            a = slot(alone[(cid, kind)], cid)
            assert (slot(pack, cid) - a).norm() / a.norm() < 1e-4, (star, cid)
    # the two gradients train different weights: their updates from the same initial slot differ
    t0 = PackTrainer(load_pipeline(str(tiny_model_dir)), [job("checkered-star", detached)])
    t0.setup()
    init = slot(t0, "checkered-star")
    d, p = (slot(alone[("checkered-star", k)], "checkered-star") - init for k in ("d", "p"))
    assert (d - p).norm() > 0.05 * d.norm()


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from purecc.model import load_pipeline
    from purecc.recipe import stage_recipe
    from purecc.trainer import ConceptJob, PackTrainer
    model, manifest, ckpt, out = sys.argv[1:5]
    job = ConceptJob("checkered-star", "zqx", Path(manifest), stage_recipe(1, steps=12, resolution=64, grad_accum=2,
                     lr=1e-3, checkpoint_every=6), seed=3)
    t = PackTrainer(load_pipeline(model), [job]); t.setup()
    step = t.load_checkpoint("checkered-star", ckpt)
    t.train()
    t.save_checkpoint("checkered-star", out)
    print(json.dumps({"resumed_at": step}))
""")


def test_resume_in_a_fresh_process_continues_exactly(tiny_model_dir, sample_manifests, tmp_path):
    recipe = stage_recipe(1, steps=12, resolution=64, grad_accum=2, lr=1e-3, checkpoint_every=6)
    job = ConceptJob("checkered-star", "zqx", sample_manifests["checkered-star"], recipe, seed=3)
    straight = _train(tiny_model_dir, [job])
    half = _train(tiny_model_dir, [job], max_steps=6, checkpoint_dir=tmp_path / "ckpt")
    assert half.concepts["checkered-star"].step == 6
    proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tiny_model_dir),
                           str(sample_manifests["checkered-star"]), str(tmp_path / "ckpt" / "checkered-star"),
                           str(tmp_path / "resumed")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"resumed_at": 6}
    from purecc.fileio import load_tensors
    resumed = load_tensors(tmp_path / "resumed" / "checkpoint.safetensors")
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    c = straight.concepts["checkered-star"]
    assert torch.allclose(resumed["adapter"], straight.bank.read_slot(c.slot), rtol=0, atol=1e-7)
    assert state["loss_curve"]["recent"] == pytest.approx(c.losses, rel=1e-6)
    assert state["step"] == 12


def test_checkpoint_of_another_concept_or_seed_is_refused(tiny_model_dir, sample_manifests, tmp_path):
    recipe = stage_recipe(1, steps=2, resolution=64, grad_accum=1)
    t = _train(tiny_model_dir, _jobs(sample_manifests, recipe)[:1], checkpoint_dir=tmp_path)
    other = PackTrainer(load_pipeline(str(tiny_model_dir)), _jobs(sample_manifests, recipe, seeds=(99,))[:1])
    other.setup()
    with pytest.raises(CheckpointError, match="seed"):
        other.load_checkpoint("checkered-star", tmp_path / "checkered-star")
    (tmp_path / "checkered-star" / "checkpoint.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="sha256"):
        t.load_checkpoint("checkered-star", tmp_path / "checkered-star")


def test_pack_members_must_share_batch_shape(sample_manifests):
    a = ConceptJob("a", "zqx", sample_manifests["checkered-star"], stage_recipe(1, resolution=64))
    b = ConceptJob("b", "vlk", sample_manifests["striped-circle"], stage_recipe(1, resolution=128))
    with pytest.raises(ValueError, match="resolution"):
        PackTrainer(None, [a, b])


def _fixed_eval_loss(trainer, manifest, trigger):
    """Stage-1 loss on every image with fixed noise and sigmas (the training noise is random)."""
    pipe = trainer.pipe
    lat = concept_latents(read_concept_manifest(manifest, trigger), pipe.vae, Preprocess(resolution=64))
    c = trainer.concepts["checkered-star"]
    e, p = c.emb["prompt"]
    g = rng_for(0, "eval")
    total = 0.0
    for _ in range(4):
        eps = torch.randn(lat.shape, generator=g)
        sigma = sample_sigma(trainer.sigma_table, len(lat), g)
        x_t = noisy_latents(lat, eps, sigma)
        with torch.no_grad():
            v = trainer._forward(x_t, sigma, e, p, [c.slot] * len(lat))
        total += float(stage1_loss(v, lat, eps, sigma, x_t, precondition=False).mean())
    return total / 4


def test_stage1_actually_learns_the_concept(tiny_model_dir, sample_manifests):
    recipe = stage_recipe(1, steps=60, resolution=64, grad_accum=1, lr=5e-3)
    job = ConceptJob("checkered-star", "zqx", sample_manifests["checkered-star"], recipe, seed=0)
    t = PackTrainer(load_pipeline(str(tiny_model_dir)), [job])
    t.setup()
    before = _fixed_eval_loss(t, sample_manifests["checkered-star"], "zqx")
    t.train()
    after = _fixed_eval_loss(t, sample_manifests["checkered-star"], "zqx")
    assert after < 0.85 * before, (before, after)


def test_checkpoints_and_manifests_hold_a_bounded_loss_curve(tiny_model_dir, sample_manifests, tmp_path):
    from purecc.adapter_files import read_adapter_manifest
    from purecc.loss_curve import LossCurve

    recipe = stage_recipe(1, steps=3, resolution=64, grad_accum=1)
    t = _train(tiny_model_dir, _jobs(sample_manifests, recipe)[:1], checkpoint_dir=tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "checkered-star" / "state.json").read_text())
    assert "losses" not in state and LossCurve.from_dict(state["loss_curve"]).steps == 3
    manifest = read_adapter_manifest(t.export("checkered-star", tmp_path / "out"))
    assert "losses" not in manifest.metrics and len(manifest.metrics["loss_curve"]["points"]) == 3


def test_latents_can_be_sampled_from_the_posterior_every_step(tiny_model_dir, sample_manifests):
    """latent_sampling="sample": x0 = mean + std * z, z from the concept's own keyed stream."""
    mean_job = _jobs(sample_manifests, stage_recipe(1, steps=2, resolution=64))[:1]
    sample_job = _jobs(sample_manifests, stage_recipe(1, steps=2, resolution=64, latent_sampling="sample"))[:1]
    t_mean, t_sample = _train(tiny_model_dir, mean_job, max_steps=0), _train(tiny_model_dir, sample_job, max_steps=0)
    c_mean, c_sample = t_mean.concepts["checkered-star"], t_sample.concepts["checkered-star"]
    d_mean, d_sample = t_mean._draw(c_mean, 0), t_sample._draw(c_sample, 0)
    assert d_mean.rows == d_sample.rows and torch.equal(d_mean.x0, c_mean.latents.mean[d_mean.rows])
    assert not torch.equal(d_sample.x0, d_mean.x0) and torch.equal(d_sample.x0, t_sample._draw(c_sample, 0).x0)
    z = (d_sample.x0 - d_mean.x0) / c_sample.latents.std[d_sample.rows]
    assert abs(z.mean().item()) < 0.2 and 0.7 < z.std().item() < 1.3       # a standard normal draw


def test_prompt_length_is_a_recipe_setting_recorded_in_the_adapter(tmp_path, sample_manifests):
    from purecc.adapter_files import read_adapter_manifest
    from purecc.tiny import TinyConfig, write_tiny_model

    model = write_tiny_model(tmp_path / "tiny-t5", TinyConfig(with_t5=True))
    recipe = stage_recipe(1, steps=1, resolution=64, grad_accum=1, max_sequence_length=24)
    t = _train(model, _jobs(sample_manifests, recipe)[:1])
    embeds, _ = t.concepts["checkered-star"].emb["prompt"]
    assert embeds.shape[1] == 77 + 24                      # CLIP tokens + T5 tokens
    manifest = read_adapter_manifest(t.export("checkered-star", tmp_path / "out"))
    assert manifest.max_sequence_length == 24 and manifest.mixed_precision == "auto"
    with pytest.raises(ValueError, match="max_sequence_length"):
        stage_recipe(1, max_sequence_length=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_a_recipe_choice(tiny_model_dir, sample_manifests, precision):
    """On CPU, "auto" means fp32; "bf16"/"fp16" autocast there too and land near the fp32 weights."""
    from purecc.trainer import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    full = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=3, resolution=64, grad_accum=1))[:1])
    low = _train(tiny_model_dir, _jobs(sample_manifests, stage_recipe(1, steps=3, resolution=64, grad_accum=1,
                                                                     mixed_precision=precision))[:1])
    a = full.bank.read_slot(full.concepts["checkered-star"].slot)
    b = low.bank.read_slot(low.concepts["checkered-star"].slot)
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert (a - b).norm() / a.norm() < 0.05


def test_fp16_overflow_skips_the_step_and_halves_that_concepts_scale(tiny_model_dir, sample_manifests):
    recipe = stage_recipe(1, steps=2, resolution=64, grad_accum=1, mixed_precision="fp16")
    t = _train(tiny_model_dir, _jobs(sample_manifests, recipe)[:2], max_steps=1)
    zig, ring = t.concepts["checkered-star"], t.concepts["striped-circle"]
    assert zig.loss_scale == ring.loss_scale == 2.0 ** 16
    before = t.bank.read_slot(zig.slot).clone()
    steps_before = int(t.optim.steps[zig.slot])
    zig.loss_scale = 1e38                                   # its fp16 gradients overflow
    t.train(max_steps=1)
    assert torch.equal(t.bank.read_slot(zig.slot), before) and int(t.optim.steps[zig.slot]) == steps_before
    assert zig.loss_scale == 5e37 and zig.step == 2         # the data stream moved on, the weights did not
    assert torch.isfinite(t.bank.storage).all()             # nothing non-finite entered any slot


def test_a_diverging_concept_fails_alone_and_its_pack_mate_is_unchanged(tiny_model_dir, sample_manifests):
    """striped-circle diverges (absurd learning rate): it fails with a clear error and its slot is
    cleared; checkered-star ends with the weights of the same bank trained without it."""
    from purecc.bank import attach_bank

    good = stage_recipe(1, steps=6, resolution=64, grad_accum=1, lr=1e-3)
    bad = stage_recipe(1, steps=6, resolution=64, grad_accum=1, lr=1e30, max_grad_norm=1e30, weight_decay=0.0)
    zig = ConceptJob("checkered-star", "zqx", sample_manifests["checkered-star"], good, seed=1)
    ring = ConceptJob("striped-circle", "vlk", sample_manifests["striped-circle"], bad, seed=2)
    pack = _train(tiny_model_dir, [zig, ring])
    summary = pack.summary("striped-circle")
    assert summary["status"] == "failed" and "diverged at step" in summary["error"] and summary["step"] < 6
    assert not pack.bank.read_slot(pack.concepts["striped-circle"].slot).any()  # cleared
    assert pack.summary("checkered-star")["status"] == "done"
    assert torch.isfinite(pack.bank.storage).all()
    pipe = load_pipeline(str(tiny_model_dir))
    attach_bank(pipe.transformer, 2)                                          # the same bank shape
    alone = PackTrainer(pipe, [zig])
    alone.setup()
    alone.train()
    a, p = alone.bank.read_slot(alone.slot_of("checkered-star")), pack.bank.read_slot(pack.slot_of("checkered-star"))
    # the first step ran in a batch of two (float rounding of batched matmuls, as in pack vs alone)
    assert (a - p).norm() / a.norm() < 1e-6, ((a - p).norm() / a.norm()).item()
