"""``nnunet-node``: serve the node, run the DIMSE node alone, migrate the database, run the demo.

Each sub-command imports its package only when chosen, so ``nnunet-node db upgrade`` does not load
torch. This module is a composition root: it may import every package.
"""

from __future__ import annotations

import argparse
import sys

from nnunet_node.core.errors import ConfigError
from nnunet_node.core.logging import configure_logging
from nnunet_node.core.settings import Settings, load_settings


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from nnunet_node.app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host or settings.http_host,
        port=args.port or settings.http_port,
        log_level=settings.log_level.lower(),
    )
    return 0


def _dicom(settings: Settings, args: argparse.Namespace) -> int:
    from nnunet_node.node.service import run_standalone

    return run_standalone(settings)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from nnunet_node.node.demo import run_demo

    return run_demo(settings, host=args.host, port=args.port, http_port=args.http_port)


def _db(settings: Settings, args: argparse.Namespace) -> int:
    from nnunet_node.storage.migrations import downgrade, upgrade

    if args.action == "upgrade":
        upgrade(settings.database_url, args.revision or "head")
    else:
        downgrade(settings.database_url, args.revision or "-1")
    print(f"database {settings.database_url}: {args.action} done")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="HTTP API, DIMSE node and job workers in one process")
    serve.add_argument("--host", default=None, help="HTTP address (default NNUNET_NODE_HOST)")
    serve.add_argument(
        "--port", type=int, default=None, help="HTTP port (default NNUNET_SERVE_PORT)"
    )
    serve.set_defaults(func=_serve)

    dicom = sub.add_parser(
        "dicom", help="the DIMSE node with its job workers, without the HTTP API"
    )
    dicom.set_defaults(func=_dicom)

    demo = sub.add_parser("demo", help="send a phantom study to a running node and follow its job")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=None, help="DIMSE port of the running node")
    demo.add_argument("--http-port", type=int, default=None, help="HTTP port of the running node")
    demo.set_defaults(func=_demo)

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("revision", nargs="?", default=None)
    db.set_defaults(func=_db)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"nnunet-node: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return int(args.func(settings, args))


if __name__ == "__main__":
    sys.exit(main())
