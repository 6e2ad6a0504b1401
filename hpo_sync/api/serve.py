"""``hpo-sync serve``: the read API alone, over an existing mirror, read-only.

For a second machine that receives copies of the mirror, or a notebook host: no scheduler, no
upstream credentials, the file opened ``mode=ro``. It serves the same routes as the daemon
(``/healthz``, ``/readyz``, ``/metrics`` and the read API) except that ``POST /v1/sync`` is
503 (nothing syncs here). Tokens come from the config's ``[[api.tokens]]`` as for the daemon;
SIGHUP re-reads them. Without a config file (``--db`` alone) no tokens are configured, so it
serves loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from .. import config as config_mod
from ..config import ApiConfig, Config, StoreConfig
from ..errors import ConfigError, StoreError
from ..metrics import Metrics
from ..notify import Notifier
from ..store import Store
from . import add_health_routes
from .openapi import MAX_BODY_BYTES
from .read import setup_read_api

__all__ = ["ServeRuntime", "build_serve_app", "cmd_serve", "register_cli"]

log = structlog.get_logger(__name__)

SHUTDOWN_TIMEOUT_S = 1.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ServeRuntime:
    """What the read API needs, without a scheduler: no ``request_sync``."""

    config: Config
    store: Store
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], datetime] = _utcnow
    started_at: datetime = field(default_factory=_utcnow)


SERVE_RUNTIME: web.AppKey[ServeRuntime] = web.AppKey("hpo_sync.serve_runtime", ServeRuntime)


def build_serve_app(runtime: ServeRuntime, *, listen_host: str | None = None) -> web.Application:
    """The read-only application: health routes plus :func:`setup_read_api`."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVE_RUNTIME] = runtime
    add_health_routes(app, runtime)  # the daemon's: readiness over the mirror's workspaces
    setup_read_api(app, runtime, listen_host=listen_host)
    from ..web import setup_web_ui

    setup_web_ui(app, runtime)
    return app


# --- the command ---------------------------------------------------------------------------


def register_cli(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "serve",
        "serve the read API over an existing mirror, read-only (no syncing)",
        cmd_serve,
    )
    p.add_argument("--db", metavar="PATH", help="the mirror (default: [store] path)")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default: [api] listen, else 127.0.0.1:8787)",
    )


def serve_config(args: argparse.Namespace) -> Config:
    """The config for ``serve``: the file (``--config``, ``$HPO_SYNC_CONFIG`` or the default
    path); with ``--db`` and no such file, the defaults (no tokens: loopback only)."""
    from .. import cli

    path = config_mod.resolve_path(getattr(args, "config", None))
    db = cli.db_arg(args)
    explicit = bool(getattr(args, "config", None))
    if db and not explicit and not path.exists():
        cfg = Config()
    else:
        try:
            cfg = config_mod.load(path)
        except ConfigError as exc:
            if db or explicit or path.exists():
                raise
            raise ConfigError(f"{exc}; or name the mirror with --db PATH") from None
    if db:
        cfg = replace(cfg, store=StoreConfig(Path(db)))
    listen = getattr(args, "listen", None)
    if listen:
        api = ApiConfig(listen=listen, tokens=cfg.api.tokens)
        try:
            api.host_port  # noqa: B018 - validates HOST:PORT
        except ConfigError as exc:
            raise ConfigError(exc.bare_message, key="--listen") from None
        cfg = replace(cfg, api=api)
    cli.check_listen(cfg, key="--listen" if listen else "api.listen")
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from .. import cli

    cfg = serve_config(args)
    cli.setup_logging(args, cfg)
    from ..eventloop import run

    return run(serve(cfg, reload_from=cfg.source, exiting=True))


async def serve(
    cfg: Config,
    *,
    reload_from: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    exiting: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set). ``exiting``: the process ends when
    this returns (the ``serve`` command), so those signals are ignored once the stop is
    under way (see _remove_handlers); in-process, the process keeps its own dispositions
    (and the processes it starts later inherit them)."""
    store = await asyncio.to_thread(Store.open, cfg.store.path, readonly=True)
    runtime = ServeRuntime(config=cfg, store=store)
    host, port = cfg.api.host_port
    stop = stop or asyncio.Event()
    notifier = Notifier()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(asyncio.to_thread, store.close)
        runner = web.AppRunner(
            build_serve_app(runtime),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise StoreError(
                f"cannot listen on {cfg.api.listen}: {exc.strerror}; is the port in use?"
            ) from None
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        url = f"http://{shown}:{bound_port}"

        def reload() -> None:
            if reload_from is None:
                return
            try:
                new = config_mod.load(reload_from)
            except ConfigError as exc:
                log.error("serve.reload_rejected", error=str(exc))
                return
            # Only the tokens (and labels) change; the mirror and address need a restart.
            runtime.config = replace(
                new, store=cfg.store, api=replace(new.api, listen=cfg.api.listen)
            )
            log.info("serve.reloaded", tokens=len(new.api.tokens))

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGHUP, reload)
            stack.callback(_remove_handlers, loop, exiting)
        log.info("serve.listening", url=url, mirror=str(cfg.store.path), readonly=True)
        print(f"serving {cfg.store.path} (read-only) on {url}", flush=True)
        notifier.ready(f"serving {cfg.store.path} read-only on {url}")
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
        notifier.stopping()
    notifier.close()
    return 0


def _remove_handlers(loop: asyncio.AbstractEventLoop, exiting: bool) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
        if not exiting:
            continue
        # The loop's removal puts the default action back while the exit goes on (the
        # server's close, systemd's last notification): a repeated Ctrl-C or SIGTERM there
        # ended the process by the signal (a KeyboardInterrupt traceback for SIGINT), not
        # with its exit 0. The stop is under way: the signal has nothing left to ask.
        signal.signal(sig, signal.SIG_IGN)
