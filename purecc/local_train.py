"""``purecc train``: one pack of concepts through stage 1 and/or 2 in this process, with a progress bar.

The local runner of ``purecc.pack.PackRecipe``: checkpoints live in ``<out>/<id>/ckpt-stage<n>`` (a
rerun resumes from them), adapters are exported to ``<out>/<id>/stage<n>`` with their validation
images in ``<out>/<id>/stage<n>/validation/stage<n>/``, images rendered during a stage (every
``validation_every`` steps) in ``<out>/<id>/validation/stage<n>/step-<step>/``, and stage 2 reads
its extractor from ``<out>/<id>/stage1``. With a logger (``purecc.tb_log``), TensorBoard event
files go to ``<out>/tensorboard/<id>/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

from .pack import ConceptPlan, PackLogger, PackPlan, PackRecipe, ValidationSettings
from .recipe import StageRecipe, stage_recipe


class _StepHook:
    """The metrics callback of one stage: moves the bar once every member reported a step, and renders
    the validation prompts every ``every`` steps (not at the last step: the end of the stage does)."""

    def __init__(self, bar: tqdm, k: int, every: int, out: Path):
        self.bar, self.k, self.every, self.out = bar, k, every, out
        self.losses: dict[str, float] = {}
        self.seen: dict[int, set[str]] = {}
        self.pack: PackRecipe | None = None

    def __call__(self, m: dict) -> None:
        self.losses[m["concept_id"]] = m["loss"]
        if len(self.losses) == self.k or m["step"] == 1:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{sum(self.losses.values()) / len(self.losses):.4f}")
        step, cid = int(m["step"]), m["concept_id"]
        if self.every and self.pack is not None and step % self.every == 0 and step < int(m["total"]):
            self.pack.render_validation(cid, self.out / cid / "validation" / f"stage{m['stage']}" / f"step-{step:06d}")


def stage_recipe_for(stage: int, *, steps: int | None = None, overrides: dict | None = None,
                     extractor: str | None = None, lambda_mode: str | None = None) -> StageRecipe:
    """The recipe of ``stage``: the default one, with the given overrides (None: the recipe default)."""
    extra = dict(overrides or {})
    if steps:
        extra["steps"] = steps
    if stage == 2:
        extra.update({k: v for k, v in (("extractor", extractor), ("lambda_mode", lambda_mode)) if v is not None})
    return stage_recipe(stage, **extra)


def local_plan(model: str, concepts: Sequence[tuple[str, str, str]], recipe: StageRecipe, *,
               seed: int = 0, validation_prompts: Sequence[str] = (),
               validation: ValidationSettings = ValidationSettings()) -> PackPlan:
    """The pack plan of ``concepts`` (id, trigger, manifest) for one stage."""
    members = tuple(ConceptPlan(cid, trig, str(man), recipe, seed=seed, validation_prompts=tuple(validation_prompts))
                    for cid, trig, man in concepts)
    return PackPlan(name=f"local-s{recipe.stage}", stage=recipe.stage, base_model=model, members=members,
                    validation=validation)


def train_concepts(*, model: str, concepts: Sequence[tuple[str, str, str]], out: Path,
                   stages: Sequence[int] = (1, 2), steps: dict | None = None, overrides: dict | None = None,
                   extractor: str | None = None, lambda_mode: str | None = None, seed: int = 0,
                   progress: bool = True, pipe=None, recipes: Mapping[int, StageRecipe] | None = None,
                   validation_prompts: Sequence[str] = (), validation_every: int = 0,
                   validation: ValidationSettings = ValidationSettings(),
                   logger: PackLogger | None = None) -> list[str]:
    """Train ``concepts`` (id, trigger, manifest) as one pack; adapters go to ``out/<id>/stage<n>``.

    ``recipes`` (stage -> recipe, e.g. from ``RecipeFields.stage``) replace the ones built from
    ``steps``/``overrides``/``extractor``/``lambda_mode``. A stage whose checkpoint folder holds a
    finished or partial run resumes from it. ``pipe``: a loaded pipeline to use when a single stage
    is trained (a bank is attached once per model). Returns one summary line per concept and stage.
    """
    steps, out = steps or {}, Path(out)
    lines, failed_ids = [], set()
    for stage in stages:
        recipe = (recipes[stage] if recipes else
                  stage_recipe_for(stage, steps=steps.get(stage), overrides=overrides, extractor=extractor,
                                   lambda_mode=lambda_mode))
        concepts = [c for c in concepts if c[0] not in failed_ids]   # a concept that failed stops there
        if not concepts:
            break
        plan = local_plan(model, concepts, recipe, seed=seed, validation_prompts=validation_prompts,
                          validation=validation)
        with tqdm(total=recipe.steps, desc=f"stage {stage} ({len(plan.members)} concepts)",
                  disable=not progress, unit="step") as bar:
            hook = _StepHook(bar, len(plan.members), validation_every if validation_prompts else 0, out)
            pack = PackRecipe(plan, cache_dir=out / ".latents", extractor=lambda cid: out / cid / "stage1",
                              on_metrics=hook, pipe=pipe if len(stages) == 1 else None, logger=logger)
            hook.pack = pack
            failed = pack.setup()
            if failed:
                raise ValueError("; ".join(f"{cid}: {why}" for cid, why in failed.items()))
            resumed = pack.resume({cid: [out / cid / f"ckpt-stage{stage}"] for cid in pack.members})
            bar.update(max(resumed.values(), default=0))
            result = pack.train(checkpoint_dir=lambda cid, st=stage: out / cid / f"ckpt-stage{st}")
            for cid, summary in result.items():
                if summary["status"] == "failed":
                    failed_ids.add(cid)
                    lines.append(f"{cid} stage {stage}: FAILED at step {summary['step']}: {summary['error']}")
                    continue
                dest = pack.export(cid, out / cid / f"stage{stage}")
                rendered = pack.render_validation(cid, dest / "validation" / f"stage{stage}")
                lines.append(f"{cid} stage {stage}: {summary['step']} steps, last-10 loss "
                             f"{summary['loss_last10']:.4f} -> {dest}"
                             + (f" ({len(rendered)} validation images)" if rendered else ""))
            pack.cleanup()
    return lines
