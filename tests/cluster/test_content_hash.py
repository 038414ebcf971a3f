"""A job's content hash depends on what is trained, never on where the files are mounted."""

from __future__ import annotations

import shutil

from cluster.spec import load_batch, model_identity
from cluster_helpers import batch_dict, write_batch


def _hashes(path) -> dict[str, str]:
    return {j.concept_id: j.content_hash() for j in load_batch(path).jobs()}


def test_same_data_under_two_mount_paths_gives_the_same_hash(tmp_path, tiny_model_dir, sample_manifests):
    mounts = {}
    for name in ("mnt-a", "elsewhere/mnt-b"):
        root = tmp_path / name
        shutil.copytree(tiny_model_dir, root / "model")
        manifests = {cid: root / "data" / cid / m.name for cid, m in sample_manifests.items()}
        for cid, m in sample_manifests.items():
            shutil.copytree(m.parent, manifests[cid].parent)
        mounts[name] = write_batch(root / "batch.yaml", batch_dict(root / "model", root / "store", manifests))
    a, b = (_hashes(p) for p in mounts.values())
    assert a == b and len(set(a.values())) == len(a)
    jobs = load_batch(mounts["mnt-a"]).jobs()
    assert str(tmp_path) not in jobs[0].base_id


def test_the_hash_still_follows_the_content(tmp_path, tiny_model_dir, sample_manifests):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = shutil.copytree(sample_manifests["checkered-star"].parent, tmp_path / "zig")
    manifests = {"checkered-star": data / sample_manifests["checkered-star"].name}
    path = write_batch(tmp_path / "b.yaml", batch_dict(model, tmp_path / "store", manifests))
    before = _hashes(path)
    img = sorted((data / "imgs").glob("*.png"))[0]
    img.write_bytes(sorted((data / "imgs").glob("*.png"))[1].read_bytes())   # other pixels, same name
    changed = _hashes(path)
    assert changed != before
    ident = model_identity(str(model))
    cfg = model / "model_index.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert model_identity(str(model)) != ident
