import csv
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from purecc.data import (COLUMNS, ManifestError, Preprocess, concept_latents, load_image, preprocess,
                         read_concept_manifest)

ROW = {"image_path": "imgs/a.png", "prompt": "a [v] ball on grass", "base_prompt": "a ball on grass",
       "target_prompt": "[v] ball", "instance_word": "ball"}


def _write(folder, rows, columns=COLUMNS, name="manifest.csv", image_size=(40, 30), fmt="PNG"):
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", image_size, (200, 10, 10)).save(folder / "imgs" / "a.png", format=fmt)
    path = folder / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def test_sample_manifest_parses_and_substitutes(sample_manifests):
    m = read_concept_manifest(sample_manifests["checkered-star"], "zqx")
    assert 4 <= len(m.rows) <= 6
    for r in m.rows:
        assert r.image_path.is_absolute() and r.image_path.is_file()
        assert "zqx" in r.prompt and "[v]" not in r.prompt and "zqx" in r.target_prompt
        assert "zqx" not in r.base_prompt


def test_parquet_manifest(tmp_path):
    _write(tmp_path, [ROW])
    pq.write_table(pa.table({c: [ROW[c]] for c in COLUMNS}), tmp_path / "m.parquet")
    m = read_concept_manifest(tmp_path / "m.parquet", "sks")
    assert m.rows[0].prompt == "a sks ball on grass"
    assert m.rows[0].image_path == tmp_path / "imgs" / "a.png"


def test_missing_column(tmp_path):
    path = _write(tmp_path, [ROW], columns=[c for c in COLUMNS if c != "target_prompt"])
    with pytest.raises(ManifestError, match=r"manifest.csv: missing column\(s\) \['target_prompt'\]"):
        read_concept_manifest(path, "sks")


def test_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest is empty"):
        read_concept_manifest(_write(tmp_path, []), "sks")


def test_missing_image_names_row_and_column(tmp_path):
    path = _write(tmp_path, [ROW, {**ROW, "image_path": "imgs/missing.png"}])
    with pytest.raises(ManifestError, match=r"row 2, column 'image_path': image .*missing.png does not exist"):
        read_concept_manifest(path, "sks")


def test_unreadable_image(tmp_path):
    path = _write(tmp_path, [{**ROW, "image_path": "imgs/bad.png"}])
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ManifestError, match=r"row 1, column 'image_path': image .*bad.png is unreadable"):
        read_concept_manifest(path, "sks")


def test_prompt_without_placeholder(tmp_path):
    path = _write(tmp_path, [{**ROW, "prompt": "a ball on grass"}])
    with pytest.raises(ManifestError, match=r"row 1, column 'prompt': .*lacks the placeholder \[v\]"):
        read_concept_manifest(path, "sks")


def test_empty_value(tmp_path):
    path = _write(tmp_path, [{**ROW, "instance_word": ""}])
    with pytest.raises(ManifestError, match=r"row 1, column 'instance_word': value is empty"):
        read_concept_manifest(path, "sks")


def test_image_too_large_is_refused_before_decoding(tmp_path):
    path = _write(tmp_path, [ROW], image_size=(300, 200))
    with pytest.raises(ManifestError, match=r"row 1, column 'image_path': .*too large \(300x200"):
        read_concept_manifest(path, "sks", max_pixels=50_000)


def test_unsupported_image_format(tmp_path):
    path = _write(tmp_path, [ROW], fmt="GIF")
    with pytest.raises(ManifestError, match=r"row 1, column 'image_path': .*unsupported format GIF"):
        read_concept_manifest(path, "sks")


def test_unsupported_manifest_format(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("x")
    with pytest.raises(ManifestError, match=r"m.txt: unsupported manifest format '.txt'"):
        read_concept_manifest(path, "sks")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_concept_manifest(tmp_path / "none.csv", "sks")


def test_preprocess_resize_crop_flip(tmp_path):
    img = Image.new("RGB", (80, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 40, 40))  # left half white
    t = preprocess(img, Preprocess(resolution=32), random.Random(0))
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1
    flipped = preprocess(img, Preprocess(resolution=32, flip_prob=1.0), random.Random(0))
    assert torch.allclose(flipped, t.flip(-1))
    with pytest.raises(ValueError, match="crop"):
        Preprocess(crop="diagonal")


def test_latents_are_encoded_once_and_cached(tmp_path, sample_manifests, tiny_pipe, monkeypatch):
    m = read_concept_manifest(sample_manifests["striped-circle"], "vlk")
    cfg = Preprocess(resolution=64)
    lat = concept_latents(m, tiny_pipe.vae, cfg, cache_dir=tmp_path)
    assert lat.shape == (len(m.rows), 16, 8, 8)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def boom(*a, **k):
        raise AssertionError("the VAE must not run again")
    monkeypatch.setattr(tiny_pipe.vae, "encode", boom)
    again = concept_latents(m, tiny_pipe.vae, cfg, cache_dir=tmp_path)
    assert torch.equal(lat, again)


def test_load_image_is_rgb(sample_manifests):
    m = read_concept_manifest(sample_manifests["dotted-diamond"], "bxj")
    assert load_image(m.rows[0].image_path).mode == "RGB"


def test_latent_cache_is_keyed_by_the_vae_that_made_it(tmp_path, sample_manifests, tiny_model_dir):
    """Another VAE (same transformer, same images) must not reuse the first VAE's cached latents."""
    from purecc.model import load_pipeline

    m = read_concept_manifest(sample_manifests["striped-circle"], "vlk")
    cfg = Preprocess(resolution=64)
    first = load_pipeline(str(tiny_model_dir))
    lat = concept_latents(m, first.vae, cfg, cache_dir=tmp_path)
    other = load_pipeline(str(tiny_model_dir))
    with torch.no_grad():
        for p in other.vae.encoder.parameters():
            p.mul_(1.5)
    fresh = concept_latents(m, other.vae, cfg)                  # no cache: what this VAE encodes
    cached = concept_latents(m, other.vae, cfg, cache_dir=tmp_path)
    assert not torch.allclose(fresh, lat) and torch.equal(cached, fresh)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_latent_moments_give_the_posterior_std(sample_manifests, tiny_pipe):
    from purecc.data import concept_latent_moments

    m = read_concept_manifest(sample_manifests["checkered-star"], "zqx")
    moments = concept_latent_moments(m, tiny_pipe.vae, Preprocess(resolution=64))
    assert moments.mean.shape == moments.std.shape and (moments.std > 0).all()
    assert torch.equal(moments.mean, concept_latents(m, tiny_pipe.vae, Preprocess(resolution=64)))


def test_latent_cache_drops_the_least_recently_used_beyond_its_size(tmp_path):
    import os
    import time

    from purecc.data import prune_latent_cache

    files = []
    for i in range(4):
        p = tmp_path / f"{i}.safetensors"
        p.write_bytes(b"x" * 100)
        os.utime(p, (time.time() - 100 + i, time.time() - 100 + i))
        files.append(p)
    os.utime(files[0])                                   # used just now
    removed = prune_latent_cache(tmp_path, max_bytes=250, keep=files[1])
    assert removed == [files[2], files[3]]              # oldest first; the one just written is kept
    assert files[0].exists() and files[1].exists() and sum(p.stat().st_size for p in tmp_path.iterdir()) <= 250
