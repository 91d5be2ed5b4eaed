"""The `lcmq` command: a thin face over the Python API (and the worker's entry point)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Self, TextIO

from lcmq.errors import InputError, LcmqError, NotFoundError, PermanentError
from lcmq.logs import setup_logging

if TYPE_CHECKING:
    from tqdm import tqdm

    from lcmq.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NOT_FOUND = 3  # the batch, job or schedule named does not exist
# lcmq.models.JobState's values, spelled out so that building the parser imports no SQLAlchemy
# (tests/unit/test_cli_startup.py holds the two equal).
JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")


def lazy_module(name: str) -> ModuleType:
    """The module `name`, executed on its first attribute access (importlib's LazyLoader recipe):
    `lcmq --help` and argument errors print before SQLAlchemy, pydantic and Celery are loaded."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)  # `import lcmq.api` elsewhere finds it as usual
    return module


if TYPE_CHECKING:  # type checkers see the module itself; at run time it loads on first use
    from lcmq import api
else:
    api = lazy_module("lcmq.api")


def get_settings() -> Settings:
    """This process's settings (lcmq.settings, imported when a command first needs them)."""
    from lcmq.settings import get_settings as settings_of_this_process

    return settings_of_this_process()


class Progress:
    """A batch's progress on stderr: a tqdm bar on a terminal; elsewhere (a pipe, a CI log) a plain
    line when the counts change, at most one every `every_s` seconds, and always the last one."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0):
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.tty = self.stream.isatty()
        self.bar: tqdm | None = None  # made at the first status: it needs the total
        self.last_text: str | None = None
        self.last_line_at = float("-inf")

    @staticmethod
    def counts(st: api.BatchStatus) -> str:
        return (
            f"succeeded={st.succeeded} failed={st.failed} canceled={st.canceled} "
            f"running={st.running} queued={st.queued}"
        )

    def __call__(self, st: api.BatchStatus) -> None:
        if self.tty:
            self._draw(st)
        else:
            self._line(st)

    def _draw(self, st: api.BatchStatus) -> None:
        from tqdm import tqdm

        final = st.succeeded + st.failed + st.canceled
        if self.bar is None:  # `initial`: the rate counts what renders while we watch
            self.bar = tqdm(
                total=st.total, initial=final, file=self.stream, unit="img", dynamic_ncols=True, postfix=self.counts(st)
            )
        self.bar.n = final
        self.bar.set_postfix_str(self.counts(st), refresh=False)
        self.bar.refresh()
        if st.done:
            self.close()

    def close(self) -> None:
        """Leave the bar where it is and end its line (the wait may stop before the batch is done)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _line(self, st: api.BatchStatus) -> None:
        text = f"{st.succeeded + st.failed + st.canceled}/{st.total} {self.counts(st)}"
        now = time.monotonic()
        if text == self.last_text or (not st.done and now - self.last_line_at < self.every_s):
            return
        self.last_text, self.last_line_at = text, now
        print(text, file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """A line of its own that the bar, if any, is redrawn below."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def tell_no_worker(self, profile: str) -> None:
        """api.wait's `on_no_worker`: which command would start a worker (the wait goes on)."""
        from lcmq.profiles import queue_name

        self.note(
            f"lcmq: no worker serves {queue_name(profile)} yet; start one with `lcmq worker --model "
            f"{profile}` (still waiting)"
        )


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str))


def _print_status(st: api.BatchStatus, as_json: bool) -> None:
    if as_json:
        _print_json(st.to_dict())
    else:
        print(
            f"batch {st.batch_id}: {st.succeeded}/{st.total} succeeded, {st.failed} failed, "
            f"{st.canceled} canceled, {st.running} running, {st.queued} queued\noutput: {st.output}"
        )
        if st.items is not None:
            print("items: " + " ".join(f"{k}={v}" for k, v in st.items.items()))


# --- commands ---------------------------------------------------------------------------


def cmd_submit(args) -> int:
    if args.timeout is not None and not args.wait:  # it would be ignored: say so before submitting
        raise InputError(args.file, None, "--timeout", "only applies with --wait (how long to wait)")
    st = api.submit(Path(args.file), **_batch_options(args))
    print(st.batch_id, file=sys.stderr if args.json else sys.stdout, flush=True)
    if st.resubmitted and st.canceled:
        _print_canceled_resubmit(st)
    if args.wait:
        with Progress() as progress:
            st = api.wait(
                st.batch_id, on_progress=progress, timeout_s=args.timeout, on_no_worker=progress.tell_no_worker
            )
    if args.json or args.wait:
        _print_status(st, args.json)
    if args.wait:
        return EXIT_OK if st.ok else EXIT_FAILED
    return EXIT_OK


def _print_canceled_resubmit(st: api.BatchStatus) -> None:
    """The same file and parameters name the batch submitted before; a canceled one is not
    rendered again by submitting it again, which would otherwise look like a fresh batch."""
    print(
        f"lcmq: batch {st.batch_id} was submitted before with this file and these parameters, and "
        f"canceled ({st.canceled} of {st.total} jobs); nothing new was submitted. To render its "
        f"canceled jobs: lcmq resume {st.batch_id}",
        file=sys.stderr,
        flush=True,
    )


def _batch_options(args) -> dict:
    """api.submit's keyword arguments from the batch flags (`submit` and `run` take the same)."""
    from lcmq.matrix import parse_axis

    return {
        "model": args.model,
        "steps": args.steps,
        "guidance": args.guidance,
        "negative_prompt": args.negative_prompt or "",
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
        "name": args.name,
        "chunk_size": args.chunk_size,
        "priority": args.priority,
        "idempotency_key": args.idempotency_key,
        "image_format": args.format,
        "quality": args.quality,
        "matrix": [parse_axis(axis, args.file) for axis in args.matrix or ()],
        "loras": None if args.lora is None else [_lora_flag(text, args.file) for text in args.lora],
        "controls": None if args.control is None else [_control_flag(text, args.file) for text in args.control],
    }


def _lora_flag(text: str, source: str) -> dict:
    from lcmq.loras import LoraProblem, parse_lora_flag

    try:
        return parse_lora_flag(text)
    except LoraProblem as exc:
        raise InputError(source, None, "--lora", str(exc)) from None


def _control_flag(text: str, source: str) -> dict:
    from lcmq.controls import ControlProblem, parse_control_flag

    try:
        return parse_control_flag(text)
    except ControlProblem as exc:
        raise InputError(source, None, "--control", str(exc)) from None


def cmd_status(args) -> int:
    if args.watch:
        with Progress() as progress:
            st = api.wait(args.batch, on_progress=progress, on_no_worker=progress.tell_no_worker)
    else:
        st = api.status(args.batch)
    _print_status(st, args.json)
    return EXIT_OK


def cmd_cancel(args) -> int:
    _print_status(api.cancel(args.batch), args.json)
    return EXIT_OK


def cmd_resume(args) -> int:
    _print_status(api.resume(args.batch), args.json)
    return EXIT_OK


def cmd_retry(args) -> int:
    if not args.failed:
        print("lcmq: error: say which jobs to retry: --failed", file=sys.stderr)
        return EXIT_USAGE
    _print_status(api.retry_failed(args.batch), args.json)
    return EXIT_OK


def parse_duration(text: str) -> float:
    """'10s', '2m', '500ms', '1h' or plain seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, suffix = text, "s"
    try:
        value = float(number) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 10s, 2m, 500ms)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return value


# A unit letter alone, and no unit, keep the meaning they had before pydantic's ByteSize read these
# sizes: "6G" is 6 GiB (ByteSize: 6*10^9 bytes) and "100" is 100 MiB (ByteSize: 100 bytes).
_UNIT_LETTERS = {"k": "KiB", "m": "MiB", "g": "GiB", "t": "TiB"}


def parse_memory_mb(text: str) -> int:
    """'6GiB', '6G', '512MiB', '8GB' or '6000MB' (decimal) or plain MiB, as whole MiB."""
    from pydantic import ByteSize, TypeAdapter, ValidationError  # lazy: `lcmq --help` loads no pydantic

    size = text.strip()
    if size[-1:].lower() in _UNIT_LETTERS:
        size = size[:-1] + _UNIT_LETTERS[size[-1].lower()]
    elif size[-1:].isdigit():
        size += "MiB"
    try:
        value = TypeAdapter(ByteSize).validate_python(size) // 2**20
    except ValidationError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (use 6GiB, 512MiB, 8GB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"memory size must be at least 1 MiB: {text!r}")
    return value


def parse_cost(text: str) -> float:
    """A cost per hour: a number >= 0, in any currency."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0.34)") from None
    if not value >= 0 or value == float("inf"):  # NaN compares false
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


def parse_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535: {text!r}")
    return value


def cmd_sweep(args) -> int:
    from scheduler.sweeper import sweep_forever, sweep_once  # the CLI reaches into the producer side

    settings = get_settings()
    repo = api.repository(settings)
    if args.every is None:
        _print_json(sweep_once(repo, settings).to_dict())
        return EXIT_OK
    setup_logging(settings.log_level, settings.log_json)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    sweep_forever(repo, settings, args.every, stop=lambda: stop["now"])
    return EXIT_OK


def cmd_schedule(args) -> int:
    action = args.action
    if action == "add":
        shown = api.schedule_add(
            args.name,
            catalog=args.catalog,
            template=args.template,
            cron=args.cron,
            model=args.model,
            steps=args.steps,
            guidance=args.guidance,
            width=args.width,
            height=args.height,
            negative_prompt=args.negative_prompt or "",
            seed=args.seed,
            image_format=args.format,
            quality=args.quality,
            timezone=args.tz,
        )
    elif action == "list":
        rows = api.schedules()
        if args.json:
            _print_json(rows)
            return EXIT_OK
        print(
            f"{'schedule':20}  {'cron':15}  {'zone':16}  {'state':6}  {'next run (UTC)':19}  {'last batch':16}  items"
        )
        for r in rows:
            items = " ".join(f"{k}={v}" for k, v in (r["items"] or {}).items())
            state = "paused" if r["paused"] else "active"
            print(
                f"{r['name']:20}  {r['cron']:15}  {r['timezone']:16}  {state:6}  "
                f"{str(r['next_run_at'] or '')[:19]:19}  {r['last_batch_id'] or '-':16}  {items}"
                + (f"  error: {r['last_error']}" if r["last_error"] else "")
            )
        return EXIT_OK
    elif action == "rm":
        api.schedule_rm(args.name)
        return EXIT_OK
    elif action == "run":
        st = api.schedule_run(args.name)
        if isinstance(st, api.UnchangedRun):
            return _print_unchanged_run(st, args.json)
        print(st.batch_id, file=sys.stderr if args.json else sys.stdout, flush=True)
        if args.wait:
            st = api.wait(st.batch_id, on_progress=Progress(), timeout_s=args.timeout)
        if args.json or args.wait:
            _print_status(st, args.json)
        return EXIT_FAILED if args.wait and not st.ok else EXIT_OK
    else:  # show, pause, resume
        shown = {"show": api.schedule_show, "pause": api.schedule_pause, "resume": api.schedule_resume}[action](
            args.name
        )
    _print_json(shown)
    return EXIT_OK


def _print_unchanged_run(run: api.UnchangedRun, as_json: bool) -> int:
    """Nothing new or changed: say so; there is no batch to print or wait for."""
    if as_json:
        _print_json(run.to_dict())
    else:
        counts = " ".join(f"{k}={v}" for k, v in run.items.items())
        print(f"schedule {run.schedule}: unchanged, nothing submitted (nothing new or changed)")
        print(f"items: {counts}")
    return EXIT_OK


def cmd_scheduler(args) -> int:
    import threading

    from scheduler.service import run_scheduler  # the CLI reaches into the producer side

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_scheduler(api.repository(settings), api.storage(settings), settings, stop)
    return EXIT_OK


def cmd_manifest(args) -> int:
    from lcmq.manifest import line

    for record in api.manifest(args.batch):
        print(line(record))  # byte for byte a line of the batch's manifest.jsonl
    return EXIT_OK


def cmd_jobs(args) -> int:
    for job in api.jobs(args.batch, args.state):
        if args.json:
            print(json.dumps(job))
            continue
        outcome = job["error"] or job["url"] or ""
        print(
            f"{job['index']:>7}  {job['state']:<9}  attempts={job['attempts']}  {job['worker'] or '-':<24}  {outcome}"
        )
    return EXIT_OK


def cmd_webhooks(args) -> int:
    deliveries = api.webhook_deliveries(args.batch)
    if args.json:
        _print_json(deliveries)
        return EXIT_OK
    if not deliveries:
        print(f"batch {args.batch}: no webhook delivery (none set, or the batch is not final yet)")
    for d in deliveries:
        when = f"delivered {d['delivered_at']}" if d["delivered_at"] else f"next attempt {d['next_attempt_at'] or '-'}"
        print(f"{d['id']}  {d['event']}  {d['state']:<9}  attempts={d['attempts']}  {when}  {d['url']}")
        for attempt in d["history"]:
            outcome = attempt["error"] if attempt["error"] else f"HTTP {attempt['status_code']}"
            print(f"    {attempt['attempted_at']}  {outcome}  {attempt['duration_ms']:.0f} ms")
    return EXIT_OK


def cmd_export(args) -> int:
    _print_json(api.export(args.batch, format=args.format, to=args.to, shard_size=args.shard_size))
    return EXIT_OK


def cmd_batches(args) -> int:
    rows = api.batches(args.limit)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    print(f"{'batch':16}  {'created':19}  {'profile':10}  {'done':>11}  {'failed':>6}  {'canceled':>8}  name")
    for r in rows:
        print(
            f"{r['batch_id']:16}  {r['created_at'][:19]:19}  {r['profile']:10}  "
            f"{r['succeeded']:>5}/{r['total']:<5}  {r['failed']:>6}  {r['canceled']:>8}  {r['name'] or ''}"
        )
    return EXIT_OK


def cmd_api(args) -> int:
    """The HTTP API and dashboard (lcmq.http), until SIGTERM/SIGINT."""
    from lcmq.http.server import serve

    return serve(get_settings(), args.host, args.port, signin_link=not args.no_signin_link)


def cmd_apikey(args) -> int:
    """Keys of the HTTP API. `create` prints the key once, as its last line, and the webhook
    secret that signs the key's webhooks; only the key's hash is stored."""
    from lcmq import access

    repo = api.repository()
    if args.action == "create":
        new = access.create_key(repo, args.name, admin=args.admin)
        print(f"API key {new.name!r} created{' (admin: sees every batch)' if new.admin else ''}.", file=sys.stderr)
        print("Webhook signing secret (shown once):", file=sys.stderr)
        print(new.webhook_secret)
        print("API key (shown once; send it as `Authorization: Bearer <key>`):", file=sys.stderr)
        print(new.key)
    elif args.action == "list":
        rows = [
            {
                "name": k.name,
                "admin": k.admin,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in access.list_keys(repo)
        ]
        if args.json:
            _print_json(rows)
        for r in [] if args.json else rows:
            state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "valid"
            print(f"{r['name']:24} {'admin' if r['admin'] else 'key':5} {state:34} created {r['created_at']}")
    else:
        access.revoke_key(repo, args.name)
        print(f"API key {args.name!r} revoked: its next request is refused.", file=sys.stderr)
    return EXIT_OK


def cmd_workertoken(args) -> int:
    """Tokens of edge workers (docs/edge.md). `create` prints the token once, as its last line;
    only its hash is stored."""
    from lcmq import workertokens

    repo = api.repository()
    if args.action == "create":
        new = workertokens.create_token(repo, args.name, workertokens.parse_profiles(args.profiles), args.cost_per_hour)
        cost = "" if new.cost_per_hour is None else f", {new.cost_per_hour:g} per hour"
        print(f"Worker token {new.name!r} created (profiles {', '.join(new.profiles)}{cost}).", file=sys.stderr)
        print("Worker token (shown once; `lcmq worker --gateway URL --token <token>`):", file=sys.stderr)
        print(new.token)
    elif args.action == "list":
        rows: list[dict[str, Any]] = [
            {
                "name": t.name,
                "profiles": t.profiles,
                "cost_per_hour": t.cost_per_hour,
                "state": t.state,
                "failures_in_a_row": t.failures_in_a_row,
                "created_at": t.created_at.isoformat(),
                "last_claim_at": t.last_claim_at.isoformat() if t.last_claim_at else None,
                "paused_at": t.paused_at.isoformat() if t.paused_at else None,
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in workertokens.list_tokens(repo)
        ]
        if args.json:
            _print_json(rows)
        for r in [] if args.json else rows:
            cost = "-" if r["cost_per_hour"] is None else f"{r['cost_per_hour']:g}/h"
            print(
                f"{r['name']:24} {r['state']:8} {','.join(r['profiles']):20} {cost:>8} "
                f"failures={r['failures_in_a_row']:<3} last claim {r['last_claim_at'] or '-'}"
            )
    elif args.action == "revoke":
        released = workertokens.revoke_token(repo, args.name)
        print(
            f"Worker token {args.name!r} revoked: its next request is refused; "
            f"{released} running job(s) released to the queue.",
            file=sys.stderr,
        )
    else:
        workertokens.resume_token(repo, args.name)
        print(f"Worker token {args.name!r} resumed: its workers claim jobs again.", file=sys.stderr)
    return EXIT_OK


def cmd_models(args) -> int:
    rows = api.models()
    if args.json:
        _print_json(rows)
        return EXIT_OK
    for r in rows:
        print(
            f"{r['name']:10} {r['family']:6} {r['width']}x{r['height']} steps={r['steps']} "
            f"base={r['base']} lcm_lora={r['lcm_lora']}"
        )
    return EXIT_OK


def cmd_models_push(args) -> int:
    pushed = api.push_model(args.name, Path(args.dir), args.to)
    if args.json:
        _print_json(pushed)
        return EXIT_OK
    print(f"pushed {pushed['name']}: {pushed['files']} file(s), {pushed['bytes']:,} bytes", file=sys.stderr)
    print(pushed["url"])
    return EXIT_OK


def cmd_db(args) -> int:
    from lcmq.migrate import current, upgrade

    url = get_settings().database_url_resolved
    if args.action == "upgrade":
        upgrade(url)
    print(f"database at revision {current(url)}")
    return EXIT_OK


def cmd_worker(args) -> int:
    if args.gateway or args.token:
        return _edge_worker(args)
    from worker.main import run_worker  # the CLI is the one place that reaches into worker/

    run_worker(
        args.model,
        concurrency=args.concurrency,
        pool=args.pool,
        batch_size=args.batch_size,
        device=args.device,
        name=args.name,
        max_memory_mb=args.max_memory,
        cost_per_hour=args.cost_per_hour,
        metrics_port=args.metrics_port,
    )
    return EXIT_OK


EDGE_NODE_PATTERN = r"[A-Za-z0-9._@-]{1,100}"  # the gateway's rule for the node an edge worker names
# Flags of a Celery worker that an edge worker has no use for (its gateway decides, or the token's cost).
CELERY_ONLY_FLAGS = {
    "concurrency": 1,
    "pool": "prefork",
    "cost_per_hour": None,
    "metrics_port": None,
    "max_memory": None,
}


def _edge_worker(args) -> int:
    """`lcmq worker --gateway URL --token T`: no Celery, no database, no broker, no bucket."""
    from worker.main import run_edge

    if not (args.gateway and args.token):
        raise InputError(
            "lcmq worker",
            None,
            "--gateway" if args.token else "--token",
            "an edge worker needs both --gateway URL and --token T",
        )
    if not args.gateway.startswith(("https://", "http://")):
        raise InputError("lcmq worker", None, "--gateway", f"must be an http(s):// URL (got {args.gateway!r})")
    if extra := [f"--{k.replace('_', '-')}" for k, default in CELERY_ONLY_FLAGS.items() if getattr(args, k) != default]:
        raise InputError(
            "lcmq worker", None, extra[0], "is for Celery workers; an edge worker's gateway and token decide"
        )
    if args.name is not None and not re.fullmatch(EDGE_NODE_PATTERN, args.name):
        raise InputError("lcmq worker", None, "--name", "an edge worker's name is 1-100 of A-Z a-z 0-9 . _ @ -")
    run_edge(
        args.model,
        gateway=args.gateway,
        token=args.token,
        grace_s=args.grace_s,
        batch_size=args.batch_size,
        device=args.device,
        name=args.name,
    )
    return EXIT_OK


def cmd_workers(args) -> int:
    rows = api.workers(include_stopped=args.all)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    print(
        f"{'node':40}  {'state':7}  {'profile':10}  {'device':6}  {'batch':>5}  {'images':>8}  {'img/s':>7}  "
        f"{'cost/1k':>8}  {'load_s':>7}  models"
    )
    for r in rows:
        rate = f"{r['images_per_s']:.2f}" if r["images_per_s"] is not None else "-"
        cost = f"{r['cost_per_1000_images']:.4f}" if r["cost_per_1000_images"] is not None else "-"
        load = f"{r['load_s']:.1f}" if r["load_s"] is not None else "-"
        print(
            f"{r['node']:40}  {r['state']:7}  {r['profile']:10}  {r['device']:6}  {r['batch_size'] or '-':>5}  "
            f"{r['images']:>8}  {rate:>7}  {cost:>8}  {load:>7}  {r['model_cache'] or '-'}"
        )
    return EXIT_OK


def _figure(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def cmd_report(args) -> int:
    report = api.report(args.batch)
    if args.json:
        _print_json(report)
        return EXIT_OK
    state = "done" if report["done"] else "still rendering: the images so far"
    print(f"batch {report['batch_id']} ({report['profile']}, {state})")
    print(
        f"images {report['images']}/{report['total']}  failed {report['failed']}  "
        f"wall {_figure(report['wall_s'], '{:.1f}')} s  GPU-busy {report['gpu_busy_s']:.1f} s  "
        f"images/s {_figure(report['images_per_s'], '{:.3f}')}"
    )
    print(
        f"cost {_figure(report['cost'], '{:.4f}')}  "
        f"per 1,000 images {_figure(report['cost_per_1000_images'], '{:.4f}')}  "
        f"images per dollar {_figure(report['images_per_dollar'], '{:.1f}')}"
    )
    if report["unpriced_workers"] and report["cost"] is not None:
        print(f"(without the images of {len(report['unpriced_workers'])} worker(s) that have no --cost-per-hour)")
    print(
        f"\n{'worker':40}  {'images':>7}  {'busy s':>8}  {'GPU s':>8}  {'img/s':>7}  {'cost/h':>7}  {'cost':>9}  img/$"
    )
    for w in report["workers"]:
        print(
            f"{w['worker']:40}  {w['images']:>7}  {w['busy_s']:>8.1f}  {w['gpu_busy_s']:>8.1f}  "
            f"{_figure(w['images_per_s'], '{:.3f}'):>7}  {_figure(w['cost_per_hour'], '{:.3f}'):>7}  "
            f"{_figure(w['cost'], '{:.5f}'):>9}  {_figure(w['images_per_dollar'], '{:.1f}')}"
        )
    return EXIT_OK


def cmd_run(args) -> int:
    """Render a prompt file on this machine in one command: submit, a worker, progress, stop."""
    return _render_here(Path(args.file), _batch_options(args), args.timeout)


def cmd_demo(args) -> int:
    """Render the sample batch (on the embedded default unless LCMQ_* say otherwise)."""
    prompts = resources.files("lcmq") / "samples" / "demo_prompts.txt"
    with resources.as_file(prompts) as path:
        return _render_here(path, {"model": args.model, "seed": 0, "name": "demo"}, args.timeout)


class WorkerExited(PermanentError):
    """The worker `lcmq run` started is gone before the batch is done."""

    def __init__(self, returncode: int):
        super().__init__(f"the worker exited with code {returncode} before the batch was done")


def _render_here(path: Path, options: dict, timeout_s: float | None) -> int:
    """Submit the file, then run a worker of its profile as a child process until the batch is
    final (`lcmq run`, `lcmq demo`). The child has this process's settings: the embedded default,
    or the Postgres, Redis and S3 that LCMQ_* name. A file with a mistake starts no worker."""
    st = api.submit(path, **options)
    model = options["model"]
    if not st.done:
        worker, log_path = _start_worker(model)
        where = f"; its log: {log_path}" if log_path else ""
        print(
            f"batch {st.batch_id}: {st.total} jobs on profile {model!r}, a worker is starting{where}",
            file=sys.stderr,
            flush=True,
        )
        try:
            with Progress() as progress:
                st = api.wait(st.batch_id, on_progress=_while_alive(worker, progress), timeout_s=timeout_s)
        except WorkerExited as exc:
            print(f"lcmq: error: {exc}{where}{_tail(log_path)}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print(
                f"\nlcmq: stopped; the jobs not done stay queued (run the same command again to go on, or "
                f"`lcmq cancel {st.batch_id}`)",
                file=sys.stderr,
            )
            raise
        finally:
            _stop(worker)
    return _report_rendered(st, model, timeout_s)


def _start_worker(model: str) -> tuple[subprocess.Popen, Path | None]:
    """`lcmq worker --model MODEL` as a child in its own session; its output goes to a log file
    under LCMQ_HOME (a user sees lcmq's lines, not Celery's), or here with LCMQ_LOG_LEVEL=DEBUG."""
    settings = get_settings()
    command = [sys.executable, "-m", "lcmq", "worker", "--model", model]
    if settings.log_level.upper() == "DEBUG":
        return subprocess.Popen(command, start_new_session=True), None
    log_path = settings.home / "logs" / f"worker-{model}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:  # the child holds its own descriptor of it
        worker = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return worker, log_path


def _while_alive(worker: subprocess.Popen, progress: Progress) -> Callable[[api.BatchStatus], None]:
    """An `on_progress` that draws, and stops the wait when the worker is gone."""

    def on_progress(st: api.BatchStatus) -> None:
        progress(st)
        returncode = worker.poll()
        if returncode is not None and not st.done:
            raise WorkerExited(returncode)

    return on_progress


def _tail(log_path: Path | None, lines: int = 15) -> str:
    if log_path is None or not log_path.exists():
        return ""
    last = log_path.read_text(errors="replace").splitlines()[-lines:]
    return "\n" + "\n".join(f"  | {line}" for line in last)


def _report_rendered(st: api.BatchStatus, model: str, timeout_s: float | None) -> int:
    """What `run` and `demo` print at the end: the counts, and where the images are (once)."""
    print(f"batch {st.batch_id}: {st.succeeded}/{st.total} succeeded, {st.failed} failed, {st.canceled} canceled")
    if not st.done:
        print(
            f"lcmq: gave up after {timeout_s:g} s with {st.queued + st.running} jobs not done; they stay queued "
            f"for the next `lcmq run` of this file or `lcmq worker --model {model}`",
            file=sys.stderr,
        )
    if st.failed:
        print(f"why they failed: lcmq jobs {st.batch_id} --state failed", file=sys.stderr)
    print(f"images are in {st.output}")
    return EXIT_OK if st.ok else EXIT_FAILED


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the Celery parent: a warm shutdown stops its children
    deadline = time.monotonic() + grace_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:  # a second Ctrl-C: no warm shutdown, but no worker left behind either
        pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- parser -----------------------------------------------------------------------------


def _add_render_flags(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The model and job parameters a batch and a schedule both take."""
    p.add_argument("--model", required=True, help="model profile (see `lcmq models`)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--negative-prompt")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--seed", type=int, help=seed_help)
    p.add_argument("--format", default="png", help="image format: png (default), webp or jpeg")
    p.add_argument("--quality", type=int, help="webp/jpeg quality, 1-100 (default 90)")


def _add_batch_flags(p: argparse.ArgumentParser) -> None:
    """A batch file and its flags (`submit` and `run`)."""
    p.add_argument("file", help=".txt (a prompt per line), .jsonl or .csv")
    _add_render_flags(p, seed_help="batch seed; a row without its own seed derives one from it")
    p.add_argument("--name")
    p.add_argument("--chunk-size", type=int, help="jobs per queue message")
    p.add_argument("--priority", type=int, default=0, help="0-9, 9 most urgent (default 0)")
    p.add_argument(
        "--idempotency-key",
        help="default: a hash of the file, profile and parameters; "
        "submitting the same key again returns the existing batch",
    )
    p.add_argument(
        "--matrix",
        action="append",
        metavar="NAME=VALUES",
        help="multiply every row: seed=0..3, steps=4,6, guidance=1,1.5, or a text field that "
        "fills {NAME} in the prompt (style=oil,ink); repeat for more axes",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH[:WEIGHT]",
        help="a style LoRA for every row without its own `loras` (a .safetensors file or folder, "
        "local or s3://; weight -2..2, default 1); repeat for more",
    )
    p.add_argument(
        "--control",
        action="append",
        metavar="NAME=IMAGE[:SCALE]",
        help="a ControlNet / T2I-Adapter of the profile's [controls] with its control image (a file "
        "or s3://; scale 0..2) for every row without its own `control`; repeat for more",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcmq", description="Batch rendering queue for LCM-LoRA diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="validate a prompt file and enqueue it as a batch")
    _add_batch_flags(p)
    p.add_argument("--wait", action="store_true", help="block until every job is final")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the batch status as one JSON line")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="job counts of a batch")
    p.add_argument("batch")
    p.add_argument("--watch", action="store_true", help="draw a progress bar until the batch is done")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    for name, func, text in (
        ("cancel", cmd_cancel, "queued jobs never start; running ones stop soon"),
        ("resume", cmd_resume, "re-enqueue the jobs of a batch that are not final"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("batch")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("retry", help="give failed jobs a fresh set of attempts")
    p.add_argument("batch")
    p.add_argument("--failed", action="store_true", help="retry the failed jobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("sweep", help="requeue jobs of dead workers and publish lost messages")
    p.add_argument("--every", type=parse_duration, help="keep sweeping at this interval (e.g. 10s)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("schedule", help="catalogs rendered on a cron schedule (only what changed)")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add", help="render a catalog (CSV/JSONL with an id column) on a cron schedule")
    a.add_argument("name", help="names the schedule and the folder of its images: <storage>/<name>/<id>.png")
    a.add_argument("--catalog", required=True, help="a .csv/.jsonl path or s3:// URL, read afresh at each run")
    a.add_argument(
        "--template",
        required=True,
        help='prompt template over the item\'s columns, e.g. "{name}, {color}, studio photo on white"',
    )
    a.add_argument(
        "--cron", required=True, help='5 fields in --tz local time, e.g. "0 6 * * mon-fri"; or @hourly, @daily, ...'
    )
    a.add_argument(
        "--tz",
        default="UTC",
        help="IANA time zone of the cron fields, e.g. Europe/Berlin "
        "(default UTC); DST-correct: 06:00 stays 06:00 local",
    )
    _add_render_flags(a, seed_help="base seed; an item without its own seed derives one from its id")
    a.set_defaults(func=cmd_schedule)
    a = actions.add_parser("list", help="schedules with their next and last runs")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_schedule)
    for action, text in (
        ("show", "a schedule and its catalog's state, as JSON"),
        ("pause", "stop firing"),
        ("resume", "fire again, from the next cron time"),
        ("rm", "forget the schedule (its batches and images stay)"),
    ):
        a = actions.add_parser(action, help=text)
        a.add_argument("name")
        a.set_defaults(func=cmd_schedule)
    a = actions.add_parser(
        "run", help="run now, once: a batch of the new and changed items (none, and 'unchanged', when there are none)"
    )
    a.add_argument("name")
    a.add_argument("--wait", action="store_true", help="block until every job is final")
    a.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    a.add_argument("--json", action="store_true", help="print the batch status (with its item counts) as JSON")
    a.set_defaults(func=cmd_schedule)

    p = sub.add_parser("scheduler", help="fire due schedules and sweep, until SIGTERM/SIGINT")
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("manifest", help="one JSON line per succeeded image")
    p.add_argument("batch")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("jobs", help="what happened to each job of a batch: state, attempts, worker, image or error")
    p.add_argument("batch")
    p.add_argument("--state", choices=JOB_STATES, help="only the jobs in this state")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("webhooks", help="a batch's webhook deliveries and every attempt (status code or error)")
    p.add_argument("batch")
    p.add_argument("--json", action="store_true", help="the deliveries, with their bodies and attempts, as JSON")
    p.set_defaults(func=cmd_webhooks)

    p = sub.add_parser("export", help="write a finished batch as a dataset (imagefolder or webdataset)")
    p.add_argument("batch")
    p.add_argument("--format", required=True, help="imagefolder or webdataset")
    p.add_argument("--to", required=True, help="an empty folder, or s3://bucket/prefix")
    p.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per tar shard (default 1000)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("batches", help="recent batches with their counts")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_batches)

    p = sub.add_parser("api", help="the HTTP API and dashboard, until SIGTERM/SIGINT")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--no-signin-link", action="store_true", help="do not make and print the dashboard's sign-in link")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("apikey", help="keys of the HTTP API (lcmq api)")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("create", help="make a key; prints it once, as the last line")
    a.add_argument("name", help="names the key in lists and logs (the key itself is never shown again)")
    a.add_argument("--admin", action="store_true", help="sees every batch, the CLI's and other keys' too")
    a.set_defaults(func=cmd_apikey)
    a = actions.add_parser("list", help="keys with their state (never the keys themselves)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_apikey)
    a = actions.add_parser("revoke", help="refuse the key from its next request on, in every API process")
    a.add_argument("name")
    a.set_defaults(func=cmd_apikey)

    p = sub.add_parser("workertoken", help="tokens of edge workers (lcmq worker --gateway)")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("create", help="make a token; prints it once, as the last line")
    a.add_argument("name", help="names the token in lists, logs and its workers' names")
    a.add_argument("--profiles", required=True, help="the profiles its workers may claim, e.g. sd15,sdxl")
    a.add_argument("--cost-per-hour", type=float, help="what one of its machines costs an hour (images per dollar)")
    a.set_defaults(func=cmd_workertoken)
    a = actions.add_parser("list", help="tokens with their state (never the tokens themselves)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_workertoken)
    a = actions.add_parser("revoke", help="refuse the token at once and release its running jobs")
    a.add_argument("name")
    a.set_defaults(func=cmd_workertoken)
    a = actions.add_parser("resume", help="unpause a token paused after too many failed jobs in a row")
    a.add_argument("name")
    a.set_defaults(func=cmd_workertoken)

    p = sub.add_parser("models", help="model profiles this install knows; `models push` uploads a model to S3")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    actions = p.add_subparsers(dest="action")  # optional: plain `lcmq models` lists the profiles
    a = actions.add_parser("push", help="upload a local model and its sha256 manifest to S3; prints its s3:// URL")
    a.add_argument("name", help="the model's name: its folder under <storage root>/models/")
    a.add_argument("dir", help="a diffusers folder, a LoRA folder, or one .safetensors/.ckpt file")
    a.add_argument("--to", metavar="URL", help="s3://bucket/prefix/ to push to (default <storage root>/models/NAME/)")
    a.add_argument("--json", action="store_true", help="print url, name, kind, files and bytes as JSON")
    a.set_defaults(func=cmd_models_push)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade", "current"])
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("worker", help="a Celery worker pinned to one model profile")
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, help="images per pipeline call")
    p.add_argument("--concurrency", type=int, default=1, help="processes; each pins its own pipeline")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--max-memory",
        type=parse_memory_mb,
        metavar="SIZE",
        help="memory budget per process (6GiB, 512MiB): the largest batch size up to --batch-size "
        "that fits, probed at start (LCMQ_MAX_MEMORY_MB)",
    )
    p.add_argument("--name", help="Celery node name (default <profile>-<pid>@<host>)")
    p.add_argument(
        "--cost-per-hour",
        type=parse_cost,
        metavar="COST",
        help="what this worker costs per hour, any currency (e.g. 0.34); `lcmq workers` shows its cost per "
        "1,000 images",
    )
    p.add_argument(
        "--metrics-port",
        type=parse_port,
        metavar="N",
        help="serve Prometheus metrics on 0.0.0.0:N (prefork: pool process i on N+i)",
    )
    p.add_argument(
        "--gateway",
        metavar="URL",
        help="an edge worker: pull jobs from this lcmq api over HTTP(S) (no database, broker or bucket "
        "settings; needs --token)",
    )
    p.add_argument("--token", metavar="T", help="the edge worker's token (`lcmq workertoken create`)")
    p.add_argument(
        "--grace-s",
        type=float,
        default=20.0,
        metavar="S",
        help="edge worker: on SIGTERM, seconds to finish, upload and record the micro-batch being rendered",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("workers", help="the farm's worker processes: live, stale, images/s, cost per 1,000 images")
    p.add_argument("--all", action="store_true", help="stopped workers too")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per worker process")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("report", help="a batch's images per second and, with worker costs, images per dollar")
    p.add_argument("batch")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="render a prompt file on this machine: submit, a worker, progress, stop")
    _add_batch_flags(p)
    p.add_argument("--timeout", type=float, help="give up after this many seconds (the rest stays queued)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="render the sample batch with a worker of its own")
    p.add_argument("--model", default="tiny")
    p.add_argument("--timeout", type=float, default=900)
    p.set_defaults(func=cmd_demo)
    return parser


def _debug_wanted() -> bool:
    """LCMQ_LOG_LEVEL=DEBUG (or log_level = "DEBUG" in lcmq.toml): show an error's traceback."""
    try:
        return get_settings().log_level.upper() == "DEBUG"
    except (LcmqError, OSError):  # the settings are what failed: the variable alone decides
        return os.environ.get("LCMQ_LOG_LEVEL", "").upper() == "DEBUG"


def _error_message(exc: Exception) -> str:
    if isinstance(exc, LcmqError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # a file the user named: missing, unreadable, a folder
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"unexpected {type(exc).__name__}: {exc}"


def _exit_code(exc: Exception) -> int:
    if isinstance(exc, InputError):
        return EXIT_USAGE
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_FAILED


def report_error(exc: Exception) -> int:
    """An error as the user sees it: `lcmq: error: …` on stderr and its exit code (2 for input, 3
    for an unknown id, 1 for the rest). No traceback unless LCMQ_LOG_LEVEL=DEBUG: a mistake is not
    a crash, and a crash says how to see where it happened."""
    import traceback

    debug = _debug_wanted()
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if debug or isinstance(exc, (LcmqError, OSError)) else " (LCMQ_LOG_LEVEL=DEBUG shows where)"
    print(f"lcmq: error: {_error_message(exc)}{hint}", file=sys.stderr)
    return _exit_code(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "worker":  # the worker sets up its own logging
            settings = get_settings()
            quiet = "WARNING" if settings.log_level.upper() == "INFO" else settings.log_level
            setup_logging(quiet, settings.log_json)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lcmq manifest | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the face: every error becomes a message and an exit code
        return report_error(exc)
