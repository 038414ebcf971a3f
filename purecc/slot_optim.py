"""AdamW over the rows of an adapter bank's storage: one independent optimiser per slot.

torch's AdamW keeps a single step count per parameter tensor and clips the gradient norm over the
whole tensor. A pack stores every concept as one row of a single ``(S, P)`` tensor, so each concept
needs its own step count, learning rate, weight decay and gradient clipping. Because AdamW is
elementwise, that is a few vectorised operations over the selected rows; the update is the same
formula as ``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SlotHyper:
    """One slot's optimiser hyper-parameters (as ``torch.optim.AdamW`` names them, plus clipping)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0


class SlotAdamW:
    """AdamW with one independent state (moments, step count) per row of the bank's storage."""

    def __init__(self, storage: torch.nn.Parameter):
        self.storage = storage
        self.exp_avg = torch.zeros(storage.shape, dtype=torch.float32, device=storage.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.steps = torch.zeros(storage.shape[0], dtype=torch.long, device=storage.device)  # on device: no sync

    def reset_slot(self, slot: int) -> None:
        """Forget a slot's moments and step count (a new concept in it)."""
        self.exp_avg[slot].zero_()
        self.exp_avg_sq[slot].zero_()
        self.steps[slot] = 0

    @torch.no_grad()
    def step(self, slots: Sequence[int], hypers: Sequence[SlotHyper],
             grad_scale: Sequence[float] | None = None) -> torch.Tensor:
        """Update ``slots`` from ``storage.grad``; returns each slot's gradient norm before clipping.

        ``grad_scale`` (fp16 loss scaling): each slot's gradient is divided by its scale first, and a
        slot whose unscaled gradient is not finite is left as it is (no update, no step counted; its
        returned norm is not finite), as ``torch.amp.GradScaler`` skips a step. Without it, a slot
        whose gradient or updated weights are not finite is left as it is the same way: nothing
        non-finite ever enters a slot (the caller sees the non-finite norm).
        """
        grad = self.storage.grad
        if grad is None:
            raise RuntimeError("optimizer: no gradient on the bank storage; was backward() called?")
        dev = self.storage.device
        idx = torch.tensor(list(slots), device=dev)

        def col(vals: list[float]) -> torch.Tensor:
            """One hyper-parameter per selected slot as a (k, 1) column."""
            return torch.tensor(vals, dtype=torch.float32, device=dev).unsqueeze(1)

        lr, wd = col([h.lr for h in hypers]), col([h.weight_decay for h in hypers])
        b1, b2 = col([h.betas[0] for h in hypers]), col([h.betas[1] for h in hypers])
        eps, max_norm = col([h.eps for h in hypers]), col([h.max_grad_norm for h in hypers])
        g = grad.index_select(0, idx).float()                        # (k, P)
        if grad_scale is not None:
            g = g / col(list(grad_scale))
        keep = torch.isfinite(g).all(dim=1, keepdim=True)           # (k, 1)
        g = torch.where(keep, g, torch.zeros_like(g))
        t = (self.steps[idx] + 1).to(torch.float32).unsqueeze(1)

        norms = g.norm(dim=1, keepdim=True)                          # (k, 1)
        old = (self.exp_avg.index_select(0, idx), self.exp_avg_sq.index_select(0, idx),
               self.storage.index_select(0, idx))
        g = g * (max_norm / (norms + 1e-6)).clamp(max=1.0)
        m = self.exp_avg.index_select(0, idx).lerp_(g, 1 - b1)      # m = b1*m + (1-b1)*g
        v = self.exp_avg_sq.index_select(0, idx).mul_(b2).add_((1 - b2) * g * g)
        p = self.storage.index_select(0, idx).float()
        p = p * (1 - lr * wd)
        denom = (v / (1 - b2 ** t)).sqrt() + eps
        p = p - lr * (m / (1 - b1 ** t)) / denom
        keep = keep & torch.isfinite(p).all(dim=1, keepdim=True)
        # skipped slots keep their moments, weights and step count
        self.exp_avg.index_copy_(0, idx, torch.where(keep, m, old[0]))
        self.exp_avg_sq.index_copy_(0, idx, torch.where(keep, v, old[1]))
        self.storage.index_copy_(0, idx, torch.where(keep, p, old[2].float()).to(self.storage.dtype))
        self.steps.index_add_(0, idx, keep.squeeze(1).long())
        return torch.where(keep, norms, torch.full_like(norms, float("inf"))).squeeze(1)

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """Copies of one slot's moments and step (for a checkpoint)."""
        return {"exp_avg": self.exp_avg[slot].clone(), "exp_avg_sq": self.exp_avg_sq[slot].clone(),
                "step": self.steps[slot:slot + 1].clone()}

    def load_slot_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Restore one slot's state from ``slot_state``'s tensors."""
        self.exp_avg[slot].copy_(state["exp_avg"])
        self.exp_avg_sq[slot].copy_(state["exp_avg_sq"])
        self.steps[slot] = int(state["step"][0])
