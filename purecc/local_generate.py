"""``purecc generate`` on a local model folder: adapters from folders, PNGs to an output folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .generate import RenderSettings, Sample, fill_placeholders, generate, load_concepts, save_png
from .model import ModelConfig, load_pipeline

MAX_IMAGES = 16


def generate_cli(args: argparse.Namespace) -> int:
    if not args.model:
        raise ValueError("--model: a local model folder is required (or --url for a running service)")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images: {args.num_images} outside 1..{MAX_IMAGES}")
    pipe = load_pipeline(ModelConfig(path=args.model))
    folders = [name for name, _ in args.concept]
    loaded = load_concepts(pipe, folders) if folders else None
    ids = list(loaded.slot_of) if loaded else []
    weights = tuple((cid, w) for cid, (_, w) in zip(ids, args.concept))
    prompt = fill_placeholders(args.prompt, loaded.triggers if loaded else {})
    samples = [Sample(prompt, args.seed + i, weights, args.negative_prompt) for i in range(args.num_images)]
    settings = RenderSettings(steps=args.steps, guidance=args.guidance, width=args.width, height=args.height)
    images = generate(pipe, samples, loaded.slot_of if loaded else {}, settings)
    out = Path(args.out)
    for i, img in enumerate(images):
        print(save_png(img, out / f"image_{args.seed + i}.png"))
    return 0
