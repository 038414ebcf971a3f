"""Tests for the pretrained world base (purecc.testbed.pretrain) and its packaged copy."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from diffusers import StableDiffusion3Pipeline

from purecc.fileio import sha256_file
from purecc.generate import RenderSettings, Sample, generate
from purecc.model import ModelConfig, load_pipeline
from purecc.testbed.pretrain import REPORT, PretrainConfig, pretrain_world_base
from purecc.testbed.world_base import CHECKSUMS, verify_world_base, world_base_path
from purecc.tiny import TinyConfig

# The committed base must draw what a caption asks: the share of a caption's facts (shape,
# colour, pattern, size, position of every object, and the background) that the committed
# reader sees in the base's picture, over 16 world captions it was not trained on.
BASE_MIN_ALIGNMENT = 0.82  # measured 0.940 on the 4x base (0.921 with the earlier reader; 0.819 on the 8x base)
# ...and with the captions shuffled between pictures the same score must collapse.
BASE_MAX_SHUFFLED = 0.2  # measured 0.069 (0.076 on the 8x base)

WEIGHTS = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def _tiny_cfg() -> PretrainConfig:
    return replace(PretrainConfig(model=TinyConfig()), images=64, vae_steps=2, vae_full_steps=1, vae_batch=4,
                   steps=3, batch=8, warmup=1)


@pytest.fixture(scope="module")
def base_pipe():
    return load_pipeline(ModelConfig(path=str(world_base_path())))


def test_packaged_world_base_matches_its_checksums():
    listed = verify_world_base()
    assert set(WEIGHTS) <= set(listed) and REPORT in listed
    size = sum((world_base_path() / f).stat().st_size for f in listed)
    assert size < 12 * 2 ** 20  # a few MB, committed to git


def test_verify_names_a_changed_or_unlisted_file(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(world_base_path(), folder)
    (folder / "extra.txt").write_text("x")
    with pytest.raises(ValueError, match="extra.txt: not listed"):
        verify_world_base(folder)
    (folder / "extra.txt").unlink()
    data = bytearray((folder / WEIGHTS[0]).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS[0]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="transformer/diffusion_pytorch_model.safetensors: sha256"):
        verify_world_base(folder)


def test_world_base_loads_through_load_pipeline_with_its_latent_statistics(base_pipe):
    assert isinstance(base_pipe, StableDiffusion3Pipeline)
    report = json.loads((world_base_path() / REPORT).read_text())
    assert base_pipe.vae.config.shift_factor == pytest.approx(report["vae_shift_factor"])
    assert base_pipe.vae.config.scaling_factor == pytest.approx(report["vae_scaling_factor"])
    assert base_pipe.transformer.config.num_layers == report["config"]["model"]["num_layers"]


def test_world_base_renders_captions_recognisably(base_pipe):
    from purecc.testbed.metrics import text_alignment
    from purecc.testbed.reader import load_reader
    from purecc.testbed.world import world_batch

    captions = [c for _, c, _ in world_batch(7_777_777, 16)]
    images = generate(base_pipe, [Sample(c, 100 + i) for i, c in enumerate(captions)], {},
                      RenderSettings(steps=20, guidance=5.0, width=64, height=64))
    reader = load_reader()
    aligned = text_alignment(reader, images, captions).mean()
    shuffled = text_alignment(reader, images, captions[1:] + captions[:1]).mean()
    assert aligned >= BASE_MIN_ALIGNMENT and shuffled <= BASE_MAX_SHUFFLED, (aligned, shuffled)


def test_pretrain_is_deterministic_and_writes_a_verified_folder(tmp_path):
    a = pretrain_world_base(tmp_path / "a", _tiny_cfg(), progress=False)
    b = pretrain_world_base(tmp_path / "b", _tiny_cfg(), progress=False)
    assert CHECKSUMS in {p.name for p in a.iterdir()}
    assert verify_world_base(a) == verify_world_base(b)
    for name in WEIGHTS:
        assert sha256_file(a / name) == sha256_file(b / name), name
    pipe = load_pipeline(ModelConfig(path=str(a)))
    out = pipe(prompt="a large red circle in the center, on a grid background", height=64, width=64,
               num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_pretrain_refuses_a_non_empty_folder_and_bad_config(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(FileExistsError):
        pretrain_world_base(tmp_path / "x", _tiny_cfg(), progress=False)
    with pytest.raises(ValueError, match="vae_crop"):
        replace(_tiny_cfg(), vae_crop=20)


def test_pretrain_continues_from_a_saved_base_and_refuses_another_model(tmp_path):
    """``init``: a second run starts from the first one's weights (the committed base was made so)."""
    first = pretrain_world_base(tmp_path / "a", _tiny_cfg(), progress=False)
    cont = replace(_tiny_cfg(), init=str(first), vae_steps=0, vae_full_steps=0, steps=1, lr=1e-12, ema_decay=0.0)
    second = pretrain_world_base(tmp_path / "b", cont, progress=False)
    # no VAE steps: the VAE is the first run's, byte for byte; at lr 1e-12 the transformer barely moves
    assert sha256_file(first / WEIGHTS[1]) == sha256_file(second / WEIGHTS[1])
    a, b = (load_pipeline(ModelConfig(path=str(p))).transformer.state_dict() for p in (first, second))
    assert all(np.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    fresh = pretrain_world_base(tmp_path / "c", replace(cont, init=""), progress=False)
    c = load_pipeline(ModelConfig(path=str(fresh))).transformer.state_dict()
    assert not all(np.allclose(a[k].float(), c[k].float(), atol=1e-3) for k in a)
    other = replace(cont, model=replace(TinyConfig(), vae_channels=(8, 8, 8)))
    with pytest.raises(ValueError, match="init: .* does not match"):
        pretrain_world_base(tmp_path / "d", other, progress=False)
    with pytest.raises(FileNotFoundError, match="init: .* not a saved world base"):
        pretrain_world_base(tmp_path / "e", replace(cont, init=str(tmp_path)), progress=False)
