"""``purecc submit --url --upload``: the checks made before anything is sent, and the client's merge.

The upload and submission over real HTTP (5 images, a batch naming the dataset, trained and composed)
is ``test_uploaded_images_train_watched_on_the_page_and_compose`` in test_page_browser.py, which shares
that module's service. Here: the refusals that need no service (each names what is wrong, exit 2), and
``submit_with_uploads`` refusing an --upload for a concept the batch lacks before uploading anything.
"""

from __future__ import annotations

import json

import pytest

from purecc.cli import main as purecc_main
from services.client import ServiceClient


def _batch(tmp_path, concepts=({"id": "my-star", "trigger": "zqx"},)):
    path = tmp_path / "batch.yaml"
    path.write_text(json.dumps({"name": "b", "concepts": list(concepts)}))
    return path


@pytest.mark.parametrize("upload, message", [
    ("my-star", "--upload 'my-star': expected CONCEPT_ID=FOLDER"),
    ("=imgs", "--upload '=imgs': expected CONCEPT_ID=FOLDER"),
    ("my-star=missing-folder", "missing-folder is not a folder"),
])
def test_a_bad_upload_pair_is_refused_before_sending(tmp_path, capsys, upload, message):
    # port 9 on 127.0.0.1 (discard): nothing listens, so reaching the network would fail differently
    code = purecc_main(["submit", str(_batch(tmp_path)), "--url", "http://127.0.0.1:9", "--upload", upload])
    assert code == 2 and message in capsys.readouterr().err


def test_upload_needs_url(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    code = purecc_main(["submit", str(_batch(tmp_path)), "--upload", f"my-star={tmp_path / 'imgs'}"])
    assert code == 2 and "--upload needs --url" in capsys.readouterr().err


def test_a_batch_file_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    path = tmp_path / "batch.yaml"
    path.write_text("- just\n- a list\n")
    assert purecc_main(["submit", str(path), "--url", "http://127.0.0.1:9"]) == 2
    assert "the batch file must hold a mapping" in capsys.readouterr().err


def test_an_upload_for_a_concept_the_batch_lacks_sends_nothing(tmp_path):
    client = ServiceClient("http://127.0.0.1:9", token="pcc_x_y", timeout=1)    # never reached
    with pytest.raises(ValueError, match="--upload names concepts the batch does not have: other"):
        client.submit_with_uploads({"concepts": [{"id": "my-star", "trigger": "zqx"}]}, {"other": tmp_path})


def test_a_service_that_does_not_answer_is_exit_1(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code = purecc_main(["submit", str(_batch(tmp_path)), "--url", "http://127.0.0.1:9", "--token", "pcc_x_y",
                        "--upload", f"my-star={imgs}"])
    assert code == 1 and "error: http://127.0.0.1:9:" in capsys.readouterr().err
