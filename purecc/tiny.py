"""The embedded tiny SD3-architecture model, built deterministically from a seed.

Same component classes and folder layout as Stable Diffusion 3.5 Medium (``model_index.json`` plus
``transformer``/``vae``/``text_encoder(_2,_3)``/``tokenizer(_2,_3)``/``scheduler`` subfolders), only
small: an MMDiT-X transformer with joint attention, dual-attention (``attn2``) blocks and RMS qk-norm;
a 16-channel VAE with 8x downsampling; two CLIP text encoders; an optional tiny T5. It is loaded with
the same ``from_pretrained(folder)`` call as the real model, so every code path is exercised on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .tokenizer import build_clip_tokenizer, build_t5_tokenizer


@dataclass(frozen=True)
class TinyConfig:
    """Shapes of the tiny model. Defaults: 64 px images -> 8x8 latents -> 16 image tokens."""

    seed: int = 0
    num_layers: int = 3
    dual_attention_layers: tuple[int, ...] = (0, 1)
    heads: int = 4
    head_dim: int = 8
    clip_hidden: int = 32
    clip_layers: int = 2
    vae_channels: tuple[int, ...] = (8, 8, 8, 8)
    sample_size: int = 64            # default image size in pixels
    max_image_size: int = 512        # largest image the position embedding allows
    with_t5: bool = False
    t5_d_model: int = 64
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {self.num_layers}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers: {bad} outside 0..{self.num_layers - 1}")
        if len(self.vae_channels) not in (3, 4):
            raise ValueError("vae_channels: 3 blocks (a 4x VAE) or 4 blocks (8x, as SD3's) are needed, "
                             f"got {len(self.vae_channels)}")
        if self.sample_size % (2 * self.vae_factor):
            raise ValueError(f"sample_size: {self.sample_size} is not a multiple of {2 * self.vae_factor} "
                             "(the VAE's downsampling times the transformer's patch)")

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along a side: 2 ** (VAE blocks - 1)."""
        return 2 ** (len(self.vae_channels) - 1)


def _clip_encoder(cfg: TinyConfig, vocab_size: int, tok) -> CLIPTextModelWithProjection:
    conf = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.clip_hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=cfg.clip_layers, projection_dim=cfg.clip_hidden,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, hidden_act="gelu")
    return CLIPTextModelWithProjection(conf)


def build_tiny_pipeline(cfg: TinyConfig = TinyConfig()) -> StableDiffusion3Pipeline:
    """Build the tiny pipeline in memory (eval mode, fp32) from ``cfg.seed``."""
    tok, tok2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    torch.manual_seed(cfg.seed)
    te1, te2 = _clip_encoder(cfg, len(tok), tok), _clip_encoder(cfg, len(tok2), tok2)
    te3 = tok3 = None
    joint_dim = 2 * cfg.clip_hidden
    if cfg.with_t5:
        tok3 = build_t5_tokenizer()
        te3 = T5EncoderModel(T5Config(
            vocab_size=len(tok3), d_model=cfg.t5_d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False))
        joint_dim = max(joint_dim, cfg.t5_d_model)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * len(cfg.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=4,
        sample_size=cfg.sample_size, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5305)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.sample_size // cfg.vae_factor, patch_size=2, in_channels=16, out_channels=16,
        num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=joint_dim, caption_projection_dim=cfg.heads * cfg.head_dim,
        pooled_projection_dim=2 * cfg.clip_hidden, pos_embed_max_size=cfg.max_image_size // (2 * cfg.vae_factor),
        dual_attention_layers=tuple(cfg.dual_attention_layers), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
        text_encoder_3=te3, tokenizer_3=tok3)
    for module in (transformer, vae, te1, te2, te3):
        if module is not None:
            module.eval()  # built-from-config modules start in train mode
    return pipe


def write_tiny_model(dest: str | Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """Build the tiny pipeline and save it in diffusers format (safetensors) under ``dest``."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"dest: {dest} exists and is not empty; refusing to overwrite it")
    pipe = build_tiny_pipeline(cfg)
    tmp = dest.with_name(f".{dest.name}.partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)  # a half-written model folder never appears under its final name
    return dest
