"""A generic signed webhook receiver on a loopback port, for the alert tests that need to
see each request's ``webhook-id`` or to hold an answer back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from aiohttp import web

from hpo_sync.alerts.signing import verify_webhook


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` on a free loopback port: its runner (to clean up) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


@dataclasses.dataclass
class Delivery:
    """One request a :class:`Hook` took."""

    webhook_id: str
    body: bytes

    @property
    def alerts(self) -> list[dict[str, object]]:
        alerts: list[dict[str, object]] = json.loads(self.body)["alerts"]
        return alerts

    @property
    def experiments(self) -> list[object]:
        return [a["experiment_id"] for a in self.alerts]


@dataclasses.dataclass
class Hook:
    """Checks the Standard Webhooks signature made with ``secret`` and records every signed
    request, then answers request ``n`` (0-based) with ``statuses[n]`` (default 204) after
    ``delays_s[n]`` seconds, or once ``held[n]`` is set."""

    secret: str
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    delays_s: dict[int, float] = dataclasses.field(default_factory=dict)
    held: dict[int, asyncio.Event] = dataclasses.field(default_factory=dict)
    got: list[Delivery] = dataclasses.field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not verify_webhook(self.secret, headers, raw, now_s=int(time.time())):
            return web.Response(status=401, text="bad signature")
        n = len(self.got)
        self.got.append(Delivery(headers["webhook-id"], raw))
        await asyncio.sleep(self.delays_s.get(n, 0.0))
        if n in self.held:
            await self.held[n].wait()
        return web.Response(status=self.statuses.get(n, 204))

    async def serve(self) -> tuple[web.AppRunner, str]:
        """Start; returns the runner (to clean up) and the webhook URL."""
        app = web.Application()
        app.router.add_post("/hook/{tail:.*}", self.handle)
        runner, port = await serve(app)
        return runner, f"http://127.0.0.1:{port}/hook/S3CRET-path"
