"""Training on a real 2-node Ray cluster: a batch spreads over the nodes, and a node killed mid-training
(its raylet and workers at once) costs nothing but time: its run resumes on the other node from its last
checkpoint, every job is published exactly once, and the weights equal an uninterrupted run's.

Where a run was placed comes from Ray itself: each run's worker records its node id
(``ray.get_runtime_context().get_node_id()``) in a ``placed`` ledger event."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cluster import api
from cluster.ledger import JobLedger
from cluster.spec import load_batch
from cluster.worker import stage1_root
from cluster_helpers import batch_dict, wait_for, write_batch
from purecc.model import load_pipeline
from purecc.registry import AdapterRegistry
from purecc.trainer import ConceptJob, PackTrainer

pytestmark = pytest.mark.multinode
IDS = ("checkered-star", "striped-circle")
STEPS, EVERY, VICTIM = 24, 2, "checkered-star"


def test_a_batch_spreads_and_survives_a_lost_node(nodes, tmp_path, tiny_model_dir, sample_manifests):
    data = batch_dict(tiny_model_dir, tmp_path / "store", sample_manifests, ids=IDS)
    data["defaults"]["stage1"] = {"steps": STEPS, "grad_accum": 1, "checkpoint_every": EVERY}
    data["resources"]["max_attempts"] = 3
    path = write_batch(tmp_path / "batch.yaml", data)
    ledger_path = Path(load_batch(path).ledger_path)
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(r=api.submit(path)), daemon=True)
    driver.start()
    wait_for(ledger_path.exists, 60, "the ledger")
    with JobLedger(ledger_path) as led:
        def victim_checkpointed():
            job = led.get(VICTIM)
            placed = led.events(VICTIM, "placed")
            return placed and job.state == "stage1" and (job.checkpoint_step or 0) >= 2 * EVERY and (job, placed)
        try:
            job, placed = wait_for(victim_checkpointed, 240, f"a stage-1 checkpoint of {VICTIM}", poll=0.1)
        except AssertionError as exc:   # say where the batch stood (the ledger is all there is afterwards)
            states = {j.concept_id: (j.state, j.checkpoint_step) for j in led.jobs()}
            raise AssertionError(f"{exc}: jobs {states}, runs {led.runs()}, last events "
                                 f"{[(e['concept_id'], e['kind']) for e in led.events()[-12:]]}") from None
        lost = nodes.name_of(placed[-1]["detail"]["node_id"])
        assert lost in ("node_a", "node_b"), placed
        at_kill = job.checkpoint_step
        nodes.remove(lost)
    driver.join(360)
    assert not driver.is_alive(), "the batch did not finish within 360 s of the node loss"
    assert result["r"].summary.states == {cid: "published" for cid in IDS}, result["r"].summary

    with JobLedger(ledger_path) as led:
        events = {cid: led.events(cid) for cid in IDS}
    where = {cid: [e["detail"]["node_id"] for e in ev if e["kind"] == "placed"] for cid, ev in events.items()}
    first_stage1 = {cid: where[cid][0] for cid in IDS}
    print("placed:", {cid: [nodes.name_of(n) or n[:8] for n in ids] for cid, ids in where.items()},
          "lost:", lost, "at step", at_kill)
    # the two first stage-1 runs ran at once on the two one-CPU nodes
    assert len(set(first_stage1.values())) == 2, where
    survivor = ({"node_a", "node_b"} - {lost}).pop()
    after = where[VICTIM][len(placed):]
    assert after and all(nodes.name_of(n) == survivor for n in after), (where, lost)
    resumed = [e["detail"] for e in events[VICTIM] if e["kind"] == "resumed" and e["detail"]["stage"] == 1]
    assert resumed and resumed[-1]["step"] >= at_kill, (resumed, at_kill)
    for cid in IDS:
        kinds = [e["kind"] for e in events[cid]]
        assert kinds.count("stage1") == 1 and kinds.count("stage2") == 1 and kinds.count("published") == 1, kinds

    spec = next(j for j in load_batch(path).jobs() if j.concept_id == VICTIM)
    ref = PackTrainer(load_pipeline(str(tiny_model_dir)),
                      [ConceptJob(VICTIM, spec.trigger, spec.manifest, spec.recipe(1), seed=spec.seed)])
    ref.setup()
    ref.train()
    want = load_file(ref.export(VICTIM, tmp_path / "ref") / "adapter_model.safetensors")
    have = load_file(AdapterRegistry(stage1_root(spec.storage)).fetch(VICTIM, tmp_path / "cache")
                     / "adapter_model.safetensors")
    assert want.keys() == have.keys()
    worst = max((want[k] - have[k]).abs().max().item() for k in want)
    print("largest weight difference to an uninterrupted run:", worst)
    assert worst <= 1e-6, worst
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)
