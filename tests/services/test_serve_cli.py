"""``purecc serve`` flags, the ``serve deploy`` file, and (a whole service) the command end to end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

import services
from purecc.cli import build_parser
from services.app import build_app
from services.auth import TokenStore
from services.cli import config_from_args
from services.config import ServiceConfig

CONFIG_FILE = Path(services.__file__).parent / "serve_config.yaml"


def test_serve_flags_become_the_service_config():
    args = build_parser().parse_args(["serve", "--model", "/m", "--registry", "s3://b/p", "--slots", "4",
                                      "--replicas", "2", "--gpus-per-replica", "1", "--batch-wait-ms", "50",
                                      "--max-queued", "8", "--timeout", "30"])
    cfg = config_from_args(args)
    assert (cfg.slots, cfg.replicas, cfg.gpus_per_replica, cfg.batch_wait_s) == (4, 2, 1.0, 0.05)
    assert (cfg.max_queued_requests, cfg.request_timeout_s, cfg.registry) == (8, 30.0, "s3://b/p")
    assert args.host == "127.0.0.1"
    assert cfg.auth.enabled and cfg.tokens_file is None       # auth on by default; tokens from --storage
    with_storage = config_from_args(build_parser().parse_args(["serve", "--model", "/m", "--storage", "/s",
                                                               "--gpus-per-replica", "0"]))
    assert with_storage.tokens_file == "/s/auth/tokens.json"
    off = config_from_args(build_parser().parse_args(["serve", "--model", "/m", "--registry", "/r", "--no-auth",
                                                      "--gpus-per-replica", "0", "--tokens", "/t.json"]))
    assert not off.auth.enabled and off.tokens_file == "/t.json"


def test_config_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match="slots"):
        ServiceConfig(model="/m", registry="/r", slots=0)
    with pytest.raises(ValueError, match="dtype"):
        ServiceConfig(model="/m", registry="/r", dtype="int8")
    with pytest.raises(ValueError, match="colour"):
        ServiceConfig(model="/m", registry="/r", colour="red")


def test_serve_deploy_file_is_valid_and_builds_the_application():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(CONFIG_FILE.read_text())
    app = ServeDeploySchema.model_validate(data).applications[0]
    assert app.import_path == "services.app:build_app"
    built = build_app(app.args)                     # what `serve deploy` calls with `args`
    secured = build_app({**app.args, "auth": {"tokens": "/shared/purecc/auth/tokens.json", "burst": 5}})
    assert secured._bound_deployment.init_args[1].auth.burst == 5
    generator = built._bound_deployment.init_args[0]._bound_deployment
    assert generator.name == "ConceptGenerator"
    assert generator.ray_actor_options["num_gpus"] == app.args["gpus_per_replica"]
    assert generator.num_replicas == app.args["replicas"]
    assert generator._deployment_config.max_queued_requests == app.args["max_queued_requests"]


def test_no_auth_warns_at_start_that_auth_is_off_for_a_loopback_development_server(tiny_model_dir, tmp_path, capsys):
    """``purecc serve --no-auth`` says, before Ray starts, that authentication is off and that this is a
    development server on 127.0.0.1; with a token file it says nothing of the kind. Ray is kept from
    starting by a --temp-dir that is a regular file (its mkdir fails): nothing is started."""
    import ray

    from purecc.cli import main as purecc_main

    not_a_dir = tmp_path / "not-a-dir"
    not_a_dir.write_text("")
    common = ["serve", "--model", str(tiny_model_dir), "--registry", str(tmp_path / "registry"),
              "--gpus-per-replica", "0", "--temp-dir", str(not_a_dir)]
    saved = dict(os.environ)             # start_local_ray exports the loopback and proxy variables
    try:
        assert purecc_main([*common, "--no-auth"]) == 2
        err = capsys.readouterr().err
        assert purecc_main([*common, "--tokens", str(tmp_path / "tokens.json")]) == 2
        with_tokens = capsys.readouterr().err
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert not ray.is_initialized()
    warning = next((line for line in err.splitlines() if line.startswith("WARNING")), "")
    assert "authentication is OFF (--no-auth)" in warning and "every local caller is an admin" in warning, err
    assert "for development on 127.0.0.1 only" in warning, err
    assert err.index("WARNING") < err.index("error:"), err       # said at start, before Ray was tried
    assert "authentication is OFF" not in with_tokens and "error:" in with_tokens, with_tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.service
@pytest.mark.integration
@pytest.mark.ray
def test_purecc_serve_starts_prints_the_url_and_stops_on_ctrl_c(tiny_model_dir, tmp_path):
    port = _free_port()
    temp_dir = f"/tmp/pccli-{os.getpid()}"
    tokens = tmp_path / "tokens.json"
    token = TokenStore(tokens).create("tester", ["generate"])[1]
    cmd = [sys.executable, "-m", "purecc.cli", "serve", "--model", str(tiny_model_dir), "--registry",
           str(tmp_path / "registry"), "--port", str(port), "--num-cpus", "2", "--cpus-per-replica", "0.5",
           "--temp-dir", temp_dir, "--tokens", str(tokens)]
    # started with SIGINT ignored, as a shell without job control starts `purecc serve &`: Ctrl-C still stops it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline, line = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "ready at" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "purecc serve exited early"
        assert f"http://127.0.0.1:{port}" in line
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/v1/concepts", timeout=30).status_code == 401
        assert requests.get(f"http://127.0.0.1:{port}/v1/concepts", timeout=30,
                            headers={"Authorization": f"Bearer {token}"}).json() == {"concepts": []}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
