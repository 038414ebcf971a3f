"""Stage-2 loss against a naive reference written straight from the method's formulas (README)."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

from purecc.adapter_files import AdapterManifest, export_slot, load_adapter_layers
from purecc.bank import attach_bank, one_hot_routing
from purecc.model import base_fingerprint, load_pipeline
from purecc.recipe import stage_recipe
from purecc.trainer import ConceptJob, PackTrainer


@pytest.fixture(scope="module")
def stage1_adapter(tiny_model_dir, tmp_path_factory):
    """A stage-1 adapter with non-zero weights (random: only the formulas are under test)."""
    pipe = load_pipeline(str(tiny_model_dir))
    fp = base_fingerprint(pipe.transformer)
    bank = attach_bank(pipe.transformer, 1)
    flat = torch.randn(bank.params_per_slot, generator=torch.Generator().manual_seed(7)) * 0.3
    dest = tmp_path_factory.mktemp("stage1") / "zig"
    return export_slot(bank, flat, dest, AdapterManifest("zig", "zqx", 1, 1, 4, 4.0, [], fp))


def _peft_extractor(tiny_model_dir, adapter):
    tr = load_pipeline(str(tiny_model_dir)).transformer
    _, layers = load_adapter_layers(adapter)
    tr = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=list(layers)), tr)
    sd = {f"{n}.lora_A.weight": a for n, (a, _) in layers.items()}
    sd.update({f"{n}.lora_B.weight": b for n, (_, b) in layers.items()})
    set_peft_model_state_dict(tr, sd)
    return tr


def _naive_loss(trainer, c, extractor, detach_base=False, r_reference="empty"):
    """Four separate passes at batch 1 and the method's formulas, one sample at a time."""
    rows, x0, eps, sigma = trainer._draw(c, 0)
    tr, bank, rec = trainer.pipe.transformer, trainer.bank, c.job.recipe
    i = rows[0]
    x_t = (1 - sigma[0]) * x0 + sigma[0] * eps
    t = sigma * 1000

    def run(model, col, route):
        if col == "class_prompt" and col not in c.emb:      # the target caption without the trigger
            e, p = trainer._encode([" ".join(c.prompts["target_prompt"][i].replace(c.job.trigger, " ").split())])
        else:
            e, p = (c.emb[col][0][i:i + 1], c.emb[col][1][i:i + 1]) if col else trainer.empty
        with bank.routing(one_hot_routing([route], bank.num_slots)):
            return model(hidden_states=x_t, timestep=t, encoder_hidden_states=e, pooled_projections=p).sample

    v_full = run(tr, "prompt", c.slot)
    v_base = run(tr, "base_prompt", c.slot)
    if detach_base:
        v_base = v_base.detach()
    with torch.no_grad():
        r_tar = run(extractor, "target_prompt", None)
        r_empty = run(extractor, "class_prompt" if r_reference == "class" else None, None)
    R = r_tar - r_empty
    target = eps - x0
    if rec.lambda_mode == "fixed":
        lam = rec.lambda_value
    else:
        with torch.no_grad():
            if rec.lambda_mode == "adaptive":        # (A) the noisy target's least squares
                delta = target - v_base
            elif rec.lambda_mode == "increment":     # (B) the trainable model's own concept increment
                delta = v_full - v_base
            else:                                    # (C) the extractor's concept increment
                delta = run(extractor, "prompt", None) - run(extractor, "base_prompt", None)
        lam = float((delta * R).sum() / ((R * R).sum() + 1e-6))
        lam = min(max(lam, 0.0), rec.lambda_max)
    l_cc = ((v_full - target) ** 2).mean()
    l_pure = ((v_full - (v_base + lam * R)) ** 2).mean()
    inc = (v_full - v_base).detach().flatten()
    cos = float(inc @ R.flatten() / (inc.norm() * R.norm() + 1e-12))
    return l_cc + rec.eta * l_pure, cos


@pytest.mark.parametrize("extractor", ["stage1", "base"])
@pytest.mark.parametrize("lambda_mode,detach_base,r_reference", [
    ("fixed", False, "empty"), ("adaptive", False, "empty"), ("increment", False, "empty"),
    ("extractor", False, "empty"), ("adaptive", True, "empty"), ("fixed", True, "empty"),
    ("extractor", True, "empty"), ("increment", True, "empty"), ("fixed", True, "class"),
    ("adaptive", False, "class")])
def test_stage2_loss_matches_naive_reference(tiny_model_dir, sample_manifests, stage1_adapter, extractor,
                                             lambda_mode, detach_base, r_reference):
    """The trainer's batched stage-2 loss and its gradient equal four separate passes and the formulas, with
    the paper's gradient (through both trainable branches) and with the default ``detach_base``, and with R
    taken against "" (the paper's) or against the target caption without the trigger (``r_reference: class``)."""
    pipe = load_pipeline(str(tiny_model_dir))
    recipe = stage_recipe(2, steps=3, resolution=64, extractor=extractor, lambda_mode=lambda_mode, embeddings="none",
                          detach_base=detach_base, r_reference=r_reference, eta=2.0)
    job = ConceptJob("zig", "zqx", sample_manifests["checkered-star"], recipe, seed=5,
                     extractor_adapter=stage1_adapter if extractor == "stage1" else None)
    trainer = PackTrainer(pipe, [job])
    trainer.setup()
    trainer.train(max_steps=2)  # the trainable slot is no longer a no-op
    c = trainer.concepts["zig"]
    ref_model = _peft_extractor(tiny_model_dir, stage1_adapter) if extractor == "stage1" \
        else load_pipeline(str(tiny_model_dir)).transformer

    storage = trainer.bank.storage
    storage.grad = None
    step = trainer._micro_step([c], 0)["zig"]
    ours, cos_ours = step["loss"], float(step["cos_r"])
    ours.backward()
    g_ours = storage.grad[c.slot].clone()

    storage.grad = None
    naive, cos_naive = _naive_loss(trainer, c, ref_model, detach_base=detach_base, r_reference=r_reference)
    naive.backward()
    g_naive = storage.grad[c.slot].clone()

    storage.grad = None
    _naive_loss(trainer, c, ref_model, detach_base=not detach_base, r_reference=r_reference)[0].backward()
    g_other = storage.grad[c.slot].clone()

    assert torch.allclose(ours, naive, rtol=1e-5, atol=1e-6), (ours.item(), naive.item())
    assert torch.allclose(g_ours, g_naive, rtol=1e-4, atol=1e-7)
    # the paper's gradient reaches the LoRA through v_full and through v_base; detach_base cuts the second
    assert g_ours.norm() > 0 and g_other.norm() > 0
    assert (g_naive - g_other).norm() > 1e-3 * g_naive.norm()
    # R's direction (the cosine with the concept increment, free of lambda and eta) tells the two references
    # apart: the one the recipe names is the one the trainer subtracts
    assert cos_ours == pytest.approx(cos_naive, abs=1e-4)
    other = _naive_loss(trainer, c, ref_model, detach_base=detach_base,
                        r_reference="empty" if r_reference == "class" else "class")[1]
    assert abs(other - cos_naive) > 2e-3, (other, cos_naive)    # 20x the match tolerance


def test_stage2_precondition_reaches_the_trainer(tiny_model_dir, sample_manifests, stage1_adapter):
    """``stage2.precondition`` is not ignored: the same draw's loss is the velocity loss times sigma^2."""
    out = {}
    for pre in (False, True):
        recipe = stage_recipe(2, steps=3, resolution=64, embeddings="none", precondition=pre)
        job = ConceptJob("zig", "zqx", sample_manifests["checkered-star"], recipe, seed=5,
                         extractor_adapter=stage1_adapter)
        trainer = PackTrainer(load_pipeline(str(tiny_model_dir)), [job])
        trainer.setup()
        with torch.no_grad():
            out[pre] = trainer._micro_step([trainer.concepts["zig"]], 0)["zig"]
    plain, pre = out[False], out[True]
    assert torch.equal(plain["sigma"], pre["sigma"])
    assert torch.allclose(pre["loss"], plain["loss"] * plain["sigma"].pow(2).mean(), rtol=1e-5)
    assert not torch.allclose(pre["loss"], plain["loss"])


def test_lambda_candidates_and_cos_r_from_their_formulas():
    from purecc.losses import stage2_loss

    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 4)
    v_full, v_base, r_tar, r_empty, x0, eps, r_p, r_b = (torch.randn(shape, generator=g) for _ in range(8))
    v_full.requires_grad_(True)
    R = r_tar - r_empty

    def proj(delta):
        return ((delta * R).flatten(1).sum(1) / (R.pow(2).flatten(1).sum(1) + 1e-6)).clamp(0.0, 5.0)

    expect = {"adaptive": proj(eps - x0 - v_base), "increment": proj(v_full.detach() - v_base),
              "extractor": proj(r_p - r_b)}
    for mode, lam in expect.items():
        out = stage2_loss(v_full, v_base, r_tar, r_empty, x0, eps, eta=2.0, lambda_mode=mode, lambda_max=5.0,
                          r_prompt=r_p, r_base=r_b)
        assert torch.allclose(out["lambda"], lam, atol=1e-6), mode
        assert out["lambda"].grad_fn is None                    # lambda* is a constant for the gradient
        guided = v_base + lam.view(-1, 1, 1, 1) * R
        naive = ((v_full - (eps - x0)) ** 2).flatten(1).mean(1) + 2.0 * ((v_full - guided) ** 2).flatten(1).mean(1)
        assert torch.allclose(out["loss"], naive, atol=1e-5), mode
    inc = (v_full.detach() - v_base).flatten(1)
    cos = (inc * R.flatten(1)).sum(1) / (inc.norm(dim=1) * R.flatten(1).norm(dim=1))
    assert torch.allclose(out["cos_r"], cos, atol=1e-6)
    # the floor (ours): every candidate clamped to [lambda_min, lambda_max]; some samples sit on it
    raw = {"adaptive": eps - x0 - v_base, "increment": v_full.detach() - v_base, "extractor": r_p - r_b}
    for mode, delta in raw.items():
        unclamped = (delta * R).flatten(1).sum(1) / (R.pow(2).flatten(1).sum(1) + 1e-6)
        out = stage2_loss(v_full, v_base, r_tar, r_empty, x0, eps, eta=2.0, lambda_mode=mode, lambda_max=5.0,
                          lambda_min=0.5, r_prompt=r_p, r_base=r_b)
        assert torch.allclose(out["lambda"], unclamped.clamp(0.5, 5.0), atol=1e-6), mode
    assert (unclamped < 0.5).any()      # the floor was exercised, not only stated
    # stage 1's x0 parameterisation in stage 2: x0 estimates x_t - sigma v compared, both terms
    sigma = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    out = stage2_loss(v_full, v_base, r_tar, r_empty, x0, eps, eta=2.0, lambda_mode="adaptive", lambda_max=5.0,
                      sigma=sigma, precondition=True)
    s4 = sigma.view(-1, 1, 1, 1)
    x0_guided = x_t - s4 * (v_base + expect["adaptive"].view(-1, 1, 1, 1) * R)
    naive = ((x_t - s4 * v_full - x0) ** 2).flatten(1).mean(1) + 2.0 * ((x_t - s4 * v_full - x0_guided) ** 2
                                                                         ).flatten(1).mean(1)
    assert torch.allclose(out["loss"], naive, atol=1e-5)
    with pytest.raises(ValueError, match="needs sigma"):
        stage2_loss(v_full, v_base, r_tar, r_empty, x0, eps, eta=2.0, lambda_mode="adaptive", precondition=True)
    with pytest.raises(ValueError, match="needs r_prompt and r_base"):
        stage2_loss(v_full, v_base, r_tar, r_empty, x0, eps, eta=2.0, lambda_mode="extractor")
    with pytest.raises(ValueError, match="must be one of"):
        stage2_loss(v_full, v_base, r_tar, r_empty, x0, eps, eta=2.0, lambda_mode="sometimes")


def test_adaptive_lambda_is_clamped_least_squares():
    from purecc.losses import adaptive_lambda

    r = torch.ones(3, 1, 2, 2)
    v_base = torch.zeros(3, 1, 2, 2)
    target = torch.stack([0.5 * r[0], -r[1], 10 * r[2]])
    lam = adaptive_lambda(target, v_base, r, lambda_max=2.0)
    assert torch.allclose(lam, torch.tensor([0.5, 0.0, 2.0]), atol=1e-5)


def test_stage1_preconditioned_loss_is_sigma_squared_weighted():
    from purecc.losses import noisy_latents, stage1_loss

    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 0.8])
    x_t = noisy_latents(x0, eps, sigma)
    plain = stage1_loss(v, x0, eps, sigma, x_t, precondition=False)
    pre = stage1_loss(v, x0, eps, sigma, x_t, precondition=True)
    assert torch.allclose(pre, sigma ** 2 * plain, rtol=1e-5)


def test_detach_base_keeps_the_loss_and_stops_its_gradient_at_the_base_branch():
    """``detach_base`` (ours): the same loss value; no gradient reaches the base caption's prediction."""
    from purecc.losses import stage2_loss

    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 2, 2)
    x0, eps, r_tar, r_empty = (torch.randn(shape, generator=g) for _ in range(4))
    grads = {}
    for detach in (False, True):
        v_full = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        v_base = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_()
        out = stage2_loss(v_full, v_base, r_tar, r_empty, x0, eps, eta=2.0, lambda_mode="fixed", detach_base=detach)
        out["loss"].sum().backward()
        grads[detach] = (out["loss"].detach(), v_full.grad, v_base.grad)
    assert torch.equal(grads[False][0], grads[True][0]) and torch.equal(grads[False][1], grads[True][1])
    assert grads[False][2].abs().sum() > 0 and grads[True][2] is None
    assert stage_recipe(2).detach_base and not stage_recipe(2, detach_base=False).detach_base
