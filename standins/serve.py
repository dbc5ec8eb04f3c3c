"""Serve one stand-in in a process of its own, as a real peer runs on another machine:

    python -m standins.serve kommo --port 8101 [--max-rps 0]
    python -m standins.serve n8n --port 8102 [--api-key K] [--latency 0]

With waitress installed (requirements-dev.txt) connections are kept alive and answered by a
pool of threads, as Kommo's and n8n's own servers do; Werkzeug's development server (the
fallback) closes every connection after one answer, so each call would also cost a TCP
handshake and a new thread. The state is read over HTTP (`/_standin/state`, `/_standin/calls`).

Owns: the command line above. Must not: hold any stand-in's behaviour (the stand-in modules).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a file: make `standins` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from standins import kommo, n8n  # noqa: E402

SERVER_THREADS = 16


def build_app(args: argparse.Namespace):
    """The stand-in the arguments name."""
    if args.peer == "kommo":
        return kommo.create_app(max_rps=args.max_rps)
    return n8n.create_app(api_key=args.api_key, latency_seconds=args.latency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Um stand-in num processo próprio.")
    parser.add_argument("peer", choices=("kommo", "n8n"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-rps", type=float, default=7.0, help="Kommo: pedidos por segundo")
    parser.add_argument("--api-key", default=n8n.DEFAULT_KEY, help="n8n: chave esperada")
    parser.add_argument("--latency", type=float, default=0.0, help="n8n: segundos por resposta")
    args = parser.parse_args(argv)
    app = build_app(args)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    try:
        import waitress
    except ImportError:
        app.run("127.0.0.1", args.port, threaded=True)
        return 0
    waitress.serve(app, host="127.0.0.1", port=args.port, threads=SERVER_THREADS,
                   _quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
