"""purecc: PureCC concept customisation for SD3/SD3.5 (the method; no Ray in this package).

Layout (one concern per module):
  tokenizer / tiny   the embedded tiny SD3-architecture model and its own BPE tokenizer
  model              loading any local diffusers-format SD3/SD3.5 folder, offline
  data               concept manifests, preprocessing, cached latents
  bank               the per-sample adapter bank (module surgery + routing)
  adapter_files      PEFT / diffusers adapter files and manifests
  flow / losses      flow-matching sampling and the stage-1 / stage-2 losses
  trainer            the pack trainer (setup / load_checkpoint / train / save_checkpoint)
  generate           generation with per-sample concept sets
  registry           the adapter registry (local folder or pyarrow.fs URI)
"""

__version__ = "0.1.0"
