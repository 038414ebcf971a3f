"""The Ray Train worker: Ray's glue around ``purecc.pack.PackRecipe`` for one pack, nothing more.

``train_pack(config)`` is the ``train_loop_per_worker``. The recipe does everything a local run also
does (data checks, training, checkpoints, export, validation images); this module adds only what Ray
needs: progress, events and outcomes pushed to the driver's board, checkpoints reported through
``ray.train.report`` (and found again after a restart: the run's own ``ray.train.get_checkpoint()``,
the board's pointer, the ledger's), cancellations polled every step, the stage-1 adapter fetched
from storage, and publishing: stage 1 into ``<storage>/work/stage1``, stage 2 into the adapter
registry ``<storage>/adapters``. Where the ``tensorboard`` package is installed, each member's losses,
lambda and validation images also go to TensorBoard event files, copied at the end of each stage to
``<storage>/work/tensorboard/<concept_id>/stage<n>/`` (next to the run checkpoints under ``work/``).

A run is a pack's whole life when the driver gives it ``PackRun.then`` (the stage-2 plan of the same
members): stage 1, then a wait on the board until the driver has recorded stage 1 in the ledger and
launched stage 2 there (``hand_over``), then stage 2 on the base loaded once (its bank detached and a
fresh one attached, as on a new load). A worker restarted by Ray Train after the handover goes
straight to stage 2 and resumes it; the run's checkpoints say which stage they hold (``pack.json``), so
a stage never resumes from the other's.

A reported pack checkpoint is one folder with a sub-folder per concept (``checkpoint.safetensors`` +
``state.json``, which records the job's content key) and ``pack.json``. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow.fs as pafs

from purecc.fileio import atomic_write_json
from purecc.pack import PackPlan, PackRecipe
from purecc.registry import AdapterRegistry, resolve_fs

STAGE1_AREA = "work/stage1"
PACK_STATE = "pack.json"          # in a reported pack checkpoint: {"stage": n}
HANDOVER_WAIT_S = 600.0           # a whole-life run waits this long for the driver to record stage 1
TENSORBOARD_AREA = "work/tensorboard"
# a member's downsampled loss curve rides on its progress message at its first and last step and at
# most this often in between (it is a few KB; every step's message stays a few scalars)
CURVE_PUSH_S = 10.0


def stage1_root(storage: str) -> str:
    """Where stage-1 adapters are published (a registry root of its own)."""
    return f"{storage}/{STAGE1_AREA}"


def adapter_uri(storage: str, concept_id: str) -> str:
    """The published stage-2 adapter folder of ``concept_id``."""
    return f"{storage}/adapters/{concept_id}"


def _within(uri: str, root: str) -> bool:
    """True when ``uri`` lies under ``root`` (both local paths, or both URIs of the same store)."""
    if "://" in root or "://" in uri:
        return uri.startswith(root.rstrip("/") + "/") and "/../" not in uri and not uri.endswith("/..")
    return Path(uri).resolve().is_relative_to(Path(root).resolve())


def download(uri: str, dest: Path) -> Path:
    """Copy a folder (local path or URI) to the local ``dest``."""
    fs, path = resolve_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such checkpoint folder")
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def _stored_stage(fs, path: str) -> int | None:
    """The stage a pack checkpoint holds, read through its file system (None: written before pack.json
    existed, or unreadable: the recipe's own checks then decide)."""
    try:
        with fs.open_input_stream(f"{path}/{PACK_STATE}") as f:
            return int(json.loads(f.read())["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _label(uri: str) -> str:
    """A checkpoint's short name for events (its last two components: no server path in events)."""
    return "/".join(uri.rstrip("/").split("/")[-2:])


def _why(exc: OSError, uri: str, *, typed: bool = True) -> str:
    """An error's text for an event, the checkpoint's location in it replaced by its label (no server
    path in events): the URI as given and the path its file system names it by."""
    text = f"{type(exc).__name__}: {exc}" if typed else str(exc)
    where = {uri.rstrip("/")}
    if "://" in uri:
        where.add(uri.split("://", 1)[1].split("?", 1)[0].rstrip("/"))     # an object store's bucket/key
    else:
        where.add(str(Path(uri).expanduser().resolve()))
    for full in sorted(where, key=len, reverse=True):
        text = text.replace(full, _label(uri))
    return text


def _damage(uri: str) -> None:
    """Tests: flip the last bytes of a stored file in place (a bad disk), through its file system."""
    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        data = f.read()
    with fs.open_output_stream(path) as f:
        f.write(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))


@dataclass(frozen=True)
class PackRun:
    """Everything a worker needs besides the board: the pack plan and where the run keeps its files.

    ``then``: the stage-2 plan of the same members when the run is a pack's whole life (stage 1, the
    driver's handover, stage 2 on the same loaded base); ``resume``: per concept, the checkpoint URI
    the ledger recorded for ``plan``'s stage; ``fault``
    (tests): ``{concept_id, stage, step, marker}`` makes the worker ``os._exit(1)`` once there
    (with ``corrupt_newest``: after damaging the newest checkpoint it reported, as a bad disk would).
    """

    plan: PackPlan
    storage: str
    runs_path: str
    scratch: str | None = None
    resume: Mapping[str, str] = field(default_factory=dict)
    fault: Mapping[str, Any] | None = None
    then: PackPlan | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain fields for ``train_loop_config``."""
        return {"plan": self.plan.to_dict(), "storage": self.storage, "runs_path": self.runs_path,
                "scratch": self.scratch, "resume": dict(self.resume),
                "fault": dict(self.fault) if self.fault else None,
                "then": self.then.to_dict() if self.then else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PackRun":
        """Inverse of ``to_dict``."""
        then = data.get("then")
        return cls(**{**data, "plan": PackPlan.from_dict(data["plan"]),
                      "then": PackPlan.from_dict(then) if then else None})


class RayShell:
    """What one worker adds to the recipe: messages to the driver, Ray checkpoints, publishing."""

    def __init__(self, run: PackRun, board, scratch: Path):
        import ray

        self.run, self.board, self.scratch = run, board, scratch
        self.plan = run.plan
        self.ckpt_root = scratch / f"ckpt-s{self.plan.stage}"
        self.report_seq = 0
        self.last_reported: str | None = None     # URI of the newest pack checkpoint reported
        self.members: Mapping[str, Any] = {}      # the recipe's members once it is set up
        self.stage1_dirs: dict[str, Path] = {}
        self._curve_sent: dict[tuple[str, int], float] = {}   # (member, stage) -> when its curve last went out
        self._ray = ray

    @property
    def stage(self) -> int:
        """The stage being trained now."""
        return self.plan.stage

    @property
    def tensorboard_dir(self) -> Path:
        """The run's local TensorBoard folder (copied to the storage at each stage's end)."""
        return self.scratch / "tensorboard"

    def begin(self, plan: PackPlan) -> None:
        """Start the next stage of a whole-life run with ``plan``."""
        self.plan, self.members = plan, {}
        self.ckpt_root = self.scratch / f"ckpt-s{plan.stage}"

    # ----- messages to the driver ----------------------------------------------------------------
    def push(self, kind: str, payload: dict, wait: bool = False) -> None:
        """One message to the board (``wait``: until it is there)."""
        ref = self.board.push.remote(kind, {"run": self.plan.name, **payload})
        if wait:
            self._ray.get(ref)

    def outcome(self, cid: str, status: str, **info) -> None:
        """The end of one member's stage: done, failed or stopped."""
        self.push("outcome", {"concept_id": cid, "stage": self.stage, "status": status, **info}, wait=True)

    def on_event(self, cid: str, event: str, detail: dict) -> None:
        """A recipe event (resumed, checkpoint-rejected) for the ledger's history."""
        self.push("event", {"concept_id": cid, "event": event, "detail": detail}, wait=event == "resumed")

    def on_metrics(self, m: dict) -> None:
        """One member's step: progress to the board (and the test fault, when armed)."""
        fault = self.run.fault
        if fault and (m["concept_id"], m["stage"], m["step"]) == (fault["concept_id"], fault["stage"], fault["step"]):
            marker = Path(fault["marker"])
            if not marker.exists():
                atomic_write_json(marker, {"killed_at": time.time(), "pid": os.getpid(), **fault})
                if fault.get("corrupt_newest") and self.last_reported:
                    _damage(f"{self.last_reported}/{m['concept_id']}/checkpoint.safetensors")
                os._exit(1)  # a real worker death: Ray Train restarts the worker group
        msg = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
        curve, key, now = m.get("loss_curve"), (m["concept_id"], m["stage"]), time.monotonic()
        if curve is not None and (m["step"] >= m["total"] or key not in self._curve_sent
                                  or now - self._curve_sent[key] >= CURVE_PUSH_S):
            self._curve_sent[key] = now
            msg["curve"] = {k: v for k, v in curve.to_dict().items() if k != "recent"}
        self.push("progress", msg)

    def should_stop(self) -> list[str]:
        """Members whose cancellation the driver posted."""
        return self._ray.get(self.board.cancelled.remote([m.concept_id for m in self.plan.members]))

    # ----- inputs ---------------------------------------------------------------------------------
    def fetch_stage1(self, cid: str) -> Path:
        """A local copy of the member's published stage-1 adapter."""
        registry = AdapterRegistry(stage1_root(self.run.storage))
        try:
            self.stage1_dirs[cid] = registry.fetch(cid, self.scratch / "stage1")
            return self.stage1_dirs[cid]
        except KeyError:
            raise FileNotFoundError(f"stage-1 adapter of {cid} is missing under "
                                    f"{stage1_root(self.run.storage)}") from None

    def _stage1_dir(self, cid: str) -> Path | None:
        """The member's stage-1 folder (fetched now when its extractor did not need it), if published."""
        if cid not in self.stage1_dirs:
            try:
                self.fetch_stage1(cid)
            except FileNotFoundError:
                return None
        return self.stage1_dirs[cid]

    def candidates(self) -> dict[str, list[Path]]:
        """Checkpoint folders each member may resume from: this run's, the board's, the ledger's."""
        members = self.members
        found: dict[str, list[Path]] = {cid: [] for cid in members}
        ckpt = self._ray.train.get_checkpoint()   # set after a worker restart or a same-name relaunch
        if ckpt is not None:
            local = Path(ckpt.to_directory(str(self.scratch / f"restore-run-s{self.stage}")))
            if _stored_stage(pafs.LocalFileSystem(), str(local)) in (None, self.stage):   # both stages report
                for cid in found:
                    found[cid].append(local / cid)
        keys = {cid: m.key for cid, m in members.items()}
        pointers = self._ray.get(self.board.latest_checkpoints.remote(list(keys.values()), self.stage))
        kept = self._kept_checkpoints()
        for i, cid in enumerate(found):
            ledger = self.run.resume.get(cid) if self.stage == self.run.plan.stage else None
            recorded = [pointers.get(keys[cid], {}).get("uri"), ledger]
            uris = recorded + [f"{k}/{cid}" for k in kept]
            for uri in dict.fromkeys(u for u in uris if u):
                if not _within(uri, self.run.runs_path):   # never read outside this batch's storage
                    self.on_event(cid, "checkpoint-rejected", {"checkpoint": _label(uri),
                                                               "reason": "outside this batch's runs folder"})
                    continue
                try:
                    # named after the checkpoint, so that the recipe's events say which one it was
                    dest = self.scratch / f"restore-{i}-{len(found[cid])}-{_label(uri).split('/')[0]}" / cid
                    found[cid].append(download(uri, dest))
                except FileNotFoundError as exc:
                    if uri in recorded:   # a recorded checkpoint is gone: say so (a kept one may lack a member)
                        self.on_event(cid, "checkpoint-unreadable", {"checkpoint": _label(uri),
                                                                     "error": _why(exc, uri, typed=False)})
                except OSError as exc:     # recorded, never swallowed: the next candidate is tried
                    self.on_event(cid, "checkpoint-unreadable", {"checkpoint": _label(uri), "error": _why(exc, uri)})
        return found

    def _kept_checkpoints(self) -> list[str]:
        """Every checkpoint Ray Train keeps for this run (newest first), so that a damaged newest one
        falls back to the one before it (the recipe ranks them by step and verifies their hashes)."""
        run_dir = f"{self.run.runs_path}/{self.run.plan.name}"
        fs, path = resolve_fs(run_dir)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as exc:     # recorded for every member, never swallowed
            for cid in self.members:
                self.on_event(cid, "checkpoint-unreadable", {"checkpoint": _label(run_dir),
                                                             "error": _why(exc, run_dir)})
            return []
        names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name.startswith("checkpoint_")), reverse=True)
        return [f"{run_dir}/{n}" for n in names if _stored_stage(fs, f"{path}/{n}") in (None, self.stage)]

    # ----- checkpoints ------------------------------------------------------------------------------
    def checkpoint_dir(self, cid: str) -> Path:
        """Where the recipe writes the member's checkpoint."""
        return self.ckpt_root / cid

    def on_checkpoint(self, ids: list[str]) -> None:
        """Report one pack checkpoint holding every member's newest checkpoint (those just saved too)."""
        from ray.train import Checkpoint

        self.report_seq += 1
        pack_dir = self.scratch / f"report-{self.report_seq}"
        pack_dir.mkdir(parents=True)
        (pack_dir / PACK_STATE).write_text(json.dumps({"stage": self.stage}))
        saved = []
        for cid, m in self.members.items():
            src = self.ckpt_root / cid
            if (src / "state.json").is_file():
                shutil.copytree(src, pack_dir / cid)
                step = json.loads((src / "state.json").read_text())["step"]
                saved.append({"concept_id": cid, "job_key": m.key, "step": step})
        self._ray.train.report({"stage": self.stage, "saved": ids,
                                "steps": json.dumps({s["concept_id"]: s["step"] for s in saved})},
                               checkpoint=Checkpoint.from_directory(str(pack_dir)))
        persisted = self._ray.train.get_checkpoint()
        uri = f"{self.run.runs_path}/{self.run.plan.name}/{Path(persisted.path).name}"
        self.last_reported = uri
        self.push("checkpoint", {"uri": uri, "stage": self.stage, "members": saved}, wait=True)
        shutil.rmtree(pack_dir, ignore_errors=True)

    # ----- the end of a stage --------------------------------------------------------------------------
    def keep_tensorboard(self, cid: str, local: Path) -> None:
        """Copy the member's event files of this stage to the storage (a failed copy is an event, the
        adapter is published all the same)."""
        src = local / cid
        if not src.is_dir():
            return
        dest = f"{self.run.storage}/{TENSORBOARD_AREA}/{cid}/stage{self.stage}"
        fs, path = resolve_fs(dest)
        try:
            fs.create_dir(path, recursive=True)
            pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except OSError as exc:
            self.on_event(cid, "tensorboard-unwritable", {"error": f"{type(exc).__name__}: {exc.strerror or exc}"})

    def publish(self, recipe: PackRecipe, cid: str) -> str:
        """Export the member's adapter (+ validation images) and publish it; returns its URI."""
        out = self.scratch / "export" / cid
        recipe.export(cid, out)
        recipe.render_validation(cid, out / "validation" / f"stage{self.stage}")
        storage = self.run.storage
        if self.stage == 1:
            AdapterRegistry(stage1_root(storage)).publish(cid, out)
            return f"{stage1_root(storage)}/adapters/{cid}"
        stage1 = self._stage1_dir(cid)
        if stage1 is not None and (stage1 / "validation" / "stage1").is_dir():
            shutil.copytree(stage1 / "validation" / "stage1", out / "validation" / "stage1", dirs_exist_ok=True)
        AdapterRegistry(storage).publish(cid, out)
        return adapter_uri(storage, cid)


def _tensorboard(folder: Path):
    """The run's TensorBoard logger, or None where the optional ``tensorboard`` package is missing."""
    from purecc.tb_log import TensorBoardLogger

    try:
        return TensorBoardLogger(folder)
    except ValueError:
        return None


class _Timer:
    """Seconds spent per phase of a run (reported with each stage as a ``stage-timing`` event)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now


def _train_stage(shell: RayShell, plan: PackPlan, root: Path, logger, pipe, timer: _Timer):
    """One stage of the run's pack: setup, resume, train, publish, outcomes. Returns the loaded base
    (None when nothing was loaded) so that the next stage reuses it."""
    shell.begin(plan)
    recipe = PackRecipe(plan, cache_dir=root / "purecc-cache" / "latents", extractor=shell.fetch_stage1,
                        on_metrics=shell.on_metrics, on_event=shell.on_event, logger=logger, pipe=pipe)
    t = time.perf_counter()
    try:
        if pipe is None:
            from purecc.model import ModelConfig, load_pipeline

            recipe.pipe = load_pipeline(ModelConfig(path=plan.base_model))
            t = timer.add("load_base", t)
        else:     # the next stage on the loaded base: a bank of its own size, as on a fresh load
            from purecc.bank import detach_bank

            detach_bank(pipe.transformer)
        for cid, error in recipe.setup().items():
            shell.outcome(cid, "failed", error=error)
        if not recipe.members:
            return recipe.pipe
        t = timer.add(f"s{plan.stage}_setup", t)
        shell.members = recipe.members
        node = shell._ray.get_runtime_context().get_node_id()     # where Ray placed this run (multi-node tests)
        for cid in recipe.members:
            shell.on_event(cid, "placed", {"node_id": node, "run": plan.name})
        resumed = recipe.resume(shell.candidates())
        for cid, m in recipe.members.items():     # a row from the first step on, not from the first report
            shell.push("progress", {"concept_id": cid, "stage": shell.stage, "step": resumed.get(cid, 0),
                                    "total": m.recipe.steps})
        t = timer.add(f"s{plan.stage}_resume", t)
        ckpt_s = [0.0]

        def on_checkpoint(ids: list[str]) -> None:
            c = time.perf_counter()
            shell.on_checkpoint(ids)
            ckpt_s[0] += time.perf_counter() - c

        result = recipe.train(checkpoint_dir=shell.checkpoint_dir, on_checkpoint=on_checkpoint,
                              should_stop=shell.should_stop)
        timer.phases[f"s{plan.stage}_checkpoints"] = ckpt_s[0]
        t = timer.add(f"s{plan.stage}_train", t + ckpt_s[0])
        train_s = timer.phases[f"s{plan.stage}_train"]
        for cid, summary in result.items():
            if summary["status"] == "failed":
                shell.outcome(cid, "failed", error=f"training error: {summary['error']}")
                continue
            if summary["status"] != "done":
                shell.outcome(cid, "stopped", step=summary["step"])
                continue
            uri = shell.publish(recipe, cid)
            if logger is not None:
                logger.close()           # flushed before the copy (the next write reopens the writer)
                shell.keep_tensorboard(cid, shell.tensorboard_dir)
            shell.outcome(cid, "done", output=uri, step=summary["step"], final_loss=summary["final_loss"])
        timer.add(f"s{plan.stage}_publish", t)
        for cid in recipe.members:
            shell.push("event", {"concept_id": cid, "event": "stage-timing",
                                 "detail": {"stage": plan.stage, "pack": plan.name, "pid": os.getpid(),
                                            "train_s": round(train_s, 4),
                                            "phases": {k: round(v, 4) for k, v in timer.phases.items()}}})
        return recipe.pipe
    finally:
        recipe.trainer = None     # the base stays loaded (with its bank) for the next stage


def _await_handover(shell: RayShell) -> list[str]:
    """The members the driver moved to stage 2 (it records stage 1 first); waits for its word."""
    deadline = time.monotonic() + HANDOVER_WAIT_S
    while True:
        ids = shell._ray.get(shell.board.handed_over.remote(shell.run.plan.name))
        if ids is not None:
            return ids
        if time.monotonic() > deadline:
            raise TimeoutError(f"{shell.run.plan.name}: the driver did not record stage 1 within {HANDOVER_WAIT_S:.0f} s")
        time.sleep(0.05)


def train_pack(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of every PureCC run (one worker per pack): ``{"run": PackRun dict, "board"}``.

    A whole-life run (``PackRun.then``) trains stage 1, waits until the driver has recorded it in the
    ledger (its handover on the board), then trains stage 2 of the members it handed over on the
    same loaded base. Restarted after a failure, it starts at stage 2 when the handover was made.
    """
    run = PackRun.from_dict(config["run"])
    root = Path(run.scratch or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="purecc-run-", dir=root))
    shell = RayShell(run, config["board"], scratch)
    logger = _tensorboard(shell.tensorboard_dir)
    timer, pipe = _Timer(), None
    try:
        handed = shell._ray.get(shell.board.handed_over.remote(run.plan.name)) if run.then else None
        if handed is None:
            pipe = _train_stage(shell, run.plan, root, logger, pipe, timer)
            if run.then is None:
                return
            handed = _await_handover(shell)
        members = tuple(m for m in run.then.members if m.concept_id in set(handed))
        if members:
            plan2 = PackPlan(name=run.then.name, stage=2, base_model=run.then.base_model, members=members,
                             validation=run.then.validation)
            _train_stage(shell, plan2, root, logger, pipe, timer)
    finally:
        if logger is not None:
            logger.close()
        shutil.rmtree(scratch, ignore_errors=True)
