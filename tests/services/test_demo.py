"""``purecc demo --quick`` end to end, as a user runs it: a real process, Ray Train, Ray Serve, HTTP."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from purecc.adapter_files import load_adapter_layers
from purecc.testbed.samples import DEMO_CONCEPTS


@pytest.mark.integration
@pytest.mark.ray
@pytest.mark.service
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "purecc.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "service ready at http://127.0.0.1:" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    ids = sorted(c.concept_id for c in DEMO_CONCEPTS)
    assert sorted(c["id"] for c in report["concepts"]) == ids
    assert all(c["state"] == "published" for c in report["concepts"])
    for cid in ids:  # every published adapter is complete and passes its hash checks
        manifest, layers = load_adapter_layers(out / "storage" / "adapters" / cid)
        assert manifest.stage == 2 and manifest.concept_id == cid and layers

    requests = {r["name"]: r for r in report["requests"]}
    assert set(ids) <= set(requests)
    composed = [r for r in report["requests"] if len(r["concepts"]) == 2]
    assert composed, "at least one request composes two concepts"
    for r in report["requests"]:
        used = sorted(c["id"] for c in r["server"]["concepts"])
        assert used == sorted(cid for cid, _ in r["concepts"])
        img = Image.open(out / r["image"])
        assert img.format == "PNG" and img.size == (64, 64)
    assert Image.open(out / "grid.png").size[0] >= 64 * len(report["requests"])
    assert (out / "report.md").read_text().startswith("# purecc demo report")
    # everything was shut down: no Serve proxy is left listening
    assert "shutting down Serve and Ray" in proc.stdout
