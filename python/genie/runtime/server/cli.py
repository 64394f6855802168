"""``genie serve``: the command line of the server (``python -m genie.runtime.server`` runs
the same)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import secrets
import signal
import sys

import torch

from genie.errors import GenieError
from genie.runtime import protocol as P
from genie.runtime.server.server import Server, ServerConfig

logger = logging.getLogger(__name__)

__all__ = ["add_serve_arguments", "main", "parse_size", "serve_main"]


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 10**12,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1048576"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8GiB, 512MB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_serve_arguments(parser: argparse.ArgumentParser, *, log_level: bool = True) -> None:
    """The options of ``genie serve`` (without ``--log-level`` when the parent parser has it)."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    parser.add_argument("--port", type=int, default=7070, help="TCP port (0 picks a free one)")
    parser.add_argument("--device", default="cpu", help="where programs run: cpu, cuda, cuda:1 ...")
    parser.add_argument("--token-file", help="file holding the shared token clients must present")
    parser.add_argument(
        "--token", help="the token itself (visible in ps; prefer --token-file or GENIE_TOKEN)"
    )
    parser.add_argument(
        "--memory-limit",
        type=parse_size,
        default=0,
        help="most bytes one session may keep resident, e.g. 16GiB (default: no limit)",
    )
    parser.add_argument(
        "--max-message",
        type=parse_size,
        default=P.Limits.max_message,
        help="largest payload of one message (default 1GiB; clients split bigger uploads)",
    )
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="never replay programs as CUDA graphs"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--transport", default="tcp", help="transport to listen with (tcp)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=ServerConfig.idle_timeout,
        help="close sessions silent this many seconds, freeing what they hold (default 1800; "
        "0: never)",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=ServerConfig.peer_timeout,
        help="seconds a direct move from or to another genie server may take before it fails "
        "naming that server (default 30)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=ServerConfig.handshake_timeout,
        help="seconds a new connection has to present the token (default 5)",
    )
    parser.add_argument(
        "--prepare-next",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check the likely next step of a decode loop on a helper thread while the "
        "current one runs (default: on for CUDA devices, off on cpu)",
    )
    parser.add_argument(
        "--spin-us",
        type=int,
        default=None,
        help="microseconds a session polls for its next request before it blocks (default: "
        "$GENIE_SPIN_US, else 10000 on hosts with 8 or more cores, 0 on smaller ones)",
    )
    if log_level:
        parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--port-file", help="write the port actually bound here once listening (for scripts)"
    )


def _load_token(args: argparse.Namespace) -> tuple[bytes, bool]:
    """(token, whether it was generated here): --token, --token-file, GENIE_TOKEN or
    GENIE_TOKEN_FILE (protocol.resolve_token), else a fresh one to print."""
    token = (
        P.resolve_token(None, args.token_file) if args.token_file else P.resolve_token(args.token)
    )
    if token is not None:
        if not token:
            raise GenieError(f"genie: the token file {args.token_file} is empty")
        return token, False
    return secrets.token_urlsafe(24).encode(), True


def serve_main(args: argparse.Namespace) -> int:
    """Entry point of ``genie serve``; returns the process exit code."""
    level = getattr(logging, str(getattr(args, "log_level", "INFO")).upper(), logging.INFO)
    logging.getLogger("genie").setLevel(level)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    token, generated = _load_token(args)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        token=token,
        limits=P.Limits(max_message=args.max_message, memory_limit=args.memory_limit),
        cuda_graphs=not args.no_cuda_graphs,
        transport=args.transport,
        idle_timeout=args.idle_timeout or None,
        handshake_timeout=args.handshake_timeout,
        peer_timeout=args.peer_timeout,
        spin_us=args.spin_us,
        prepare_next=args.prepare_next,
    )
    try:
        server = Server(config)
        host, port = server.start()
    except GenieError as e:
        print(str(e), file=sys.stderr)
        return 2
    # Note: [The server's garbage collector]
    # Importing torch leaves about 170k Python objects that live as long as the process. A
    # full collection scanned them all: 50-75 ms, now and then in the middle of a step (a
    # decode step takes a few ms). Frozen once here, before any client, they are left out of
    # every later collection, which then looks only at what the server made since (a full
    # one after a GPT-2 decode: 6 ms instead of 73 on the CI-sized VM).
    gc.freeze()

    # Installed before the port is announced: a script that reads it may signal at once.
    def on_signal(signum, _frame):
        logger.info("genie: signal %d: shutting down", signum)
        server.request_shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(
        f"genie serve: listening on {host}:{port}, device {server.device} ({server.device_name}), "
        f"CUDA graphs {'on' if server.cuda_graphs else 'off'}",
        file=sys.stderr,
        flush=True,
    )
    if generated:
        print(
            f"genie serve: no token given; clients must use GENIE_TOKEN={token.decode()}",
            file=sys.stderr,
            flush=True,
        )

    server.wait()
    server.shutdown()
    logger.info("genie: server stopped")
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="genie serve", description="Serve remote_accelerator programs"
    )
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))
