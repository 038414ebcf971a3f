"""Finite or nothing in training: a diverging concept fails alone (``ConceptDiverged``), its slot is
cleared, and its pack-mates end bit-identical to a pack trained without it."""

from __future__ import annotations

import pytest
import torch

from purecc.bank import attach_bank
from purecc.model import load_pipeline
from purecc.recipe import stage_recipe
from purecc.trainer import ConceptDiverged, ConceptJob, PackTrainer

GOOD = stage_recipe(1, steps=4, resolution=64, grad_accum=2, lr=1e-3)


def _mates(manifests) -> list[ConceptJob]:
    return [ConceptJob("checkered-star", "zqx", manifests["checkered-star"], GOOD, seed=1),
            ConceptJob("striped-circle", "vlk", manifests["striped-circle"], GOOD, seed=2)]


def _trainer(model_dir, jobs, slots: int) -> PackTrainer:
    pipe = load_pipeline(str(model_dir))
    attach_bank(pipe.transformer, slots)          # the same bank shape with and without the bad concept
    t = PackTrainer(pipe, jobs)
    t.setup()
    return t


def _weights(t: PackTrainer, ids) -> dict[str, torch.Tensor]:
    return {cid: t.bank.read_slot(t.slot_of(cid)).clone() for cid in ids}


@pytest.fixture()
def reference(tiny_model_dir, sample_manifests) -> dict[str, torch.Tensor]:
    """The pack-mates trained without the bad concept (a 3-slot bank, slot 2 unused)."""
    t = _trainer(tiny_model_dir, _mates(sample_manifests), 3)
    t.train()
    return _weights(t, ("checkered-star", "striped-circle"))


def test_nan_in_one_concepts_data_fails_it_alone_and_mates_are_bit_identical(tiny_model_dir, sample_manifests,
                                                                             reference):
    bad = ConceptJob("dotted-diamond", "bxj", sample_manifests["dotted-diamond"], GOOD, seed=3)
    t = _trainer(tiny_model_dir, _mates(sample_manifests) + [bad], 3)
    t.concepts["dotted-diamond"].latents.mean[:, 0, 0, 0] = float("nan")   # poisoned data, every row
    result = t.train()
    assert result["dotted-diamond"]["status"] == "failed"
    err = t.failures["dotted-diamond"]
    assert isinstance(err, ConceptDiverged) and (err.concept_id, err.step, err.what) == ("dotted-diamond", 1, "loss")
    assert "dotted-diamond diverged at step 1" in result["dotted-diamond"]["error"]
    assert not t.bank.storage[t.concepts["dotted-diamond"].slot].any()      # its slot is zeroed
    with pytest.raises(ConceptDiverged):                                    # and never routed again
        t.slot_of("dotted-diamond")
    assert all(result[c]["status"] == "done" for c in reference)
    got = _weights(t, reference)
    for cid, want in reference.items():
        assert torch.equal(got[cid], want), cid                             # bit-for-bit


def test_huge_learning_rate_diverges_alone_and_mates_are_unchanged(tiny_model_dir, sample_manifests, reference):
    wild = stage_recipe(1, steps=4, resolution=64, grad_accum=2, lr=1e30, max_grad_norm=1e30, weight_decay=0.0)
    bad = ConceptJob("dotted-diamond", "bxj", sample_manifests["dotted-diamond"], wild, seed=3)
    t = _trainer(tiny_model_dir, _mates(sample_manifests) + [bad], 3)
    result = t.train()
    summary = result["dotted-diamond"]
    assert summary["status"] == "failed" and summary["step"] < 4
    assert f"diverged at step {summary['step'] + 1}" in summary["error"]
    assert not t.bank.storage[t.concepts["dotted-diamond"].slot].any()
    assert torch.isfinite(t.bank.storage).all()
    got = _weights(t, reference)
    for cid, want in reference.items():
        # its first step ran batched with the bad concept: equal up to batched-matmul rounding
        assert (got[cid] - want).norm() / want.norm() < 1e-6, cid
