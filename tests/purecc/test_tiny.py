import json

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from purecc.cli import main
from purecc.tiny import TinyConfig, build_tiny_pipeline, write_tiny_model


def _transformer_out(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(2, 16, 8, 8, generator=g)
    enc = torch.randn(2, 154, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                           timestep=torch.tensor([900.0, 100.0])).sample


def test_build_is_deterministic_and_sd35_shaped():
    a, b = build_tiny_pipeline(TinyConfig(seed=3)), build_tiny_pipeline(TinyConfig(seed=3))
    assert torch.equal(_transformer_out(a.transformer), _transformer_out(b.transformer))
    tr = a.transformer
    assert tr.config.qk_norm == "rms_norm"
    assert [blk.attn2 is not None for blk in tr.transformer_blocks] == [True, True, False]
    assert tr.transformer_blocks[-1].context_pre_only
    assert a.vae.config.latent_channels == 16 and len(a.vae.config.block_out_channels) == 4
    assert a.vae_scale_factor == 8


def test_a_three_block_vae_gives_16x16_latents_at_64_px():
    cfg = TinyConfig(seed=0, vae_channels=(8, 8, 8), max_image_size=256)
    pipe = build_tiny_pipeline(cfg)
    assert cfg.vae_factor == 4 and pipe.vae_scale_factor == 4
    assert pipe.transformer.config.sample_size == 16 and pipe.transformer.config.pos_embed_max_size == 32
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 16, 16, 16)
    img = pipe("a red circle", height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="vae_channels"):
        TinyConfig(vae_channels=(8, 8))
    with pytest.raises(ValueError, match="sample_size"):
        TinyConfig(vae_channels=(8, 8, 8), sample_size=60)


def test_save_reload_gives_identical_outputs(tmp_path):
    cfg = TinyConfig(seed=1)
    pipe = build_tiny_pipeline(cfg)
    path = write_tiny_model(tmp_path / "m", cfg)
    again = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    assert torch.equal(_transformer_out(pipe.transformer), _transformer_out(again.transformer))
    kw = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, output_type="np")
    img1 = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    img2 = again(**kw, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(img1 - img2).max() < 1e-5
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert list((path / "transformer").glob("*.safetensors")) and not list(path.rglob("*.bin"))


def test_t5_variant_loads_with_plain_from_pretrained(tmp_path):
    path = write_tiny_model(tmp_path / "m", TinyConfig(with_t5=True))
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    assert pipe.text_encoder_3 is not None
    img = pipe("a blue square", height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)


def test_cli_writes_a_loadable_model_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "cli")]) == 0
    assert SD3Transformer2DModel.from_pretrained(tmp_path / "cli" / "transformer") is not None
    assert main(["tiny-model", str(tmp_path / "cli")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="dual_attention_layers"):
        TinyConfig(num_layers=2, dual_attention_layers=(5,))
