"""``purecc serve``: start Ray (or join a cluster) and Serve, print the URL, serve until Ctrl-C.

On a cluster, prefer ``serve deploy services/serve_config.yaml`` (same application builder).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

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
    p.set_defaults(func=_serve)


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The service config of ``purecc serve``'s flags (GPUs per replica: 1 with CUDA, else 0)."""
    gpus = args.gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    storage = str(Path(args.storage).expanduser().resolve()) if args.storage else None
    return ServiceConfig(
        model=args.model, registry=args.registry, storage=storage, slots=args.slots, replicas=args.replicas,
        gpus_per_replica=gpus, cpus_per_replica=args.cpus_per_replica, max_batch_images=args.max_batch_images,
        batch_wait_s=args.batch_wait_ms / 1000, max_ongoing_requests=args.max_ongoing,
        max_queued_requests=args.max_queued, request_timeout_s=args.timeout, host_cache=args.host_cache,
        dtype=args.dtype, load_t5=not args.no_t5)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    from purecc.model import read_model_index

    if not args.address:
        read_model_index(args.model)    # fail here, not in a replica, on a wrong folder
    config = config_from_args(args)
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
        signal.signal(signal.SIGTERM, _raise_interrupt)
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
