"""The plain reference recipe that bench scripts compare against: a diffusers transformer with a peft
LoRA added through ``add_adapter``, torch AdamW, ``clip_grad_norm_`` and the same stage-1 loss."""

from __future__ import annotations

import torch
from peft import LoraConfig

from purecc.bank import find_targets
from purecc.losses import noisy_latents, sample_sigma, stage1_loss


class PeftReferenceLoop:
    def __init__(self, transformer, sigma_table: torch.Tensor, lr: float = 4e-4, rank: int = 4):
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=find_targets(transformer)))
        self.tr, self.table = transformer, sigma_table
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-4)

    def step(self, x0, emb, pooled, generator: torch.Generator) -> float:
        dev = x0.device
        eps = torch.randn(x0.shape, generator=generator).to(dev, x0.dtype)
        sigma = sample_sigma(self.table, x0.shape[0], generator).to(dev)
        x_t = noisy_latents(x0, eps, sigma)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            v = self.tr(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=emb,
                        pooled_projections=pooled, return_dict=False)[0]
        loss = stage1_loss(v.float(), x0, eps, sigma, x_t, precondition=True).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())
