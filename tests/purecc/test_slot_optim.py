"""SlotAdamW on one slot against torch.optim.AdamW (with the same gradient clipping)."""

from __future__ import annotations

import torch

from purecc.slot_optim import SlotAdamW, SlotHyper


def _reference(p0: torch.Tensor, grads: list[torch.Tensor], hyper: SlotHyper) -> torch.Tensor:
    param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([param], lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
                            weight_decay=hyper.weight_decay)
    for g in grads:
        param.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([param], hyper.max_grad_norm)
        opt.step()
    return param.detach()


def test_one_slot_matches_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    storage = torch.nn.Parameter(torch.randn(3, 50, generator=gen))
    others = storage.detach()[[0, 2]].clone()
    p0 = storage.detach()[1].clone()
    grads = [torch.randn(50, generator=gen) * s for s in (0.1, 3.0, 0.5, 10.0, 0.01, 1.0)]  # some get clipped
    hyper = SlotHyper(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0)
    opt = SlotAdamW(storage)
    for g in grads:
        full = torch.zeros_like(storage)
        full[1] = g
        storage.grad = full
        norm = opt.step([1], [hyper])
        assert torch.allclose(norm, g.norm().unsqueeze(0), rtol=1e-6)
    want = _reference(p0, grads, hyper)
    assert (storage.detach()[1] - want).abs().max().item() <= 1e-6
    assert torch.equal(storage.detach()[[0, 2]], others)    # the other slots were not touched
    assert int(opt.steps[1]) == len(grads) and int(opt.steps[0]) == 0


def test_slot_state_round_trips_and_reset_starts_over():
    storage = torch.nn.Parameter(torch.randn(2, 8))
    opt = SlotAdamW(storage)
    storage.grad = torch.ones_like(storage)
    opt.step([0, 1], [SlotHyper(lr=1e-3)] * 2)
    state = opt.slot_state(0)
    other = SlotAdamW(torch.nn.Parameter(storage.detach().clone()))
    other.load_slot_state(1, state)
    assert torch.equal(other.exp_avg[1], opt.exp_avg[0]) and int(other.steps[1]) == 1
    opt.reset_slot(0)
    assert int(opt.steps[0]) == 0 and not opt.exp_avg[0].any() and opt.exp_avg[1].any()
