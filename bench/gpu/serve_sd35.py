"""Serving-side costs on an SD3.5-Medium-sized transformer (random weights, bf16).

Prints: (1) hot-loading a concept into a bank slot from pinned host memory vs diffusers'
``load_lora_adapter`` + ``delete_adapters`` of the same adapter (target: slot load under 10 ms);
(2) per-image denoising time (one transformer forward with classifier-free guidance, i.e. at batch
2B) at batch 1 vs batch 8 with 8 different concept sets (target: >= 4x the images per second).

Usage (GPU): python bench/gpu/serve_sd35.py [--json out.json];  CPU smoke: --tiny --resolution 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]
from sd35 import build_transformer, device_name, timed  # noqa: E402

from purecc.bank import attach_bank  # noqa: E402


def concept_flats(bank, n: int, pin: bool) -> list[torch.Tensor]:
    """``n`` random adapters as flat vectors (P,) in the bank's dtype, pinned when ``pin``."""
    g = torch.Generator().manual_seed(0)
    flats = [(torch.randn(bank.params_per_slot, generator=g) * 0.01).to(bank.storage.dtype) for _ in range(n)]
    return [f.pin_memory() if pin else f for f in flats]


def diffusers_state_dict(bank, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat adapter as a diffusers LoRA state dict (``transformer.<layer>.lora_A/B.weight``, bf16)."""
    sd = {}
    for name, (a, b) in bank.unflatten(flat.float()).items():
        sd[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
        sd[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    return sd


def measure_loads(tiny: bool, dev, dtype, repeats: int) -> dict:
    """Slot hot-load vs diffusers load + delete times; also returns the transformer, bank and adapters."""
    tr = build_transformer(tiny, dev, dtype)
    bank = attach_bank(tr, 8, dtype=dtype)
    flats = concept_flats(bank, 8, dev.type == "cuda")
    turn = iter(range(10**9))  # each call loads the next concept into the next slot

    def load_next():
        i = next(turn) % 8
        bank.load_slot(i, flats[i])
    slot_s = timed(load_next, dev, repeats)
    ref = build_transformer(tiny, dev, dtype, seed=1)
    sd = diffusers_state_dict(bank, flats[0])

    def diffusers_cycle():
        ref.load_lora_adapter(dict(sd), adapter_name="bench_concept", prefix="transformer")
        ref.delete_adapters("bench_concept")
    diffusers_cycle()
    diff_s = timed(diffusers_cycle, dev, max(3, repeats // 4))
    del ref
    return {"slot_load_ms": 1000 * slot_s, "diffusers_load_delete_ms": 1000 * diff_s,
            "speedup": diff_s / slot_s, "bytes_per_concept": bank.params_per_slot * bank.storage.element_size(),
            "transformer": tr, "bank": bank, "flats": flats}


def measure_denoise(tr, bank, flats, dev, dtype, latent: int, repeats: int) -> dict:
    """Per-image ms of one CFG transformer forward at batch 1 and at batch 8 with 8 concept sets."""
    for s in range(8):
        bank.load_slot(s, flats[s])
    c = tr.config
    out = {}
    for b in (1, 8):
        g = torch.Generator().manual_seed(b)
        x = torch.randn(2 * b, 16, latent, latent, generator=g).to(dev, dtype)
        enc = torch.randn(2 * b, 154, c.joint_attention_dim, generator=g).to(dev, dtype)
        pooled = torch.randn(2 * b, c.pooled_projection_dim, generator=g).to(dev, dtype)
        t = torch.full((2 * b,), 500.0, device=dev)
        routing = torch.zeros(b, 8)
        for i in range(b):  # 8 different concept sets: concept i alone, plus concept i+1 at half weight
            routing[i, i] = 1.0
            routing[i, (i + 1) % 8] = 0.5
        with torch.no_grad(), bank.routing(routing):

            def run():
                return tr(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                          timestep=t, return_dict=False)

            run()
            sec = timed(run, dev, repeats)
        out[b] = 1000 * sec / b
    return {"ms_per_image_batch1": out[1], "ms_per_image_batch8": out[8], "images_per_s_ratio": out[1] / out[8]}


def main() -> None:
    """Run both measurements and print them (and write ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"device: {device_name(dev)}; {'tiny' if args.tiny else 'SD3.5-Medium-sized'} transformer, {dtype}, "
          f"{args.resolution} px, CFG (forward at batch 2B)")
    loads = measure_loads(args.tiny, dev, dtype, args.repeats)
    print(f"slot hot-load (one flat pinned host->device copy of {loads['bytes_per_concept'] / 2**20:.1f} MiB): "
          f"{loads['slot_load_ms']:.2f} ms; diffusers load_lora_adapter + delete_adapters: "
          f"{loads['diffusers_load_delete_ms']:.1f} ms -> {loads['speedup']:.0f}x faster", flush=True)
    den = measure_denoise(loads["transformer"], loads["bank"], loads["flats"], dev, dtype,
                          args.resolution // 8, max(3, args.repeats // 2))
    print(f"denoising forward per image: batch 1 {den['ms_per_image_batch1']:.1f} ms, batch 8 with 8 different "
          f"concept sets {den['ms_per_image_batch8']:.1f} ms -> {den['images_per_s_ratio']:.2f}x images/s")
    if args.json:
        keep = {k: v for k, v in loads.items() if k not in ("transformer", "bank", "flats")}
        Path(args.json).write_text(json.dumps({"device": device_name(dev), **keep, **den}, indent=2))


if __name__ == "__main__":
    main()
