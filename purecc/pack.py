"""The one pack recipe: how a pack of concepts trains one stage, whoever runs it.

``purecc train`` (``purecc.local_train``) and the Ray Train worker (``cluster/worker.py``) both drive
a ``PackRecipe`` through the same small protocol::

    recipe = PackRecipe(plan, cache_dir=..., extractor=..., on_metrics=..., on_event=...)
    failed = recipe.setup()             # reads each member's data once; bad members fail alone
    recipe.resume(candidates)           # newest valid checkpoint per member, rejections reported
    result = recipe.train(checkpoint_dir=..., on_checkpoint=..., should_stop=...)
    recipe.export(cid, dest); recipe.render_validation(cid, dest / "validation" / "stage1")
    recipe.cleanup()

The recipe holds the method (data checks, the trainer, checkpoints, adapter files, validation
images); a runner adds only where checkpoints come from and go to, how progress is reported, and
where adapters are published. ``PackPlan`` is what a runner hands over: typed, and turned into a
plain dict only at a process boundary (``to_dict``/``from_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from .data import ConceptManifest, load_image, read_concept_manifest
from .fileio import atomic_write_json
from .ids import validate_concept_id, validate_trigger
from .recipe import StageRecipe
from .registry import VALIDATION_PROMPTS
from .trainer import CheckpointError, ConceptJob, PackTrainer, read_checkpoint_state

EventFn = Callable[[str, str, dict], None]          # (concept_id, event, detail)
MetricsFn = Callable[[dict], None]


class PackLogger(Protocol):
    """Experiment logging of a pack (e.g. ``purecc.tb_log.TensorBoardLogger``): optional, write-only."""

    def log_metrics(self, metrics: dict) -> None: ...

    def log_images(self, concept_id: str, stage: int, step: int, images: list[Path], prompts: list[str]) -> None: ...


@dataclass(frozen=True)
class ValidationSettings:
    """How validation images are rendered at the end of a stage."""

    steps: int = 20
    guidance: float = 4.0


@dataclass(frozen=True)
class ConceptPlan:
    """One concept's stage in a pack plan.

    ``data_hash``: when set, the data must still hash to it (it was checked at submission);
    ``key``: identity of the training content, recorded in its checkpoints (another key's are refused);
    ``provenance``: extra fields for the adapter manifest's metrics (batch, content hash).
    """

    concept_id: str
    trigger: str
    manifest: str
    recipe: StageRecipe
    seed: int = 0
    data_hash: str | None = None
    validation_prompts: tuple[str, ...] = ()
    key: str = ""
    provenance: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_concept_id(self.concept_id)
        validate_trigger(self.trigger)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (the recipe as its own dict)."""
        return {"concept_id": self.concept_id, "trigger": self.trigger, "manifest": self.manifest,
                "recipe": self.recipe.to_dict(), "seed": self.seed, "data_hash": self.data_hash,
                "validation_prompts": list(self.validation_prompts), "key": self.key,
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConceptPlan":
        """Inverse of ``to_dict``."""
        return cls(**{**data, "recipe": StageRecipe.from_dict(data["recipe"]),
                      "validation_prompts": tuple(data.get("validation_prompts", ())),
                      "provenance": dict(data.get("provenance", {}))})


@dataclass(frozen=True)
class PackPlan:
    """A pack: concepts of one stage trained together on one base model."""

    name: str
    stage: int
    base_model: str
    members: tuple[ConceptPlan, ...]
    validation: ValidationSettings = ValidationSettings()

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage: {self.stage!r} must be 1 or 2")
        if not self.members:
            raise ValueError("members: a pack needs at least one concept")
        wrong = [m.concept_id for m in self.members if m.recipe.stage != self.stage]
        if wrong:
            raise ValueError(f"members: {wrong} have a recipe of another stage than {self.stage}")

    def member(self, concept_id: str) -> ConceptPlan:
        """The member ``concept_id`` (KeyError if it is not in the pack)."""
        for m in self.members:
            if m.concept_id == concept_id:
                return m
        raise KeyError(concept_id)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields, for a process boundary."""
        return {"name": self.name, "stage": self.stage, "base_model": self.base_model,
                "members": [m.to_dict() for m in self.members],
                "validation": {"steps": self.validation.steps, "guidance": self.validation.guidance}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PackPlan":
        """Inverse of ``to_dict``."""
        return cls(name=data["name"], stage=int(data["stage"]), base_model=data["base_model"],
                   members=tuple(ConceptPlan.from_dict(m) for m in data["members"]),
                   validation=ValidationSettings(**data.get("validation", {})))


def check_concept_data(member: ConceptPlan) -> ConceptManifest:
    """Read the member's manifest once, check it still hashes as submitted and that every image decodes.

    Raises ``ValueError`` naming the manifest, the row and the image.
    """
    manifest = read_concept_manifest(member.manifest, member.trigger)
    if member.data_hash is not None and manifest.content_hash() != member.data_hash:
        raise ValueError(f"{member.manifest}: the data changed since the batch was submitted "
                         "(resubmit with --replace to train on the new data)")
    for i, row in enumerate(manifest.rows):
        try:
            load_image(row.image_path)
        except Exception as exc:  # noqa: BLE001 -- PIL raises OSError, ValueError, SyntaxError...
            raise ValueError(f"{member.manifest}: row {i + 1}: image {row.image_path} cannot be "
                             f"decoded ({type(exc).__name__}: {exc})") from exc
    return manifest


def _tee(first: MetricsFn | None, then: MetricsFn) -> MetricsFn:
    """One metrics callback calling ``first`` (the runner's, if any), then ``then`` (the logger's)."""
    def both(m: dict) -> None:
        if first is not None:
            first(m)
        then(m)
    return both


def _no_event(concept_id: str, event: str, detail: dict) -> None:
    """The default ``on_event``: nothing is recorded."""


class PackRecipe:
    """One stage of one pack, from its plan to exported adapters.

    ``extractor(concept_id)`` returns the local folder of the concept's stage-1 adapter (stage 2 with
    the stage-1 extractor or with embeddings); ``pipe``: an already loaded pipeline without a bank (default: loaded
    from ``plan.base_model`` at ``setup``); ``logger``: optional experiment logging (``PackLogger``:
    every step's metrics and the validation images).
    """

    def __init__(self, plan: PackPlan, *, cache_dir: str | Path | None = None,
                 extractor: Callable[[str], Path] | None = None, on_metrics: MetricsFn | None = None,
                 on_event: EventFn | None = None, pipe=None, logger: PackLogger | None = None):
        self.plan, self.cache_dir, self.extractor = plan, cache_dir, extractor
        self.on_metrics, self.on_event = on_metrics, on_event or _no_event
        self.logger = logger
        if logger is not None:
            self.on_metrics = _tee(on_metrics, logger.log_metrics)
        self.pipe = pipe
        self.trainer: PackTrainer | None = None
        self.members: dict[str, ConceptPlan] = {}

    @property
    def stage(self) -> int:
        """The stage this pack trains."""
        return self.plan.stage

    # ----- setup -------------------------------------------------------------------------------
    def setup(self) -> dict[str, str]:
        """Check every member's data (and stage-1 adapter), load the base and set up the trainer.

        A member whose data or stage-1 adapter cannot be used is left out; returns those as
        ``{concept_id: error}`` (the rest of the pack trains). Nothing is loaded when all fail.
        """
        failed: dict[str, str] = {}
        jobs = []
        for m in self.plan.members:
            try:
                data = check_concept_data(m)
            except Exception as exc:  # noqa: BLE001 -- any data problem fails this concept only
                failed[m.concept_id] = f"data error: {type(exc).__name__}: {exc}"
                continue
            try:
                ext = self._extractor_of(m)
            except (OSError, ValueError) as exc:
                failed[m.concept_id] = f"stage-1 adapter error: {type(exc).__name__}: {exc}"
                continue
            jobs.append(ConceptJob(m.concept_id, m.trigger, data, m.recipe, seed=m.seed,
                                   extractor_adapter=ext, key=m.key))
            self.members[m.concept_id] = m
        if jobs:
            if self.pipe is None:
                from .model import ModelConfig, load_pipeline

                self.pipe = load_pipeline(ModelConfig(path=self.plan.base_model))
            self.trainer = PackTrainer(self.pipe, jobs, cache_dir=self.cache_dir, on_metrics=self.on_metrics)
            self.trainer.setup()
        return failed

    def _extractor_of(self, member: ConceptPlan) -> Path | None:
        rec = member.recipe
        if self.stage != 2 or (rec.extractor != "stage1" and rec.embeddings == "none"):
            return None
        if self.extractor is None:
            raise ValueError(f"{member.concept_id}: stage 2 with the stage-1 extractor or with embeddings "
                             "needs its stage-1 adapter")
        return Path(self.extractor(member.concept_id))

    def _trainer(self) -> PackTrainer:
        if self.trainer is None:
            raise RuntimeError("pack recipe: call setup() first (and check that a member is left)")
        return self.trainer

    # ----- checkpoints -------------------------------------------------------------------------
    def resume(self, candidates: Mapping[str, Iterable[Path]]) -> dict[str, int]:
        """Load each member's newest usable checkpoint among ``candidates[concept_id]``.

        Folders that do not exist are skipped; every other one that cannot be used (damaged,
        another stage, seed, base or content key) is reported as a ``checkpoint-rejected`` event and
        the next newest is tried. Returns ``{concept_id: step}`` of the members resumed (each also
        reported as a ``resumed`` event).
        """
        trainer, resumed = self._trainer(), {}
        for cid in self.members:
            ranked = []
            for folder in candidates.get(cid, ()):
                folder = Path(folder)
                if not folder.exists():
                    continue
                try:
                    ranked.append((int(read_checkpoint_state(folder)["step"]), folder))
                except (OSError, ValueError, KeyError) as exc:   # damaged: its hashes do not match
                    self._rejected(cid, folder, exc)
            for _, folder in sorted(ranked, key=lambda t: -t[0]):
                try:
                    step = trainer.load_checkpoint(cid, folder)
                except CheckpointError as exc:
                    self._rejected(cid, folder, exc)
                    continue
                resumed[cid] = step
                self.on_event(cid, "resumed", {"stage": self.stage, "step": step})
                break
        return resumed

    def _rejected(self, cid: str, folder: Path, exc: Exception) -> None:
        """A ``checkpoint-rejected`` event: which checkpoint (its last two path components) and why."""
        label = f"{folder.parent.name}/{folder.name}"
        reason = f"{type(exc).__name__}: {exc}".replace(str(folder), label)
        self.on_event(cid, "checkpoint-rejected", {"checkpoint": label, "reason": reason})

    def save_checkpoint(self, concept_id: str, folder: str | Path) -> Path:
        """Write one member's checkpoint into ``folder``."""
        return self._trainer().save_checkpoint(concept_id, folder)

    # ----- training ----------------------------------------------------------------------------
    def train(self, *, checkpoint_dir: Callable[[str], Path],
              on_checkpoint: Callable[[list[str]], None] | None = None,
              should_stop: Callable[[], Iterable[str]] | None = None) -> dict[str, dict]:
        """Train every member to its step count; per-member summaries (``status`` "done" or "stopped")."""
        return self._trainer().train(checkpoint_dir=checkpoint_dir, on_checkpoint=on_checkpoint,
                                     should_stop=should_stop)

    # ----- results -----------------------------------------------------------------------------
    def export(self, concept_id: str, dest: str | Path) -> Path:
        """The member's adapter files in ``dest``, with its provenance in the manifest's metrics."""
        return self._trainer().export(concept_id, dest, metrics=dict(self.members[concept_id].provenance))

    def render_validation(self, concept_id: str, dest: str | Path) -> list[Path]:
        """The member's validation prompts ([v] -> trigger) rendered with its slot, as PNGs in ``dest``
        (``00.png``, ``01.png``, ...) with ``prompts.json`` saying what each shows."""
        from .generate import RenderSettings, Sample, generate, save_png

        trainer, m = self._trainer(), self.members[concept_id]
        prompts = [p.replace("[v]", m.trigger) for p in m.validation_prompts]
        if not prompts:
            return []
        samples = [Sample(p, seed=m.seed + i, concepts=((concept_id, 1.0),)) for i, p in enumerate(prompts)]
        res = m.recipe.resolution
        settings = RenderSettings(steps=self.plan.validation.steps, guidance=self.plan.validation.guidance,
                                  width=res, height=res)
        images = generate(trainer.pipe, samples, {concept_id: trainer.slot_of(concept_id)}, settings)
        paths = [save_png(img, Path(dest) / f"{i:02d}.png") for i, img in enumerate(images)]
        # what each image shows, for the readers of a published adapter (the service's page lists them)
        atomic_write_json(Path(dest) / VALIDATION_PROMPTS,
                          {"prompts": prompts, "seeds": [s.seed for s in samples], "steps": settings.steps,
                           "guidance": settings.guidance, "step": trainer.summary(concept_id)["step"]})
        if self.logger is not None:
            self.logger.log_images(concept_id, self.stage, trainer.summary(concept_id)["step"], paths, prompts)
        return paths

    def cleanup(self) -> None:
        """Drop the trainer and the pipeline (their memory goes back to the process)."""
        self.trainer, self.pipe = None, None
