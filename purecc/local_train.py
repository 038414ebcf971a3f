"""``purecc train``: one pack of concepts through stage 1 and/or 2 in this process, with a progress bar.

The local runner of ``purecc.pack.PackRecipe``: checkpoints live in ``<out>/<id>/ckpt-stage<n>`` (a
rerun resumes from them), adapters are exported to ``<out>/<id>/stage<n>``, and stage 2 reads its
extractor from ``<out>/<id>/stage1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from .pack import ConceptPlan, PackPlan, PackRecipe
from .recipe import StageRecipe, stage_recipe


def _progress(bar: tqdm, k: int) -> Callable[[dict], None]:
    """A metrics callback moving ``bar`` one step once every member of the pack reported that step."""
    losses: dict[str, float] = {}

    def on_metrics(m: dict) -> None:
        losses[m["concept_id"]] = m["loss"]
        if len(losses) == k or m["step"] == 1:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.4f}")
    return on_metrics


def stage_recipe_for(stage: int, *, steps: int | None = None, overrides: dict | None = None,
                     extractor: str = "stage1", lambda_mode: str = "fixed") -> StageRecipe:
    """The recipe ``purecc train`` uses for ``stage``: the seed's, with the command line's overrides."""
    extra = dict(overrides or {})
    if steps:
        extra["steps"] = steps
    if stage == 2:
        extra.update(extractor=extractor, lambda_mode=lambda_mode)
    return stage_recipe(stage, **extra)


def local_plan(model: str, concepts: Sequence[tuple[str, str, str]], recipe: StageRecipe, *,
               seed: int = 0) -> PackPlan:
    """The pack plan of ``concepts`` (id, trigger, manifest) for one stage."""
    members = tuple(ConceptPlan(cid, trig, str(man), recipe, seed=seed) for cid, trig, man in concepts)
    return PackPlan(name=f"local-s{recipe.stage}", stage=recipe.stage, base_model=model, members=members)


def train_concepts(*, model: str, concepts: Sequence[tuple[str, str, str]], out: Path,
                   stages: Sequence[int] = (1, 2), steps: dict | None = None, overrides: dict | None = None,
                   extractor: str = "stage1", lambda_mode: str = "fixed", seed: int = 0,
                   progress: bool = True, pipe=None) -> list[str]:
    """Train ``concepts`` (id, trigger, manifest) as one pack; adapters go to ``out/<id>/stage<n>``.

    A stage whose checkpoint folder holds a finished or partial run resumes from it. ``pipe``: a
    loaded pipeline to use when a single stage is trained (a bank is attached once per model).
    Returns one summary line per concept and stage.
    """
    steps, out = steps or {}, Path(out)
    lines, failed_ids = [], set()
    for stage in stages:
        recipe = stage_recipe_for(stage, steps=steps.get(stage), overrides=overrides, extractor=extractor,
                                  lambda_mode=lambda_mode)
        concepts = [c for c in concepts if c[0] not in failed_ids]   # a concept that failed stops there
        if not concepts:
            break
        plan = local_plan(model, concepts, recipe, seed=seed)
        with tqdm(total=recipe.steps, desc=f"stage {stage} ({len(plan.members)} concepts)",
                  disable=not progress, unit="step") as bar:
            pack = PackRecipe(plan, cache_dir=out / ".latents", extractor=lambda cid: out / cid / "stage1",
                              on_metrics=_progress(bar, len(plan.members)),
                              pipe=pipe if len(stages) == 1 else None)
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
                lines.append(f"{cid} stage {stage}: {summary['step']} steps, last-10 loss "
                             f"{summary['loss_last10']:.4f} -> {dest}")
            pack.cleanup()
    return lines
