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
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0


class SlotAdamW:
    def __init__(self, storage: torch.nn.Parameter):
        self.storage = storage
        self.exp_avg = torch.zeros(storage.shape, dtype=torch.float32, device=storage.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.steps = torch.zeros(storage.shape[0], dtype=torch.long)

    def reset_slot(self, slot: int) -> None:
        self.exp_avg[slot].zero_()
        self.exp_avg_sq[slot].zero_()
        self.steps[slot] = 0

    @torch.no_grad()
    def step(self, slots: Sequence[int], hypers: Sequence[SlotHyper]) -> torch.Tensor:
        """Update ``slots`` from ``storage.grad``; returns each slot's gradient norm before clipping."""
        grad = self.storage.grad
        if grad is None:
            raise RuntimeError("optimizer: no gradient on the bank storage; was backward() called?")
        dev = self.storage.device
        idx = torch.tensor(list(slots), device=dev)
        col = lambda vals: torch.tensor(vals, dtype=torch.float32, device=dev).unsqueeze(1)  # noqa: E731
        lr, wd = col([h.lr for h in hypers]), col([h.weight_decay for h in hypers])
        b1, b2 = col([h.betas[0] for h in hypers]), col([h.betas[1] for h in hypers])
        eps, max_norm = col([h.eps for h in hypers]), col([h.max_grad_norm for h in hypers])
        self.steps[list(slots)] += 1
        t = self.steps[list(slots)].to(dev, torch.float32).unsqueeze(1)

        g = grad.index_select(0, idx).float()                        # (k, P)
        norms = g.norm(dim=1, keepdim=True)                          # (k, 1)
        g = g * (max_norm / (norms + 1e-6)).clamp(max=1.0)
        m = self.exp_avg.index_select(0, idx).lerp_(g, 1 - b1)      # m = b1*m + (1-b1)*g
        v = self.exp_avg_sq.index_select(0, idx).mul_(b2).add_((1 - b2) * g * g)
        self.exp_avg.index_copy_(0, idx, m)
        self.exp_avg_sq.index_copy_(0, idx, v)
        p = self.storage.index_select(0, idx).float()
        p = p * (1 - lr * wd)
        denom = (v / (1 - b2 ** t)).sqrt() + eps
        p = p - lr * (m / (1 - b1 ** t)) / denom
        self.storage.index_copy_(0, idx, p.to(self.storage.dtype))
        return norms.squeeze(1)

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        return {"exp_avg": self.exp_avg[slot].clone(), "exp_avg_sq": self.exp_avg_sq[slot].clone(),
                "step": self.steps[slot:slot + 1].clone()}

    def load_slot_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        self.exp_avg[slot].copy_(state["exp_avg"])
        self.exp_avg_sq[slot].copy_(state["exp_avg_sq"])
        self.steps[slot] = int(state["step"][0])
