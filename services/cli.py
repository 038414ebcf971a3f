"""``purecc serve``: start Ray (or join a cluster) and Serve, print the URL, serve until Ctrl-C;
``purecc token create/list/revoke``: the service's API tokens.
``purecc datasets upload/list/delete --url URL``: concept datasets on a running service (a folder of
images, or a folder with its manifest.csv, sent as one zip).

``serve`` requires bearer tokens by default, read from ``<storage>/auth/tokens.json`` (or ``--tokens``);
``--no-auth`` is refused unless the service listens on 127.0.0.1 only, and says so at start.

On a cluster, prefer ``serve deploy services/serve_config.yaml`` (same application builder).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from .auth import SCOPES, TOKENS_FILE, AuthSettings, TokenStore
from .config import ServiceConfig

DEFAULTS = ServiceConfig.model_fields


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``purecc`` parser."""
    p = sub.add_parser("serve", help="serve multi-concept generation over HTTP (Ray Serve)",
                       description="Start Ray (or join a cluster) and Serve, print the URL, serve until Ctrl-C.")
    p.add_argument("--model", required=True, help="local diffusers SD3/SD3.5 folder")
    p.add_argument("--registry", help="adapter registry: folder or pyarrow.fs URI (s3://...); default: --storage")
    p.add_argument("--storage", help="training storage root (local folder): enables POST /v1/batches, with "
                                     "concept data under <storage>/data/; the registry is then this folder")
    p.add_argument("--slots", type=int, default=DEFAULTS["slots"].default, help="adapter slots per replica")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas (each loads the base once)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="default: 1 when this machine has CUDA, else 0")
    p.add_argument("--cpus-per-replica", type=float, default=DEFAULTS["cpus_per_replica"].default)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-images", type=int, default=DEFAULTS["max_batch_images"].default)
    p.add_argument("--batch-wait-ms", type=float, default=1000 * DEFAULTS["batch_wait_s"].default)
    p.add_argument("--max-ongoing", type=int, default=DEFAULTS["max_ongoing_requests"].default,
                   help="requests one replica accepts at once")
    p.add_argument("--max-queued", type=int, default=DEFAULTS["max_queued_requests"].default,
                   help="requests waiting beyond that before 503")
    p.add_argument("--timeout", type=float, default=DEFAULTS["request_timeout_s"].default,
                   help="request timeout in seconds (503 after it)")
    p.add_argument("--host-cache", type=int, default=DEFAULTS["host_cache"].default,
                   help="concepts kept in host memory per replica")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--no-t5", action="store_true", help="do not load T5 even if the model has it")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--temp-dir", default=None, help="local Ray's session folder (logs)")
    p.add_argument("--name", default="purecc", help="Serve application name")
    p.add_argument("--tokens", help=f"API token file (default: <storage>/{TOKENS_FILE}; see `purecc token`)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve without tokens: every caller is an admin. Only with --host 127.0.0.1")
    p.add_argument("--rate", type=float, default=AuthSettings.model_fields["requests_per_minute"].default,
                   help="requests per minute per token")
    p.set_defaults(func=_serve)
    _register_token(sub)
    _register_datasets(sub)


def _register_datasets(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("datasets", help="upload, list or delete concept datasets on a running service",
                       description="Concept datasets in your data area of a purecc service; a batch concept "
                                   "trains on one with `data` set to the printed `data`.")
    dsub = d.add_subparsers(dest="datasets_command", required=True)
    for name, help_ in (("upload", "upload a folder of images (with its manifest.csv, if it has one)"),
                        ("list", "list your datasets"), ("delete", "delete one of your datasets")):
        c = dsub.add_parser(name, help=help_)
        c.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
        c.add_argument("--token", help="API token (default: $PURECC_TOKEN)")
        c.set_defaults(func=globals()[f"_datasets_{name}"])
    up = dsub.choices["upload"]
    up.add_argument("folder", help="a folder of PNG/JPEG/WebP images, or one holding manifest.csv and its images")
    up.add_argument("--trigger", help="the trigger word (in captions it may stand for [v])")
    up.add_argument("--class-word", help="the concept's class, e.g. dog (captions: 'a photo of [v] <class>')")
    up.add_argument("--captions", help="a JSON file: image file name -> caption containing [v]")
    dsub.choices["delete"].add_argument("id", help="the dataset id")


def _datasets_call(args: argparse.Namespace, method: str, *a, **kw) -> int:
    import requests

    from .client import ServiceClient, ServiceError

    try:
        result = getattr(ServiceClient(args.url, token=args.token), method)(*a, **kw)
    except (ServiceError, requests.RequestException, OSError, ValueError) as exc:
        print(f"error: {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _datasets_upload(args: argparse.Namespace) -> int:
    try:
        captions = json.loads(Path(args.captions).read_text()) if args.captions else None
    except (OSError, ValueError) as exc:
        print(f"error: --captions {args.captions}: {exc}", file=sys.stderr)
        return 2
    return _datasets_call(args, "upload_dataset", Path(args.folder), trigger=args.trigger,
                          class_word=args.class_word, captions=captions)


def _datasets_list(args: argparse.Namespace) -> int:
    return _datasets_call(args, "datasets")


def _datasets_delete(args: argparse.Namespace) -> int:
    return _datasets_call(args, "delete_dataset", args.id)


def _register_token(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("token", help="create, list or revoke the service's API tokens",
                       description="API tokens of a purecc service, stored hashed in <storage>/auth/tokens.json.")
    tsub = t.add_subparsers(dest="token_command", required=True)
    for name, help_ in (("create", "create a token (printed once; only its hash is kept)"),
                        ("list", "list the tokens (never their secrets)"), ("revoke", "revoke a token by id")):
        c = tsub.add_parser(name, help=help_)
        where = c.add_mutually_exclusive_group(required=True)
        where.add_argument("--storage", help="the service's storage root")
        where.add_argument("--tokens", help="the token file itself")
        c.set_defaults(func=globals()[f"_token_{name}"])
    create, _, revoke = (tsub.choices[n] for n in ("create", "list", "revoke"))
    create.add_argument("--owner", required=True, help="who the token acts for ([a-z0-9][a-z0-9_-]{0,63}); "
                                                       "its data area is <storage>/data/<owner>/")
    create.add_argument("--scope", action="append", choices=SCOPES, required=True,
                        help="generate, submit or admin (repeat for several)")
    tsub.choices["list"].add_argument("--json", action="store_true", help="machine-readable output")
    revoke.add_argument("id", help="the token id (pcc_<id>_...)")


def _store(args: argparse.Namespace) -> TokenStore:
    return TokenStore(args.tokens or Path(args.storage).expanduser().resolve() / TOKENS_FILE)


def _token_create(args: argparse.Namespace) -> int:
    try:
        rec, token = _store(args).create(args.owner, args.scope)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created token {rec.id} for {rec.owner} ({', '.join(rec.scopes)}); it is shown once:", file=sys.stderr)
    print(token, flush=True)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    records = _store(args).list()
    if args.json:
        print(json.dumps([{"id": r.id, "owner": r.owner, "scopes": list(r.scopes), "created_at": r.created_at,
                           "revoked_at": r.revoked_at} for r in records], indent=2))
        return 0
    for r in records:
        state = "revoked" if r.revoked_at else "active"
        print(f"{r.id}  {r.owner:<20} {','.join(r.scopes):<24} {state}  "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.created_at))} UTC")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    try:
        rec = _store(args).revoke(args.id)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"revoked token {rec.id} ({rec.owner})")
    return 0


def check_no_auth(host: str, no_auth: bool) -> None:
    """Refuse ``--no-auth`` on anything but the loopback address (ValueError saying why)."""
    if no_auth and host != "127.0.0.1":
        raise ValueError(f"--no-auth is only allowed with --host 127.0.0.1 (got {host!r}): anyone who reaches "
                         "the port could train, read every batch and take over concepts")


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The service config of ``purecc serve``'s flags (GPUs per replica: 1 with CUDA, else 0)."""
    gpus = args.gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    storage = str(Path(args.storage).expanduser().resolve()) if args.storage else None
    tokens = str(Path(args.tokens).expanduser().resolve()) if args.tokens else None
    auth = AuthSettings(enabled=not args.no_auth, tokens=tokens, requests_per_minute=args.rate)
    return ServiceConfig(
        model=args.model, registry=args.registry, storage=storage, slots=args.slots, replicas=args.replicas,
        gpus_per_replica=gpus, cpus_per_replica=args.cpus_per_replica, max_batch_images=args.max_batch_images,
        batch_wait_s=args.batch_wait_ms / 1000, max_ongoing_requests=args.max_ongoing,
        max_queued_requests=args.max_queued, request_timeout_s=args.timeout, host_cache=args.host_cache,
        dtype=args.dtype, load_t5=not args.no_t5, auth=auth)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    from purecc.model import read_model_index

    try:
        check_no_auth(args.host, args.no_auth)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.address:
        read_model_index(args.model)    # fail here, not in a replica, on a wrong folder
    config = config_from_args(args)
    if args.no_auth:
        print("WARNING: authentication is OFF (--no-auth): every local caller is an admin; "
              "for development on 127.0.0.1 only", file=sys.stderr, flush=True)
    elif config.tokens_file is None:
        print("WARNING: no token file (--tokens or --storage): every protected route answers 401",
              file=sys.stderr, flush=True)
    from cluster.local_ray import start_local_ray

    from .limits import proxy_environment

    ray = start_local_ray(args.num_cpus, temp_dir=args.temp_dir, address=args.address,
                          env=proxy_environment(config.limits))   # the HTTP proxy reads bodies under limits
    from ray import serve

    from .app import build_app

    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name=args.name, route_prefix="/")
        batches = ", POST /v1/batches, GET /v1/batches/{name}" if config.storage else ""
        print(f"purecc service ready at http://{args.host}:{args.port}  "
              f"(POST /v1/generate, GET /v1/concepts{batches}, GET /healthz, docs at /docs); Ctrl-C stops it",
              flush=True)
        # both stop it, whatever the parent left: a shell without job control starts `purecc serve &` with
        # SIGINT ignored, and Python then installs no Ctrl-C handler of its own (the server never stopped)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        if args.address:
            serve.delete(args.name)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
