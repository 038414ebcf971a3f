"""The ``purecc`` command line.

Core commands live here (tiny-model, train, generate). ``cluster`` and ``services`` add theirs as
plugins through the ``purecc.commands`` entry-point group, so this package never imports them
(nor Ray). ``generate --url`` reaches the HTTP client through the ``purecc.clients`` group.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .recipe import EMBEDDING_FORMS, LAMBDA_MODES


def _tiny_model(args: argparse.Namespace) -> int:
    from .tiny import TinyConfig, write_tiny_model

    path = write_tiny_model(args.dir, TinyConfig(seed=args.seed, with_t5=args.t5))
    print(f"wrote tiny SD3-architecture pipeline to {path}")
    return 0


def _concept_weight(spec: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:WEIGHT`` (weight in [-2, 2])."""
    name, _, weight = spec.rpartition(":") if ":" in spec else (spec, "", "1.0")
    try:
        w = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concept: weight {weight!r} of {spec!r} is not a number") from None
    if not -2.0 <= w <= 2.0:
        raise argparse.ArgumentTypeError(f"--concept: weight {w} of {spec!r} is outside [-2, 2]")
    return name, w


def _recipe_flags(args: argparse.Namespace) -> list[tuple[list[str], object]]:
    """The named ``train`` flags as recipe fields (only those given; ``--set`` is applied after them)."""
    pairs = [(["stage1", "steps"], args.steps1), (["stage2", "steps"], args.steps2),
             (["resolution"], args.resolution), (["extractor"], args.extractor),
             (["lambda_mode"], args.lambda_mode), (["embeddings"], args.embeddings), (["seed"], args.seed),
             (["stage1", "checkpoint_every"], args.checkpoint_every),
             (["stage2", "checkpoint_every"], args.checkpoint_every),
             (["validation", "prompts"], args.validation_prompt or None)]
    return [(keys, value) for keys, value in pairs if value is not None]


def _train(args: argparse.Namespace) -> int:
    import yaml

    from .local_train import train_concepts
    from .pack import ValidationSettings
    from .recipe_overrides import build_recipe

    recipe = build_recipe(args.recipe, args.set, _recipe_flags(args))
    if args.show_recipe:
        print(yaml.safe_dump(recipe.effective(), sort_keys=False), end="")
        return 0
    for flag, value in (("--model", args.model), ("--concept", args.concept), ("--out", args.out)):
        if not value:
            raise ValueError(f"{flag}: required to train (only --show-recipe runs without it)")
    stages = (1, 2) if args.stage == "both" else (int(args.stage),)
    logger = None
    if args.tensorboard:
        from .tb_log import TensorBoardLogger

        logger = TensorBoardLogger(Path(args.out) / "tensorboard")
    v = recipe.validation
    try:
        summary = train_concepts(
            model=args.model, concepts=[tuple(c) for c in args.concept], out=Path(args.out), stages=stages,
            recipes={s: recipe.stage(s) for s in stages}, seed=recipe.seed, progress=not args.quiet,
            validation_prompts=v.prompts, validation_every=v.every,
            validation=ValidationSettings(steps=v.steps, guidance=v.guidance), logger=logger)
    finally:
        if logger is not None:
            logger.close()
    for line in summary:
        print(line)
    return 0


def _import(args: argparse.Namespace) -> int:
    from .lora_import import import_and_publish

    where = import_and_publish(args.source, concept_id=args.id, trigger=args.trigger, model=args.model,
                               storage=args.storage, rank=args.rank, alpha=args.alpha)
    print(f"imported {args.source} as concept {args.id} -> {where}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.url:
        (client,) = [ep for ep in entry_points(group="purecc.clients") if ep.name == "http"]
        return client.load()(args)
    from .local_generate import generate_cli

    return generate_cli(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``purecc`` argument parser, plus the subcommands that ``purecc.commands`` entry points add."""
    parser = argparse.ArgumentParser(prog="purecc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write the embedded tiny SD3-architecture model to DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t5", action="store_true", help="include a tiny T5 text encoder")
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("train", help="train concepts (stage 1, 2 or both) in one pack, in this process",
                       description="Train concepts in this process. Any recipe field can be set: "
                                   "--recipe FILE.yaml, then the named flags, then each --set in order.")
    p.add_argument("--model", help="local diffusers SD3/SD3.5 folder")
    p.add_argument("--concept", nargs=3, action="append", metavar=("ID", "TRIGGER", "MANIFEST"))
    p.add_argument("--stage", choices=("1", "2", "both"), default="both")
    p.add_argument("--out", help="output folder: <out>/<id>/stage{1,2}/ adapters")
    p.add_argument("--recipe", metavar="FILE.yaml", help="a recipe file (fields as `--show-recipe` prints them)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any recipe field, dotted, value as YAML (repeatable): --set stage1.lr=1e-4")
    p.add_argument("--show-recipe", action="store_true", help="print the effective recipe and exit")
    p.add_argument("--steps1", type=int, default=None, help="stage-1 steps (default 1000)")
    p.add_argument("--steps2", type=int, default=None, help="stage-2 steps (default 800)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--extractor", choices=("stage1", "base"), default=None)
    p.add_argument("--lambda-mode", choices=LAMBDA_MODES, default=None,
                   help="stage 2: how lambda* is chosen (purecc/losses.py: LAMBDA_MODES)")
    p.add_argument("--embeddings", choices=EMBEDDING_FORMS, default=None,
                   help="concept embeddings: layerwise learns one vector per transformer block at the trigger, "
                        "clip-token one token for CLIP-L and CLIP-G")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--validation-prompt", action="append", metavar="PROMPT",
                   help="rendered at the end of each stage ([v] becomes the trigger; repeatable)")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard event files in <out>/tensorboard")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("import", help="register a LoRA trained elsewhere (diffusers file or PEFT folder) as a "
                                      "concept")
    p.add_argument("source", help="pytorch_lora_weights.safetensors (or its folder), or a PEFT adapter folder")
    p.add_argument("--id", required=True, help="concept id to publish it as")
    p.add_argument("--trigger", required=True, help="the trigger word the LoRA was trained with")
    p.add_argument("--model", required=True, help="the base model folder the LoRA was trained on")
    p.add_argument("--storage", required=True, help="registry root (folder or s3:// URI) to publish into")
    p.add_argument("--rank", type=int, default=4, help="the serving bank's LoRA rank (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="the serving bank's alpha (default: its rank)")
    p.set_defaults(func=_import)

    p = sub.add_parser("generate", help="generate images with concepts (local model or --url service)")
    p.add_argument("--model", help="local diffusers SD3/SD3.5 folder (local mode)")
    p.add_argument("--url", help="base URL of a purecc service, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help="the service's bearer token (--url); default $PURECC_TOKEN, "
                                                 "which keeps it out of the process list")
    p.add_argument("--concept", type=_concept_weight, action="append", default=[],
                   metavar="ADAPTER[:WEIGHT]", help="adapter folder (local) or concept id (--url)")
    p.add_argument("--prompt", required=True, help="prompt; <concept_id> becomes that concept's trigger")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--out", default="generated", help="folder for the PNGs")
    p.set_defaults(func=_generate)

    for ep in entry_points(group="purecc.commands"):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``purecc`` CLI; returns the exit status (2 for a refused input, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
