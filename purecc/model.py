"""Load any local diffusers-format SD3/SD3.5 folder, offline, with T5 optional."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .offline import force_offline, quiet_libraries

SD3_PIPELINES = {"StableDiffusion3Pipeline"}
REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelFolderError(ValueError):
    """The model folder is missing or is not a diffusers SD3 pipeline."""


@dataclass(frozen=True)
class ModelConfig:
    """Where the base model lives and how to place it.

    dtype: ``auto`` = bfloat16 on CUDA, float32 on CPU. device: ``auto`` = cuda if available.
    load_t5: False drops T5 (as SD3 users do to save memory); a folder without T5 never loads it.
    """

    path: str
    dtype: str = "auto"
    device: str = "auto"
    load_t5: bool = True

    def resolved_device(self) -> torch.device:
        """The device to load onto (``auto``: cuda when available, else cpu)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        """The torch dtype to load in (``auto``: bfloat16 on CUDA, float32 on CPU)."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


def read_model_index(path: str | Path) -> dict:
    """Validate that ``path`` is a local SD3 pipeline folder and return its model_index.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model path: {folder} does not exist or is not a folder "
                               "(expected a local diffusers-format SD3/SD3.5 folder; nothing is downloaded)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelFolderError(f"model path: {folder} has no model_index.json; not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"model path: {index_file} is not valid JSON ({exc})") from exc
    cls = index.get("_class_name")
    if cls not in SD3_PIPELINES:
        raise ModelFolderError(f"model path: {folder} holds a {cls!r} pipeline, not an SD3/SD3.5 one "
                               f"(expected _class_name in {sorted(SD3_PIPELINES)})")
    missing = [c for c in REQUIRED if not (isinstance(index.get(c), list) and index[c][0] and (folder / c).is_dir())]
    if missing:
        raise ModelFolderError(f"model path: {folder} lacks SD3 components {missing}")
    return index


def has_t5(index: dict, folder: str | Path) -> bool:
    """Whether the model folder lists and holds a T5 text encoder (``text_encoder_3``)."""
    entry = index.get("text_encoder_3")
    return bool(isinstance(entry, list) and entry[0] and (Path(folder) / "text_encoder_3").is_dir())


def load_pipeline(cfg: ModelConfig | str, *, progress: bool = False):
    """Load the pipeline onto the configured device/dtype. Never touches the network."""
    force_offline()
    quiet_libraries()
    cfg = ModelConfig(path=str(cfg)) if isinstance(cfg, (str, Path)) else cfg
    index = read_model_index(cfg.path)
    from diffusers import StableDiffusion3Pipeline

    kwargs: dict = {"dtype": cfg.resolved_dtype(), "local_files_only": True}
    if not (cfg.load_t5 and has_t5(index, cfg.path)):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(cfg.path, **kwargs)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(cfg.resolved_device())


def base_fingerprint(transformer: torch.nn.Module) -> str:
    """A cheap identity of the base transformer: its config plus a hash of a few weight tensors.

    Adapters record it so that a load onto a different base is refused.
    """
    return module_fingerprint(transformer)


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a diffusers model (transformer, VAE): its config and a few weight tensors."""
    h = hashlib.sha256(json.dumps(dict(getattr(module, "config", {})), sort_keys=True, default=str).encode())
    # ".base." is stripped so that the fingerprint is the same before and after a bank is attached
    params = [(n.replace(".base.", "."), p) for n, p in module.named_parameters()]
    for name, p in (params[0], params[len(params) // 2], params[-1]):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()[: 1 << 16])
    return h.hexdigest()[:32]
