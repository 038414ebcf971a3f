"""``purecc import``: a diffusers or PEFT LoRA becomes a registered concept giving the images diffusers gives."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from purecc.cli import main
from purecc.generate import RenderSettings, Sample, generate, load_concepts
from purecc.model import load_pipeline
from purecc.registry import AdapterRegistry

# diffusers' train_dreambooth_lora_sd3.py default targets (attn2 of SD3.5 blocks is not among them)
PROJ = [f"attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                               "to_add_out")]
SETTINGS = RenderSettings(steps=3, guidance=4.0, width=64, height=64)
PROMPT = "a sks star on a grid background"


def _lora_state(pipe, r: int, alpha: float, targets: list[str], seed: int = 0) -> dict:
    """A random LoRA on ``pipe.transformer`` made by PEFT the way diffusers' SD3 trainer makes one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe.transformer.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian",
                                            target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return get_peft_model_state_dict(pipe.transformer)


def _save_diffusers(pipe, folder, r: int, alpha: float, targets: list[str], seed: int = 0):
    """``pytorch_lora_weights.safetensors`` with diffusers' key names and its LoRA metadata."""
    from diffusers import StableDiffusion3Pipeline

    state = _lora_state(pipe, r, alpha, targets, seed)
    meta = {"r": r, "lora_alpha": alpha, "target_modules": targets}
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=meta)
    return folder / "pytorch_lora_weights.safetensors"


def _image(pipe, samples_concepts=(), slot_of=None) -> np.ndarray:
    (img,) = generate(pipe, [Sample(PROMPT, seed=3, concepts=tuple(samples_concepts))], slot_of or {}, SETTINGS)
    return np.asarray(img).astype(np.int16)


def _imported_image(tiny_model_dir, storage, cid) -> np.ndarray:
    folder = AdapterRegistry(storage).path_of(cid)
    pipe = load_pipeline(str(tiny_model_dir))
    loaded = load_concepts(pipe, [folder])
    return _image(pipe, [(folder, 1.0)], loaded.slot_of_folder)


@pytest.mark.parametrize("r,alpha,targets", [(4, 4.0, PROJ), (2, 1.0, PROJ[:4])],
                         ids=["rank4-all-targets", "rank2-scaled-subset"])
def test_diffusers_lora_imports_to_the_same_image(tmp_path, tiny_model_dir, capsys, r, alpha, targets):
    """Rank 4 on every bank target, and rank 2 (zero-padded) at scale 0.5 on a subset (the rest zero)."""
    ref_pipe = load_pipeline(str(tiny_model_dir))
    base = _image(ref_pipe)
    weights = _save_diffusers(ref_pipe, tmp_path / "lora", r, alpha, targets)
    # the reference: the file through diffusers' own loader on a fresh pipeline
    ref_pipe = load_pipeline(str(tiny_model_dir))
    ref_pipe.load_lora_weights(str(weights.parent))
    want = _image(ref_pipe)
    assert np.abs(want - base).max() > 10, "the LoRA does not change the image: the test could not fail"
    storage = tmp_path / "storage"
    assert main(["import", str(weights), "--id", "ext-star", "--trigger", "sks", "--model", str(tiny_model_dir),
                 "--storage", str(storage)]) == 0, capsys.readouterr().err
    assert "imported" in capsys.readouterr().out
    manifest = AdapterRegistry(storage).manifest("ext-star")
    assert manifest.trigger == "sks" and manifest.rank == 4 and manifest.metrics["source_rank"] == r
    assert manifest.metrics["source_format"] == "diffusers"
    assert len(manifest.targets) == manifest.metrics["layers_in_bank"] >= manifest.metrics["layers_adapted"] > 0
    assert (manifest.metrics["layers_adapted"] < manifest.metrics["layers_in_bank"]) == (targets != PROJ)
    have = _imported_image(tiny_model_dir, storage, "ext-star")
    assert np.abs(have - want).max() <= 2, np.abs(have - want).max()   # float rounding of the two paths only


def test_imported_loras_compose_as_diffusers_composes_them(tmp_path, tiny_model_dir, capsys):
    """Two imported diffusers LoRAs routed in one generate call at weights 1 and 0.5 give the image of
    diffusers' own multi-adapter path (both files loaded by ``load_lora_weights``, ``set_adapters``):
    ``W x + sum_k w_k B_k A_k x`` both ways. Each alone differs from the pair, so a composition that
    dropped or doubled one could not pass."""
    loras = {"ext-star": (4, 4.0, PROJ, 0, "sks"), "ext-grid": (2, 1.0, PROJ[:4], 7, "vlk")}
    weights, storage = {}, tmp_path / "storage"
    for cid, (r, alpha, targets, seed, trigger) in loras.items():
        weights[cid] = _save_diffusers(load_pipeline(str(tiny_model_dir)), tmp_path / cid, r, alpha, targets, seed)
        assert main(["import", str(weights[cid]), "--id", cid, "--trigger", trigger, "--model",
                     str(tiny_model_dir), "--storage", str(storage)]) == 0, capsys.readouterr().err
    scale = {"ext-star": 1.0, "ext-grid": 0.5}
    ref_pipe = load_pipeline(str(tiny_model_dir))
    for cid in loras:
        ref_pipe.load_lora_weights(str(weights[cid].parent), adapter_name=cid)
    ref_pipe.set_adapters(list(scale), list(scale.values()))
    want = _image(ref_pipe)

    registry = AdapterRegistry(storage)
    folders = {cid: registry.path_of(cid) for cid in loras}       # where trained concepts are served from
    pipe = load_pipeline(str(tiny_model_dir))
    loaded = load_concepts(pipe, list(folders.values()))
    slot_of = loaded.slot_of_folder
    have = _image(pipe, [(folders[cid], w) for cid, w in scale.items()], slot_of)
    assert np.abs(have - want).max() <= 2, np.abs(have - want).max()
    alone = {cid: _image(pipe, [(folders[cid], scale[cid])], slot_of) for cid in loras}
    base = _image(pipe)
    for cid, image in alone.items():
        assert np.abs(have - image).max() > 10, f"{cid} alone gives the composed image: the other is a no-op"
        assert np.abs(image - base).max() > 10, f"{cid} alone does not change the image"


def test_peft_folder_imports_with_its_scale(tmp_path, tiny_model_dir, capsys):
    """A folder written by PEFT's own ``save_pretrained`` (alpha 8 at rank 4: scale 2, folded into B)."""
    from peft import LoraConfig, get_peft_model

    pipe = load_pipeline(str(tiny_model_dir))
    model = get_peft_model(pipe.transformer, LoraConfig(r=4, lora_alpha=8.0, init_lora_weights="gaussian",
                                                        target_modules=PROJ))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(tmp_path / "peft"))
    written = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    storage = tmp_path / "storage"
    assert main(["import", str(tmp_path / "peft"), "--id", "peft-star", "--trigger", "sks", "--model",
                 str(tiny_model_dir), "--storage", str(storage)]) == 0, capsys.readouterr().err
    assert AdapterRegistry(storage).manifest("peft-star").metrics["source_format"] == "peft"
    imported = load_file(f"{AdapterRegistry(storage).path_of('peft-star')}/pytorch_lora_weights.safetensors")
    assert len(written) > 0
    for key, value in written.items():
        name = "transformer." + key[len("base_model.model."):]
        torch.testing.assert_close(imported[name], value * (2.0 if "lora_B" in key else 1.0))
    # the image: the folder loaded by PEFT itself (its adapter_config.json's alpha/r) on a fresh pipeline
    from peft import PeftModel

    ref_pipe = load_pipeline(str(tiny_model_dir))
    base = _image(ref_pipe)
    PeftModel.from_pretrained(ref_pipe.transformer, str(tmp_path / "peft"))    # injects into the transformer
    want = _image(ref_pipe)
    assert np.abs(want - base).max() > 10, "the LoRA does not change the image: the test could not fail"
    have = _imported_image(tiny_model_dir, storage, "peft-star")
    assert np.abs(have - want).max() <= 2, np.abs(have - want).max()


def test_lora_that_does_not_fit_the_bank_is_refused_naming_why(tmp_path, tiny_model_dir, capsys):
    pipe = load_pipeline(str(tiny_model_dir))
    high = _save_diffusers(pipe, tmp_path / "r8", 8, 8.0, PROJ)
    cases = [(high, "the LoRA has rank 8, the bank rank 4")]
    pipe = load_pipeline(str(tiny_model_dir))
    ff = _save_diffusers(pipe, tmp_path / "ff", 4, 4.0, ["ff.net.2"])
    cases.append((ff, "target 'transformer_blocks.0.ff.net.2'"))
    state = load_file(str(high.parent / "pytorch_lora_weights.safetensors"))
    key = next(k for k in state if k.endswith("attn.to_q.lora_A.weight"))
    bad = load_file(str(_save_diffusers(load_pipeline(str(tiny_model_dir)), tmp_path / "ok", 4, 4.0, PROJ)))
    bad[key] = torch.zeros(4, 7)
    save_file(bad, tmp_path / "shape.safetensors")
    cases.append((tmp_path / "shape.safetensors", "lora_A(4, 7)"))
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(4, 4)}, tmp_path / "te.safetensors")
    cases.append((tmp_path / "te.safetensors", "adapts a text encoder"))
    (tmp_path / "w.bin").write_bytes(b"x")
    cases.append((tmp_path / "w.bin", "only .safetensors"))
    for source, message in cases:
        assert main(["import", str(source), "--id", "nope", "--trigger", "sks", "--model", str(tiny_model_dir),
                     "--storage", str(tmp_path / "storage")]) == 2
        err = capsys.readouterr().err
        assert message in err, (source, err)
    assert AdapterRegistry(tmp_path / "storage").manifest("nope") is None
