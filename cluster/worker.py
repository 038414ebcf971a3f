"""The Ray Train worker: a thin shell that drives ``purecc.trainer.PackTrainer`` for one pack.

``train_pack(config)`` is the ``train_loop_per_worker``. It checks each member's data (a broken
concept fails alone, its pack-mates go on), loads the base, resumes every member from the newest
checkpoint it can find (the run's own ``ray.train.get_checkpoint()``, the board, the ledger pointer),
trains, reports per-concept checkpoints through ``ray.train.report``, polls cancellations every step,
and at the end of the stage exports the adapter, renders validation images and publishes: stage 1 into
``<storage>/work/stage1``, stage 2 into the adapter registry ``<storage>/adapters``.

A pack checkpoint is one folder with a sub-folder per concept (``checkpoint.safetensors`` +
``state.json`` from the trainer, and ``job.json`` naming the job it belongs to). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from purecc.fileio import atomic_write_json
from purecc.registry import AdapterRegistry, resolve_fs
from purecc.trainer import read_checkpoint_state

JOB_FILE = "job.json"
STAGE1_AREA = "work/stage1"


def stage1_root(storage: str) -> str:
    return f"{storage}/{STAGE1_AREA}"


def adapter_uri(storage: str, concept_id: str) -> str:
    return f"{storage}/adapters/{concept_id}"


def _within(uri: str, root: str) -> bool:
    """True when ``uri`` lies under ``root`` (both local paths, or both URIs of the same store)."""
    if "://" in root or "://" in uri:
        return uri.startswith(root.rstrip("/") + "/") and "/../" not in uri and not uri.endswith("/..")
    return Path(uri).resolve().is_relative_to(Path(root).resolve())


def download(uri: str, dest: Path) -> Path:
    """Copy a folder (local path or URI) to the local ``dest``."""
    fs, path = resolve_fs(uri)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


class _Pack:
    """What one worker holds while training a pack."""

    def __init__(self, config: dict[str, Any], scratch: Path):
        import ray

        self.cfg, self.scratch = config, scratch
        self.board = config["board"]
        self.stage: int = config["stage"]
        self.run = config["run_name"]
        self.members = {m["concept_id"]: m for m in config["members"]}
        self.ckpt_root = scratch / "ckpt"
        self.report_seq = 0
        self._ray = ray

    # ----- messages to the driver ------------------------------------------------------------
    def push(self, kind: str, payload: dict, wait: bool = False) -> None:
        ref = self.board.push.remote(kind, {"run": self.run, **payload})
        if wait:
            self._ray.get(ref)

    def outcome(self, cid: str, status: str, **info) -> None:
        self.push("outcome", {"concept_id": cid, "stage": self.stage, "status": status, **info}, wait=True)

    # ----- member checks ---------------------------------------------------------------------
    def check_data(self) -> None:
        """Drop members whose data cannot be read (or changed since submission), or whose stage-1
        adapter is missing: they fail alone, the rest of the pack trains."""
        from purecc.data import load_image, read_manifest

        for cid, m in list(self.members.items()):
            try:
                manifest = read_manifest(m["manifest"], m["trigger"])
                if manifest.content_hash() != m["data_hash"]:
                    raise ValueError(f"{m['manifest']}: the data changed since the batch was submitted "
                                     "(resubmit with --replace to train on the new data)")
                for i, row in enumerate(manifest.rows):
                    try:
                        load_image(row.image_path)
                    except Exception as exc:  # noqa: BLE001 -- PIL raises OSError, ValueError, SyntaxError...
                        raise ValueError(f"{m['manifest']}: row {i + 1}: image {row.image_path} cannot be "
                                         f"decoded ({type(exc).__name__}: {exc})") from exc
            except Exception as exc:  # noqa: BLE001 -- any data problem fails this concept only
                del self.members[cid]
                self.outcome(cid, "failed", error=f"data error: {type(exc).__name__}: {exc}")
                continue
            if self.stage == 2:
                try:
                    m["extractor_dir"] = str(self.fetch_stage1(cid))
                except (OSError, ValueError) as exc:
                    del self.members[cid]
                    self.outcome(cid, "failed", error=f"stage-1 adapter error: {type(exc).__name__}: {exc}")

    def fetch_stage1(self, cid: str) -> Path:
        registry = AdapterRegistry(stage1_root(self.cfg["storage"]))
        try:
            return registry.fetch(cid, self.scratch / "stage1")
        except KeyError:
            raise FileNotFoundError(f"stage-1 adapter of {cid} is missing under "
                                    f"{stage1_root(self.cfg['storage'])}") from None

    # ----- training ----------------------------------------------------------------------------
    def build(self):
        from purecc.model import ModelConfig, load_pipeline
        from purecc.recipe import stage_recipe
        from purecc.trainer import ConceptJob, PackTrainer

        pipe = load_pipeline(ModelConfig(path=self.cfg["base_model"]))
        jobs = []
        for cid, m in self.members.items():
            recipe = stage_recipe(self.stage, **{k: v for k, v in m["recipe"].items() if k != "stage"})
            ext = Path(m["extractor_dir"]) if self.stage == 2 and recipe.extractor == "stage1" else None
            jobs.append(ConceptJob(cid, m["trigger"], Path(m["manifest"]), recipe, seed=m["seed"],
                                   extractor_adapter=ext))
        cache = Path(self.cfg.get("scratch") or tempfile.gettempdir()) / "purecc-cache" / "latents"
        trainer = PackTrainer(pipe, jobs, cache_dir=cache, on_metrics=self.on_metrics)
        trainer.setup()
        return trainer

    def resume(self, trainer) -> None:
        """Load each member's newest valid checkpoint: this run's, the board's or the ledger's."""
        for cid, folders in self._candidates().items():
            ranked = []
            for folder in folders:
                try:
                    job = json.loads((folder / JOB_FILE).read_text())
                    state = read_checkpoint_state(folder)
                except (OSError, ValueError):
                    continue
                if job.get("job_key") == self.members[cid]["job_key"] and state.get("stage") == self.stage:
                    ranked.append((int(state["step"]), folder))
            for step, folder in sorted(ranked, key=lambda t: -t[0]):
                try:
                    step = trainer.load_checkpoint(cid, folder)
                except ValueError as exc:   # CheckpointError: another base, seed or stage
                    self.push("event", {"concept_id": cid, "event": "checkpoint-rejected",
                                        "detail": {"error": str(exc)}})
                    continue
                self.push("event", {"concept_id": cid, "event": "resumed",
                                    "detail": {"stage": self.stage, "step": step}}, wait=True)
                break

    def _candidates(self) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {cid: [] for cid in self.members}
        ckpt = self._ray.train.get_checkpoint()   # set after a worker restart or a same-name relaunch
        if ckpt is not None:
            local = Path(ckpt.to_directory(str(self.scratch / "restore-run")))
            for cid in found:
                found[cid].append(local / cid)
        keys = [m["job_key"] for m in self.members.values()]
        pointers = self._ray.get(self.board.latest_checkpoints.remote(keys, self.stage))
        for i, (cid, m) in enumerate(self.members.items()):
            for uri in filter(None, (pointers.get(m["job_key"], {}).get("uri"), m.get("resume"))):
                if not _within(uri, self.cfg["runs_path"]):
                    continue  # never read outside this batch's storage
                try:
                    found[cid].append(download(uri, self.scratch / f"restore-{i}-{len(found[cid])}"))
                except OSError:
                    continue
        return found

    def on_metrics(self, m: dict) -> None:
        fault = self.cfg.get("fault")
        if fault and (m["concept_id"], m["stage"], m["step"]) == (fault["concept_id"], fault["stage"], fault["step"]):
            marker = Path(fault["marker"])
            if not marker.exists():
                atomic_write_json(marker, {"killed_at": time.time(), "pid": os.getpid(), **fault})
                os._exit(1)  # a real worker death: Ray Train restarts the worker group
        self.push("progress", {k: v for k, v in m.items() if isinstance(v, (int, float, str))})

    def on_checkpoint(self, ids: list[str]) -> None:
        """Report one pack checkpoint holding every member's newest checkpoint (those just saved too)."""
        from ray.train import Checkpoint

        self.report_seq += 1
        pack_dir = self.scratch / f"report-{self.report_seq}"
        saved = []
        for cid, m in self.members.items():
            src = self.ckpt_root / cid
            if (src / "state.json").is_file():
                shutil.copytree(src, pack_dir / cid)
                atomic_write_json(pack_dir / cid / JOB_FILE, {"job_key": m["job_key"], "concept_id": cid})
                step = json.loads((src / "state.json").read_text())["step"]
                saved.append({"concept_id": cid, "job_key": m["job_key"], "step": step})
        self._ray.train.report({"stage": self.stage, "saved": ids,
                                "steps": json.dumps({s["concept_id"]: s["step"] for s in saved})},
                               checkpoint=Checkpoint.from_directory(str(pack_dir)))
        persisted = self._ray.train.get_checkpoint()
        uri = f"{self.cfg['runs_path']}/{self.run}/{Path(persisted.path).name}"
        self.push("checkpoint", {"uri": uri, "stage": self.stage, "members": saved}, wait=True)
        shutil.rmtree(pack_dir, ignore_errors=True)

    def should_stop(self) -> list[str]:
        return self._ray.get(self.board.cancelled.remote(list(self.members)))

    # ----- the end of a stage ------------------------------------------------------------------
    def finish(self, trainer, cid: str) -> str:
        """Export the stage's adapter (+ validation images) and publish it; returns its URI."""
        m = self.members[cid]
        out = self.scratch / "export" / cid
        trainer.export(cid, out, metrics={"batch": m["batch"], "content_hash": m["content_hash"]})
        if m["validation_prompts"]:
            render_validation(trainer, cid, m, self.cfg["validation"], out / "validation" / f"stage{self.stage}")
        storage = self.cfg["storage"]
        if self.stage == 1:
            AdapterRegistry(stage1_root(storage)).publish(cid, out)
            return f"{stage1_root(storage)}/adapters/{cid}"
        earlier = Path(m["extractor_dir"]) / "validation" / "stage1"
        if earlier.is_dir():
            shutil.copytree(earlier, out / "validation" / "stage1", dirs_exist_ok=True)
        AdapterRegistry(storage).publish(cid, out)
        return adapter_uri(storage, cid)


def render_validation(trainer, cid: str, member: dict, settings: dict, dest: Path) -> list[Path]:
    """The member's validation prompts ([v] -> trigger), rendered with its slot of the bank."""
    from purecc.generate import RenderSettings, Sample, generate, save_png

    res = int(member["recipe"].get("resolution", 512))
    prompts = [p.replace("[v]", member["trigger"]) for p in member["validation_prompts"]]
    samples = [Sample(p, seed=member["seed"] + i, concepts=((cid, 1.0),)) for i, p in enumerate(prompts)]
    images = generate(trainer.pipe, samples, {cid: trainer.concepts[cid].slot},
                      RenderSettings(steps=settings["steps"], guidance=settings["guidance"], width=res, height=res))
    return [save_png(img, dest / f"{i:02d}.png") for i, img in enumerate(images)]


def train_pack(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of every PureCC run (one worker per pack)."""
    root = Path(config.get("scratch") or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="purecc-run-", dir=root))
    try:
        pack = _Pack(config, scratch)
        pack.check_data()
        if not pack.members:
            return
        trainer = pack.build()
        pack.resume(trainer)
        result = trainer.train(checkpoint_dir=lambda cid: pack.ckpt_root / cid,
                               on_checkpoint=pack.on_checkpoint, should_stop=pack.should_stop)
        for cid, summary in result.items():
            if summary["status"] != "done":
                pack.outcome(cid, "stopped", step=summary["step"])
                continue
            uri = pack.finish(trainer, cid)
            pack.outcome(cid, "done", output=uri, step=summary["step"], final_loss=summary["final_loss"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
