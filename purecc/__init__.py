"""purecc: PureCC concept customisation for SD3/SD3.5 (the method; no Ray in this package).

What lives where:
  model / tiny / tokenizer       the base: any local diffusers SD3/SD3.5 folder, and the embedded tiny model
  data                           concept manifests (CSV/Parquet), image checks, preprocessing, cached latents
  bank                           the per-sample adapter bank: LoRA slots on every target Linear, routed per sample
  losses / slot_optim / recipe   flow matching and the stage-1/stage-2 losses, per-slot AdamW, validated recipes
  trainer                        the pack trainer: several concepts on one frozen base, one slot each
  pack / local_train             the one pack recipe (plan -> trained, exported adapters) and its local runner
  adapter_files / registry       PEFT / diffusers files with a hashed manifest; the published-adapter registry
  generate / local_generate      generation with per-sample concept sets (composition)
  eval/                          the paper's CLIP-T / CLIP-I / DINO metrics (local model folders)
  testbed/                       the synthetic world that makes quality measurable: world, world base and its
                                 pretraining, sample concepts, the world reader and metrics, their assets
  cli                            the ``purecc`` command (cluster/ and services/ add theirs as plugins)

The method never imports ``testbed/``; the testbed and everything else import the method.
"""

__version__ = "0.1.0"
