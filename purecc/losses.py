"""Flow matching and the two PureCC losses (README: the method in one paragraph), as pure tensor functions.

Shapes: latents ``x0``/``eps``/velocities are (B, C, H, W); ``sigma`` is (B,). Every loss is
returned per sample (B,) = the mean over C, H, W of the squared error; the caller averages.
"""

from __future__ import annotations

import hashlib

import torch

from .recipe import LAMBDA_MODES


def rng_for(seed: int, *tags: object) -> torch.Generator:
    """A CPU generator keyed by (seed, tags): every concept, step and micro-step has its own stream,
    so training is reproducible in any pack and resumable from a step count alone."""
    digest = hashlib.sha256(repr((seed,) + tags).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def shifted_sigmas_table(scheduler) -> torch.Tensor:
    """The scheduler's training sigma table (descending, shift applied): ``sigma = s*k / (1 + (k-1)*s)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    train = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return train.sigmas[: train.config.num_train_timesteps].clone().float()


def sample_sigma(table: torch.Tensor, batch: int, generator: torch.Generator,
                 logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Logit-normal ``u = sigmoid(n)``, looked up in the shifted table as the stock SD3 recipe does."""
    u = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    idx = (u * len(table)).long().clamp_(0, len(table) - 1)
    return table[idx]


def noisy_latents(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching interpolation ``x_t = (1 - sigma) * x0 + sigma * eps`` (B, C, H, W)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * eps


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32: (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def stage1_loss(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor,
                x_t: torch.Tensor, precondition: bool) -> torch.Tensor:
    """DreamBooth flow-matching loss. With ``precondition`` the model output is turned into an x0
    estimate (``x_t - sigma * v``) and compared to x0: the velocity loss weighted by sigma^2."""
    if precondition:
        s = sigma.view(-1, *([1] * (v.dim() - 1))).to(v.dtype)
        return per_sample_mse(x_t - s * v, x0)
    return per_sample_mse(v, eps - x0)


def _projection(delta: torch.Tensor, r: torch.Tensor, lambda_max: float, lambda_min: float = 0.0) -> torch.Tensor:
    """Per sample ``<delta, R> / (||R||^2 + 1e-6)`` clamped to [lambda_min, lambda_max], with no gradient."""
    with torch.no_grad():
        num = (delta.float() * r.float()).flatten(1).sum(1)
        den = r.float().pow(2).flatten(1).sum(1) + 1e-6
        return (num / den).clamp(lambda_min, lambda_max)


def adaptive_lambda(target: torch.Tensor, v_base: torch.Tensor, r: torch.Tensor,
                    lambda_max: float, lambda_min: float = 0.0) -> torch.Tensor:
    """Candidate (A): least squares of the noisy target, ``<target - v_base, R> / (||R||^2 + 1e-6)``
    clamped to [lambda_min, lambda_max], with no gradient."""
    return _projection(target - v_base, r, lambda_max, lambda_min)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of two (B, ...) tensors (0 where either is zero), with no gradient."""
    with torch.no_grad():
        a, b = a.float().flatten(1), b.float().flatten(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


# How lambda* is chosen per sample (METHOD.md; the paper says "derived from projection error" only):
# fixed: the recipe's lambda_value (the public code: 1); adaptive: (A) above; increment: (B) the
# projection of the trainable model's own concept increment, sg(<v_full - v_base, R> / ||R||^2);
# extractor: (C) the extractor's concept increment, <r_prompt - r_base, R> / ||R||^2, which costs two
# more extractor passes (on prompt and base_prompt). (A)-(C) are clamped to [lambda_min, lambda_max]: the
# floor (0 by default; ours above it) keeps R in L_pure's target on steps where the projection is negative.


def stage2_loss(v_full: torch.Tensor, v_base: torch.Tensor, r_tar: torch.Tensor, r_empty: torch.Tensor,
                x0: torch.Tensor, eps: torch.Tensor, *, eta: float, lambda_mode: str,
                lambda_value: float = 1.0, lambda_max: float = 2.0, lambda_min: float = 0.0,
                r_prompt: torch.Tensor | None = None, r_base: torch.Tensor | None = None,
                detach_base: bool = False, sigma: torch.Tensor | None = None,
                precondition: bool = False) -> dict[str, torch.Tensor]:
    """``L = L_CC + eta * L_pure`` per sample; gradients flow through both ``v_full`` and ``v_base``
    as the paper's loss reads (``detach_base``, ours and the recipe's default: through ``v_full`` only, so
    the base caption's branch is never trained).

    ``precondition`` (stage 1's x0 parameterisation, off in stage 2 by default): both terms compare x0
    estimates ``x_t - sigma * v`` instead of velocities, which is each velocity term weighted by
    ``sigma^2`` (``sigma`` (B,) is then required).

    ``r_prompt``/``r_base``: the extractor on ``prompt`` and ``base_prompt`` (needed by
    ``lambda_mode="extractor"`` only). Besides the losses and ``lambda`` it returns ``cos_r``, the
    cosine between R and the trainable model's concept increment ``v_full - v_base`` (no gradient).
    """
    target = eps - x0
    r = (r_tar - r_empty).detach()
    if lambda_mode == "fixed":
        lam = torch.full((v_full.shape[0],), float(lambda_value), device=v_full.device)
    elif lambda_mode == "adaptive":
        lam = adaptive_lambda(target, v_base, r, lambda_max, lambda_min)
    elif lambda_mode == "increment":
        lam = _projection(v_full - v_base, r, lambda_max, lambda_min)
    elif lambda_mode == "extractor":
        if r_prompt is None or r_base is None:
            raise ValueError("lambda_mode: 'extractor' needs r_prompt and r_base (the extractor on prompt "
                             "and base_prompt)")
        lam = _projection(r_prompt - r_base, r, lambda_max, lambda_min)
    else:
        raise ValueError(f"lambda_mode: {lambda_mode!r} must be one of {LAMBDA_MODES}")
    anchor = v_base.detach() if detach_base else v_base
    guided = anchor + lam.view(-1, *([1] * (r.dim() - 1))).to(r.dtype) * r
    l_cc = per_sample_mse(v_full, target)
    l_pure = per_sample_mse(v_full, guided)
    if precondition:
        if sigma is None:
            raise ValueError("precondition: the x0-parameterised stage-2 loss needs sigma")
        w = sigma.float().pow(2)
        l_cc, l_pure = w * l_cc, w * l_pure
    return {"loss": l_cc + eta * l_pure, "l_cc": l_cc, "l_pure": l_pure, "lambda": lam,
            "cos_r": cosine(v_full - v_base, r)}
