"""Shared pieces of the GPU benchmarks: an SD3.5-Medium-sized transformer with random weights."""

from __future__ import annotations

import torch

# SD3.5 Medium (MMDiT-X): this config builds 2,243,171,520 transformer parameters (bench/RESULTS.md)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm")
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def build_transformer(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """An SD3.5-Medium-sized (or ``tiny``) transformer with random weights from ``seed``, frozen, in eval mode."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        tr = SD3Transformer2DModel(**(TINY if tiny else SD35_MEDIUM))
    return tr.to(dtype).eval().requires_grad_(False)


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak FLOP/s from ``PEAK_BF16``, or None (CPU or an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds per call of ``fn`` over ``repeats`` calls (CUDA-synchronised)."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats
