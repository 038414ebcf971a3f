"""Train one pack of concepts through stage 1 and/or 2 in this process, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from .model import ModelConfig, load_pipeline
from .recipe import stage_recipe
from .trainer import ConceptJob, PackTrainer, read_checkpoint_state


def _progress_callback(bar: tqdm, k: int):
    losses: dict[str, float] = {}

    def on_metrics(m: dict) -> None:
        losses[m["concept_id"]] = m["loss"]
        if len(losses) == k or m["step"] == 1:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.4f}")
    return on_metrics


def train_concepts(*, model: str, concepts: Sequence[tuple[str, str, str]], out: Path,
                   stages: Sequence[int] = (1, 2), steps: dict | None = None, overrides: dict | None = None,
                   extractor: str = "stage1", lambda_mode: str = "fixed", seed: int = 0,
                   progress: bool = True, pipe=None) -> list[str]:
    """Train ``concepts`` (id, trigger, manifest) as one pack; adapters go to ``out/<id>/stage<n>``.

    A stage whose checkpoint folder holds a finished or partial run resumes from it.
    Returns one summary line per concept and stage.
    """
    steps, overrides = steps or {}, overrides or {}
    lines = []
    for stage in stages:
        extra = dict(overrides)
        if steps.get(stage):
            extra["steps"] = steps[stage]
        if stage == 2:
            extra.update(extractor=extractor, lambda_mode=lambda_mode)
        recipe = stage_recipe(stage, **extra)
        jobs = [ConceptJob(cid, trig, Path(man), recipe, seed=seed,
                           extractor_adapter=(out / cid / "stage1") if stage == 2 and extractor == "stage1" else None)
                for cid, trig, man in concepts]
        # each stage gets a fresh model: a bank is attached once per loaded model
        stage_pipe = pipe if pipe is not None and len(stages) == 1 else load_pipeline(ModelConfig(path=model))
        with tqdm(total=recipe.steps, desc=f"stage {stage} ({len(jobs)} concepts)", disable=not progress,
                  unit="step") as bar:
            trainer = PackTrainer(stage_pipe, jobs, cache_dir=out / ".latents",
                                  on_metrics=_progress_callback(bar, len(jobs)))
            trainer.setup()
            for job in jobs:
                ckpt = out / job.concept_id / f"ckpt-stage{stage}"
                if (ckpt / "state.json").is_file() and read_checkpoint_state(ckpt)["seed"] == seed:
                    bar.update(trainer.load_checkpoint(job.concept_id, ckpt) - bar.n)
            result = trainer.train(checkpoint_dir=lambda cid, st=stage: out / cid / f"ckpt-stage{st}")
        for job in jobs:
            dest = trainer.export(job.concept_id, out / job.concept_id / f"stage{stage}")
            s = result[job.concept_id]
            lines.append(f"{job.concept_id} stage {stage}: {s['step']} steps, last-10 loss "
                         f"{s['loss_last10']:.4f} -> {dest}")
    return lines
