"""Tests for purecc.eval.clip_metrics: CLIP-T, CLIP-I and DINO on tiny random local models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from purecc.testbed.world import world_batch  # any images will do; the world's are at hand


# ---------------------------------------------------------------- CLIP and DINO

@pytest.fixture(scope="module")
def tiny_clip_dino(tmp_path_factory):
    """Tiny random CLIP and DINOv2 folders, saved the way real ones are."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              Dinov2Config, Dinov2Model)

    from purecc.tokenizer import build_clip_tokenizer

    root = tmp_path_factory.mktemp("realmetrics")
    tok = build_clip_tokenizer()
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    text = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **small)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **small),
                                projection_dim=16))
    clip.save_pretrained(root / "clip")
    crop = {"height": 32, "width": 32}
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop),
                  tokenizer=tok).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **small)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(root / "dino")
    return root


def test_clip_t_and_clip_i_match_the_model_forward(tiny_clip_dino):
    from transformers import CLIPModel

    from purecc.eval.clip_metrics import ClipScorer

    scorer = ClipScorer(tiny_clip_dino / "clip")
    images = [b[0] for b in world_batch(1, 3)]
    prompts = [b[1] for b in world_batch(1, 3)]
    ct = scorer.clip_t(images, prompts)
    model = CLIPModel.from_pretrained(tiny_clip_dino / "clip").eval()
    inputs = scorer.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    np.testing.assert_allclose(ct, 100 * logits.numpy(), atol=1e-4)
    ci = scorer.clip_i(images, images)
    assert ci.shape == (3,) and np.all(ci <= 1 + 1e-6)
    np.testing.assert_allclose(scorer.clip_i(images[:1], images[:1]), [1.0], atol=1e-5)


def test_dino_similarity_is_one_for_the_same_image(tiny_clip_dino):
    from purecc.eval.clip_metrics import DinoScorer

    scorer = DinoScorer(tiny_clip_dino / "dino")
    images = [b[0] for b in world_batch(2, 3)]
    np.testing.assert_allclose(scorer.dino(images[:1], images[:1]), [1.0], atol=1e-5)
    sims = scorer.dino(images, images[:2])
    assert sims.shape == (3,) and np.all(np.abs(sims) <= 1 + 1e-6)
