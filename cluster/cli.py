"""``purecc`` subcommands for concept batches (submit, status, cancel, resume, concepts).

    purecc submit BATCH.yaml --wait        # record + drive here, live table per concept
    purecc submit BATCH.yaml               # record + start a detached driver (log beside the ledger)
    purecc status [ID] [--json|--watch] --batch BATCH.yaml   (or --ledger PATH, or PURECC_LEDGER)
    purecc cancel ID --batch BATCH.yaml
    purecc resume --batch BATCH.yaml       # after a crash: finish every unfinished job
    purecc concepts --batch BATCH.yaml     # published concepts (or --storage ROOT)

Nothing here imports Ray until a command runs (the ``purecc`` CLI loads this module at start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _ledger_of(args: argparse.Namespace) -> str:
    if getattr(args, "ledger", None):
        return args.ledger
    if getattr(args, "batch", None):
        from .spec import ledger_path_of

        return ledger_path_of(args.batch)
    if os.environ.get("PURECC_LEDGER"):
        return os.environ["PURECC_LEDGER"]
    raise ValueError("no ledger: pass --ledger PATH or --batch BATCH.yaml (or set PURECC_LEDGER)")


def _live(args: argparse.Namespace):
    if args.quiet:
        return None
    from .progress import LiveTable

    return LiveTable()


def _print_summary(ledger: str) -> int:
    from . import api
    from .progress import format_table

    jobs = api.status(ledger)
    print(format_table(jobs, now=time.time()))
    return 1 if any(j.state == "failed" for j in jobs) else 0


def _submit(args: argparse.Namespace) -> int:
    from . import api

    if args.url:                     # over HTTP (services.client), uploading --upload folders first
        from services.client import submit_cli
        return submit_cli(args)
    if args.upload:
        print("error: --upload needs --url (the service to upload to)", file=sys.stderr)
        return 2

    def recorded(ledger: str, r) -> None:
        print(f"ledger {ledger}: {len(r.added)} new, {len(r.unchanged)} unchanged, "
              f"{len(r.replaced)} replaced, {len(r.requeued)} requeued", flush=True)

    live = _live(args) if args.wait else None
    result = api.submit(args.batch_file, replace=args.replace, requeue=args.requeue, run=not args.queue_only,
                        detach=not args.wait, address=args.address, num_cpus=args.num_cpus,
                        max_concurrent=args.max_concurrent, on_tick=live, on_recorded=recorded)
    if result.driver == "none":
        return 0
    if result.driver == "spawned":
        print("started a detached driver; follow it with `purecc status --ledger "
              f"{result.ledger}` (log in {os.path.dirname(os.path.abspath(result.ledger))}/logs)")
        return 0
    if result.driver == "running":
        print("a driver is already running on this ledger; it picks these jobs up", flush=True)
        if not args.wait:
            return 0
        api.wait(result.ledger, on_tick=live)
    return _print_summary(result.ledger)   # after --wait: the final table; 1 if a job failed


def _resume(args: argparse.Namespace) -> int:
    from . import api

    ledger = _ledger_of(args)
    if args.detach:
        started = api.start_driver(ledger, address=args.address, num_cpus=args.num_cpus)
        print(f"driver pid {started.pid}" if started.kind == "process" else f"driver actor {started.name}")
        return 0
    api.resume(ledger, address=args.address, num_cpus=args.num_cpus, max_concurrent=args.max_concurrent,
               on_tick=_live(args))
    return _print_summary(ledger)


def _status(args: argparse.Namespace) -> int:
    from . import api
    from .progress import LiveTable, format_table

    ledger = _ledger_of(args)
    jobs = api.status(ledger, args.concept_id)   # an unknown id is refused before watching
    if args.watch:
        live = LiveTable(interval=args.interval)
        pick = (lambda js: [j for j in js if j.concept_id == args.concept_id]) if args.concept_id else list
        jobs = pick(api.wait(ledger, poll_s=args.interval, on_tick=lambda js: live(pick(js))))
        live.final(jobs)
        return 1 if any(j.state == "failed" for j in jobs) else 0
    if args.json:
        json.dump([j.to_dict() for j in jobs], sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(format_table(jobs, now=time.time()))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from . import api

    print(api.cancel(_ledger_of(args), args.concept_id))
    return 0


def _concepts(args: argparse.Namespace) -> int:
    from . import api

    roots = [args.storage] if args.storage else api.storage_roots(_ledger_of(args))
    found = api.concepts(roots)
    if args.json:
        json.dump([{"concept_id": m.concept_id, "trigger": m.trigger, "stage": m.stage, "steps": m.steps,
                    "base_fingerprint": m.base_fingerprint, "created": m.created} for m in found],
                  sys.stdout, indent=2)
        print()
    else:
        for m in found:
            print(f"{m.concept_id}\ttrigger={m.trigger}\tsteps={m.steps}\tbase={m.base_fingerprint[:12]}")
    return 0


def _ledger_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ledger", help="the SQLite job ledger (default: $PURECC_LEDGER)")
    g.add_argument("--batch", help="a batch file; its ledger is used")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray cluster (default: all)")
    p.add_argument("--max-concurrent", type=int, help="override the batch's max concurrent trainings")
    p.add_argument("--quiet", action="store_true", help="no live progress table")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``purecc`` parser."""
    p = sub.add_parser("submit", help="submit a batch of concepts (YAML/JSON) to Ray Train")
    p.add_argument("batch_file", metavar="BATCH")
    p.add_argument("--wait", action="store_true", help="drive the batch here with live progress until done")
    p.add_argument("--replace", action="store_true", help="retrain concepts whose content changed")
    p.add_argument("--requeue", action="store_true", help="retry failed/cancelled concepts (from checkpoints)")
    p.add_argument("--queue-only", action="store_true", help="only record the jobs; run them later with resume")
    p.add_argument("--url", help="submit to this purecc service over HTTP instead (data relative to its storage)")
    p.add_argument("--token", help="API token for --url (default: $PURECC_TOKEN)")
    p.add_argument("--upload", action="append", metavar="ID=FOLDER",
                   help="with --url: upload FOLDER's images as concept ID's dataset first (repeatable)")
    p.add_argument("--class-word", help="with --upload: the class for template captions, e.g. dog")
    _ray_args(p)
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="state and progress of concept jobs")
    p.add_argument("concept_id", nargs="?", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="update the table in place until no job is active")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between updates of --watch")
    _ledger_args(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("cancel", help="cancel a concept job (idempotent; keeps its last checkpoint)")
    p.add_argument("concept_id", metavar="ID")
    _ledger_args(p)
    p.set_defaults(func=_cancel)

    p = sub.add_parser("resume", help="drive every unfinished job of a ledger (after a driver stopped)")
    _ledger_args(p)
    _ray_args(p)
    p.add_argument("--detach", action="store_true", help="start the driver in the background")
    p.set_defaults(func=_resume)

    p = sub.add_parser("concepts", help="list published concepts")
    _ledger_args(p)
    p.add_argument("--storage", help="a storage root (folder or URI) instead of the ledger's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_concepts)
