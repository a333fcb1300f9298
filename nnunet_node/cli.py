"""``nnunet-node``: the command line (a composition root: it may import every package).

Each sub-command imports what it needs only when chosen, so ``nnunet-node db upgrade`` does not
load torch. Every setting comes from the environment (the README's configuration table); a bad
one, or a port that is taken, stops the command with one line naming the variable to change.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import socket
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from nnunet_node.core.errors import ConfigError
from nnunet_node.core.logging import configure_logging
from nnunet_node.core.settings import Settings, load_settings

DESCRIPTION = """\
A DICOM node that runs nnU-Net models. Scanners and PACS send it series (DICOM C-STORE or
DICOMweb STOW-RS); each series a routing rule matches, and each HTTP request, becomes a job that
writes NIfTI, DICOM-SEG and RTSTRUCT and can send them on to a PACS.

Settings are environment variables (see the README's configuration table), for example
MODEL_SERVE_SPEC (models, peers and rules), NNUNET_NODE_DATA (archive and database),
NNUNET_SERVE_PORT (HTTP, default 12345), NNUNET_NODE_DICOM_PORT (DICOM, default 11112).
"""

EPILOG = """\
first steps:
  nnunet-node serve      start everything (what `make run` does)
  nnunet-node demo       in a second terminal: send a phantom study, watch its result arrive
  nnunet-node <command> --help   for the options of one command
"""


def _port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound because something listens there (0: never)."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return False


def check_ports(settings: Settings, *, http: tuple[str, int] | None) -> None:
    """Refuse to start when a port the node needs is taken, naming the setting to change.

    (uvicorn would bind only after start-up and report it in a traceback; pynetdicom too.)
    """
    wanted: list[tuple[str, int, str]] = []
    if http is not None:
        wanted.append((http[0], http[1], "NNUNET_SERVE_PORT (or --port)"))
    if settings.dicom_enabled:
        wanted.append((settings.dicom_host, settings.dicom_port, "NNUNET_NODE_DICOM_PORT"))
        if settings.dicom_tls_port is not None:
            wanted.append(
                (settings.dicom_host, settings.dicom_tls_port, "NNUNET_NODE_DICOM_TLS_PORT")
            )
    for host, port, variable in wanted:
        if _port_in_use(host, port):
            raise ConfigError(
                f"port {port} on {host} is already in use (another node or program): "
                f"set {variable} to a free port"
            )


def _freeze_start_up_objects(*_: object) -> None:
    """Leave what start-up made (the imported modules: torch, nnU-Net, pydicom... ~400k tracked
    objects) out of every later garbage collection: a full collection then takes well under a
    millisecond instead of 100-300 ms with the GIL held, during which every association and
    request of the process waits (``gc.freeze``)."""
    gc.collect()
    gc.freeze()


class _StartErrorInOneLine:
    """The HTTP app for uvicorn, except that a ConfigError which stops the app's start-up (a
    wrong spec, a data folder that cannot be made: the lifespan keeps it in
    ``app.state.start_error``) is not logged as Starlette's traceback of it: :func:`main`
    prints it in one line, as it does for a bad setting."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_without_traceback(message: Any) -> None:
            failed = message["type"] == "lifespan.startup.failed"
            if failed and self.app.state.start_error is not None:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_without_traceback)


class _StartFailureLine(logging.Filter):
    """Drops uvicorn's ERROR "Application startup failed. Exiting." when the start-up failed on
    a ConfigError (``app.state.start_error``): :func:`main` says what failed in one line, and an
    ERROR line before it read as a second, unexplained failure."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            self.app.state.start_error is not None
            and record.getMessage().startswith("Application startup failed")
        )


def _graceful_server(config: Any, app: Any) -> Any:
    """uvicorn's server for ``app`` (the node's, :mod:`nnunet_node.app`), which also stops the
    DICOM node gracefully (node/service.py): when a signal ends the main loop (checked every
    0.1 s), the DICOM ports close and the receivers are told before uvicorn closes its own
    connections; the app's lifespan then waits for the associations open, for what is left of
    ``NNUNET_NODE_DICOM_STOP_GRACE_S``; a second SIGTERM or SIGINT aborts them. The signal
    handler only sets flags (no lock: a lock the interrupted thread holds would deadlock)."""
    import uvicorn

    from nnunet_node.node.service import DimseService

    def dimse() -> DimseService | None:
        service = app.state.services.get("dimse")
        return service if isinstance(service, DimseService) else None

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            again = self.should_exit
            super().handle_exit(sig, frame)
            service = dimse()
            if again and service is not None:
                service.abort_stop()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            service = dimse()
            if service is not None:
                await asyncio.to_thread(service.begin_stop)
            await super().shutdown(sockets)

    return GracefulServer(config)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from nnunet_node.app import create_app

    host = args.host or settings.http_host
    port = args.port or settings.http_port
    check_ports(settings, http=(host, port))
    app = create_app(settings)
    tls: dict[str, str] = {}
    if settings.https:
        assert settings.tls_cert is not None and settings.tls_key is not None
        tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    server = _graceful_server(
        uvicorn.Config(
            _StartErrorInOneLine(app),
            host=host,
            port=port,
            log_config=None,  # the node's handler and format (core/logging.py)
            log_level=None,
            **tls,  # type: ignore[arg-type]
        ),
        app,
    )
    logging.getLogger("uvicorn.error").addFilter(_StartFailureLine(app))
    _freeze_start_up_objects()
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn raises it again once it has stopped
        pass
    except SystemExit:  # uvicorn's exit (status 3) when the app's start-up failed
        if app.state.start_error is not None:
            raise app.state.start_error from None  # main() prints it in one line
        raise
    return 0


def _dicom(settings: Settings, args: argparse.Namespace) -> int:
    from nnunet_node.node.service import run_standalone

    check_ports(settings, http=None)
    return run_standalone(settings, ready=_freeze_start_up_objects)


def _refuse(command: str, message: str) -> int:
    """Print why ``nnunet-node <command>`` refuses its options; the exit status for it (2)."""
    print(f"nnunet-node {command}: {message}", file=sys.stderr)
    return 2


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import os

    if args.concurrency != 1:
        return _refuse(
            "worker",
            "--concurrency must be 1 (one job at a time per process); start one worker per GPU",
        )
    device = args.device or settings.device
    mode = device
    if device.startswith("cuda:"):
        # One GPU per process: make it the only visible one, before torch is imported.
        index = device.split(":", 1)[1]
        if not index.isdigit():
            return _refuse("worker", f"--device {device!r}: expected cuda:<index>")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            listed = [v.strip() for v in visible.split(",") if v.strip()]
            if int(index) >= len(listed):
                return _refuse(
                    "worker",
                    f"--device {device}: CUDA_VISIBLE_DEVICES={visible} "
                    f"lists {len(listed)} device(s)",
                )
            index = listed[int(index)]
        os.environ["CUDA_VISIBLE_DEVICES"] = index
        mode = "cuda"
    if mode not in ("auto", "cpu", "cuda"):
        return _refuse("worker", f"--device {device!r}: auto, cpu, cuda or cuda:<index>")
    settings = settings.model_copy(update={"device": mode})
    queues = [q.strip() for q in (args.queues or settings.default_queue).split(",") if q.strip()]
    from nnunet_node.core.settings import check_queue_name

    try:
        queues = [check_queue_name(q) for q in queues]
    except ValueError as exc:
        return _refuse("worker", f"--queues: {exc}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from nnunet_node.pipeline.celery_worker import WorkerOptions, default_name, run_worker

    options = WorkerOptions(name=args.name or default_name(), queues=queues, device=device)
    return run_worker(settings, options)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from nnunet_node.node.demo import run_demo

    return run_demo(settings, host=args.host, port=args.port, http_port=args.http_port)


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from nnunet_node.storage.migrations import current, downgrade, safe_url, upgrade

    if (
        args.action == "downgrade"
        and args.revision is None
        and current(settings.database_url) is None
    ):
        print(
            "nnunet-node db downgrade: the database has no migration applied: nothing to undo",
            file=sys.stderr,
        )
        return 2
    try:
        if args.action == "upgrade":
            upgrade(settings.database_url, args.revision or "head")
        else:
            downgrade(settings.database_url, args.revision or "-1")
    except CommandError as exc:  # an unknown revision, or none below the base
        print(f"nnunet-node db {args.action}: {exc}", file=sys.stderr)
        return 2
    print(f"database {safe_url(settings.database_url)}: {args.action} done")
    return 0


def _help(text: str) -> str:
    return textwrap.dedent(text).strip()


Command = Callable[[Settings, argparse.Namespace], int]


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Command,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """The sub-command ``name``: ``summary`` in the list of commands, ``description`` (dedented)
    in its ``--help``; choosing it runs ``func(settings, args)``, whose result is the exit
    status."""
    command = sub.add_parser(name, help=summary, description=_help(description))
    command.set_defaults(func=func)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-node",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    serve = _command(
        sub,
        "serve",
        _serve,
        "start the node: HTTP API, DICOM node and job workers",
        """
        Start the whole node in one process: the HTTP API (reference endpoints, jobs,
        DICOMweb, docs at /docs), the DICOM node (C-STORE, C-FIND, C-MOVE, C-GET) and the job
        workers. The database is migrated first. Stop it with Ctrl-C.
        """,
    )
    serve.add_argument(
        "--host", default=None, help="HTTP address to listen on (default: NNUNET_NODE_HOST)"
    )
    serve.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: NNUNET_SERVE_PORT, 12345)"
    )

    _command(
        sub,
        "dicom",
        _dicom,
        "start the DICOM node and job workers only (no HTTP API)",
        """
        Start the DICOM node and the job workers without the HTTP API: series received by
        C-STORE are routed, inferred and sent on as with `serve`. Stop it with Ctrl-C.
        """,
    )

    worker = _command(
        sub,
        "worker",
        _worker,
        "take jobs from the broker (NNUNET_NODE_BROKER_URL) and run them, one at a time",
        """
        Run jobs on this host for a node whose NNUNET_NODE_BROKER_URL is set: one process
        per GPU, one job at a time, models kept loaded between jobs. It needs the node's
        database (NNUNET_NODE_DB_URL), data folder (NNUNET_NODE_DATA, shared storage) and
        spec, and a database the node has migrated. Stop it with Ctrl-C (the running job
        ends first).
        """,
    )
    worker.add_argument(
        "--device",
        default=None,
        help="auto, cpu, cuda or cuda:<index> (one GPU per worker; default NNUNET_NODE_DEVICE)",
    )
    worker.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues to take jobs from (default NNUNET_NODE_DEFAULT_QUEUE)",
    )
    worker.add_argument(
        "--concurrency", type=int, default=1, help="jobs at a time: 1 (one process per GPU)"
    )
    worker.add_argument(
        "--name", default=None, help="unique worker name (default nnunet-<pid>@<host>)"
    )
    worker.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's)"
    )

    demo = _command(
        sub,
        "demo",
        _demo,
        "send a phantom CT study to a running node and show its results arrive",
        """
        With a node running (`nnunet-node serve` in another terminal): write a phantom CT
        study, send it to the node by C-STORE, follow the job the routing rule makes of it,
        and receive its DICOM-SEG and RTSTRUCT at a small storage SCP this command runs
        for the occasion (the rule's destination: PACS on 127.0.0.1:11113 in the default
        spec).
        """,
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address of the running node (default: 127.0.0.1)"
    )
    demo.add_argument(
        "--port", type=int, default=None, help="its DICOM port (default: NNUNET_NODE_DICOM_PORT)"
    )
    demo.add_argument(
        "--http-port", type=int, default=None, help="its HTTP port (default: NNUNET_SERVE_PORT)"
    )

    db = _command(
        sub,
        "db",
        _db,
        "upgrade or downgrade the database schema",
        """
        Apply the database migrations (the node also upgrades at every start). Without a
        revision, `upgrade` goes to the newest and `downgrade` one step back.
        """,
    )
    db.add_argument("action", choices=["upgrade", "downgrade"], help="which way to migrate")
    db.add_argument(
        "revision", nargs="?", default=None, help="target revision (default: head, or -1)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"nnunet-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
