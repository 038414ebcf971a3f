"""``purecc generate`` on a local model folder: adapters from folders, PNGs to an output folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .generate import (LoadedConcepts, RenderSettings, Sample, fill_placeholders, generate, load_concepts, save_png,
                       trained_sequence_length)
from .model import ModelConfig, load_pipeline

MAX_IMAGES = 16


def generate_cli(args: argparse.Namespace) -> int:
    """Run ``purecc generate`` without ``--url``: load the model and adapters, write one PNG per image."""
    if not args.model:
        raise ValueError("--model: a local model folder is required (or --url for a running service)")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images: {args.num_images} outside 1..{MAX_IMAGES}")
    pipe = load_pipeline(ModelConfig(path=args.model))
    folders = [str(name) for name, _ in args.concept]
    loaded = load_concepts(pipe, folders) if folders else LoadedConcepts()
    # routed by folder, not concept id: two folders of one id (its stage1 and stage2) keep their own weights
    weights = tuple((str(folder), w) for folder, w in args.concept)
    prompt = fill_placeholders(args.prompt, loaded.triggers)
    samples = [Sample(prompt, args.seed + i, weights, args.negative_prompt) for i in range(args.num_images)]
    settings = RenderSettings(steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                              max_sequence_length=trained_sequence_length(loaded.manifests.values()))
    images = generate(pipe, samples, loaded.slot_of_folder, settings)
    out = Path(args.out)
    for i, img in enumerate(images):
        print(save_png(img, out / f"image_{args.seed + i}.png"))
    return 0
