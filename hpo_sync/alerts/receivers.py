"""One local aiohttp server that emulates every chat target, for tests and the demo.

Paths (``<token>`` is anything; it keys secrets, keywords, failure modes and rate limits):
``/slack/<token>``, ``/discord/<token>``, ``/dingtalk/robot/send?access_token=<token>``,
``/feishu/bot/v2/hook/<token>``, ``/lark/bot/v2/hook/<token>``,
``/wecom/webhook/send?key=<token>``, ``/teams/<token>``, ``/webhook/<token>``. Each answers
with the real service's success and error bodies, checks DingTalk/Feishu signatures (and
that the timestamp is within an hour) and keywords, enforces the real rate limits with the
real errors, and records what it accepted. ``POST /_control/<token>`` with
``{"mode": "ok"|"fail", "errcode": N, "times": N}`` makes a token fail (HTTP 500, or the
given error code) ``times`` times or until set back to ``ok``; mode ``echo`` answers HTTP 404
with a body that quotes the whole request URL, as a misrouting proxy's error page does (so
tests can check a webhook's secret never leaks through an error reply); ``GET /_received``
lists what was accepted. To emulate a target that is down, :meth:`Receivers.stop` and
:meth:`Receivers.start` again on the same port.
"""

from __future__ import annotations

import hmac
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .signing import dingtalk_sign, feishu_sign, verify_webhook

#: The documented rate limits each emulated target enforces: (messages, per seconds).
#: Discord's 30 a minute per channel is not in its documentation, but widely seen.
RECEIVER_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "slack": ((1, 1.0),),
    "discord": ((5, 2.0), (30, 60.0)),
    "dingtalk": ((20, 60.0),),
    "feishu": ((5, 1.0), (100, 60.0)),
    "lark": ((5, 1.0), (100, 60.0)),
    "wecom": ((20, 60.0),),
    "teams": (),
    "webhook": (),
}
KINDS = tuple(RECEIVER_LIMITS)


@dataclass
class Received:
    """One request the receiver accepted (or, in ``rejected``, refused)."""

    kind: str
    token: str
    body: Any
    headers: dict[str, str]
    query: dict[str, str]
    answer_status: int = 200
    answer: str = ""


@dataclass
class _Failure:
    mode: str = "ok"
    errcode: int | None = None
    times: int | None = None


@dataclass
class Receivers:
    """The emulated targets. ``secrets``/``keywords`` are keyed by token."""

    secrets: dict[str, str] = field(default_factory=dict)
    keywords: dict[str, str] = field(default_factory=dict)
    wall_clock: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    received: list[Received] = field(default_factory=list)
    rejected: list[Received] = field(default_factory=list)
    on_receive: Callable[[Received], None] | None = None
    port: int = 0
    _runner: web.AppRunner | None = None
    _failures: dict[str, _Failure] = field(default_factory=dict)
    _windows: dict[str, deque[float]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, kind: str, token: str) -> str:
        """The webhook URL of ``token`` as the ``kind`` target."""
        paths = {
            "dingtalk": f"/dingtalk/robot/send?access_token={token}",
            "feishu": f"/feishu/bot/v2/hook/{token}",
            "lark": f"/lark/bot/v2/hook/{token}",
            "wecom": f"/wecom/webhook/send?key={token}",
        }
        return self.base_url + paths.get(kind, f"/{kind}/{token}")

    def fail(
        self, token: str, mode: str = "fail", errcode: int | None = None, times: int | None = None
    ) -> None:
        """Make ``token`` answer HTTP 500 (or ``errcode`` in a 200 body) ``times`` times (None:
        until ``fail(token, "ok")``)."""
        self._failures[token] = _Failure(mode, errcode, times)

    def of(self, token: str) -> list[Received]:
        return [r for r in self.received if r.token == token]

    @web.middleware
    async def _echo(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = request.match_info.get("token") or request.query.get(
            "access_token", request.query.get("key", "")
        )
        f = self._failures.get(token)
        if f is not None and f.mode == "echo" and not request.path.startswith("/_"):
            self._failure(token)  # counts down ``times``
            return web.Response(status=404, text=f"404 Not Found: no route for POST {request.url}")
        return await handler(request)

    async def start(self, port: int | None = None) -> str:
        app = web.Application(middlewares=[self._echo])
        app.router.add_post("/slack/{token}", self._slack)
        app.router.add_post("/discord/{token}", self._discord)
        app.router.add_post("/dingtalk/robot/send", self._dingtalk)
        app.router.add_post("/feishu/bot/v2/hook/{token}", self._feishu)
        app.router.add_post("/lark/bot/v2/hook/{token}", self._feishu)
        app.router.add_post("/wecom/webhook/send", self._wecom)
        app.router.add_post("/teams/{token}", self._teams)
        app.router.add_post("/webhook/{token}", self._webhook)
        app.router.add_post("/_control/{token}", self._control)
        app.router.add_get("/_received", self._list)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port if port is None else port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- helpers ---------------------------------------------------------------------------

    def _rate_ok(self, kind: str, token: str) -> bool:
        now = self.clock()
        sent = self._windows.setdefault(f"{kind}/{token}", deque())
        for n, period in RECEIVER_LIMITS[kind]:
            if sum(1 for t in sent if t > now - period) >= n:
                return False
        sent.append(now)
        while sent and sent[0] < now - 3600:
            sent.popleft()
        return True

    def _failure(self, token: str) -> _Failure | None:
        f = self._failures.get(token)
        if f is None or f.mode == "ok":
            return None
        if f.times is not None:
            f.times -= 1
            if f.times <= 0:
                del self._failures[token]
        return f

    async def _read(self, request: web.Request, kind: str, token: str) -> tuple[Received, bytes]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        rec = Received(kind, token, body, dict(request.headers), dict(request.query))
        return rec, raw

    def _answer(
        self, rec: Received, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> web.Response:
        text = body if isinstance(body, str) else json.dumps(body)
        rec.answer_status, rec.answer = status, text
        ok = status < 300 and not (
            isinstance(body, dict) and body.get("errcode", body.get("code", 0)) != 0
        )
        (self.received if ok else self.rejected).append(rec)
        if ok and self.on_receive is not None:
            self.on_receive(rec)
        if status == 204:
            return web.Response(status=204, headers=headers)
        ctype = "text/plain" if isinstance(body, str) else "application/json"
        return web.Response(status=status, text=text, content_type=ctype, headers=headers)

    def _text(self, rec: Received) -> str:
        return json.dumps(rec.body, ensure_ascii=False) if rec.body is not None else ""

    # --- targets ---------------------------------------------------------------------------

    async def _slack(self, request: web.Request) -> web.Response:
        rec, _ = await self._read(request, "slack", request.match_info["token"])
        f = self._failure(rec.token)
        if f:
            return self._answer(rec, 500, "internal_error")
        if not isinstance(rec.body, dict) or not (rec.body.get("text") or rec.body.get("blocks")):
            return self._answer(rec, 400, "invalid_payload")
        if len(str(rec.body.get("text", ""))) > 40_000:
            return self._answer(rec, 400, "msg_too_long")
        if not self._rate_ok("slack", rec.token):
            return self._answer(rec, 429, "rate_limited", {"Retry-After": "1"})
        return self._answer(rec, 200, "ok")

    async def _discord(self, request: web.Request) -> web.Response:
        rec, _ = await self._read(request, "discord", request.match_info["token"])
        if self._failure(rec.token):
            return self._answer(rec, 500, {"message": "500: Internal Server Error", "code": 0})
        if not isinstance(rec.body, dict) or not (
            rec.body.get("content") or rec.body.get("embeds")
        ):
            return self._answer(
                rec, 400, {"message": "Cannot send an empty message", "code": 50006}
            )
        if len(str(rec.body.get("content", ""))) > 2_000:
            return self._answer(
                rec,
                400,
                {
                    "message": "Invalid Form Body",
                    "code": 50035,
                    "errors": {
                        "content": {
                            "_errors": [
                                {
                                    "code": "BASE_TYPE_MAX_LENGTH",
                                    "message": "Must be 2000 or fewer in length.",
                                }
                            ]
                        }
                    },
                },
            )
        if not self._rate_ok("discord", rec.token):
            body = {"message": "You are being rate limited.", "retry_after": 1.0, "global": False}
            return self._answer(rec, 429, body, {"Retry-After": "1"})
        if request.query.get("wait") == "true":
            return self._answer(
                rec,
                200,
                {"id": str(len(self.received) + 1), "content": rec.body.get("content", "")},
            )
        return self._answer(rec, 204, "")

    async def _dingtalk(self, request: web.Request) -> web.Response:
        token = request.query.get("access_token", "")
        rec, _ = await self._read(request, "dingtalk", token)
        f = self._failure(token)
        if f and f.errcode is None:
            return self._answer(rec, 500, "Internal Server Error")
        if f and f.errcode is not None:
            return self._answer(
                rec, 200, {"errcode": f.errcode, "errmsg": _DINGTALK_MSG.get(f.errcode, "error")}
            )
        if not token:
            return self._answer(rec, 200, {"errcode": 300001, "errmsg": "token is not exist"})
        secret = self.secrets.get(token)
        if secret is not None:
            ts = request.query.get("timestamp", "")
            sign = request.query.get("sign", "")
            if not ts.isdigit() or abs(self.wall_clock() * 1000 - int(ts)) > 3600_000:
                return self._answer(rec, 200, {"errcode": 310000, "errmsg": "invalid timestamp"})
            if not hmac.compare_digest(dingtalk_sign(secret, int(ts)), sign):
                return self._answer(rec, 200, {"errcode": 310000, "errmsg": "sign not match"})
        keyword = self.keywords.get(token)
        if keyword and keyword not in self._text(rec):
            return self._answer(rec, 200, {"errcode": 310000, "errmsg": "keywords not in content"})
        if len(json.dumps(rec.body, ensure_ascii=False).encode()) > 20_000:
            return self._answer(
                rec, 200, {"errcode": 460101, "errmsg": "message too long, exceed 20000 bytes"}
            )
        if not self._rate_ok("dingtalk", token):
            return self._answer(rec, 200, {"errcode": 130101, "errmsg": _DINGTALK_MSG[130101]})
        return self._answer(rec, 200, {"errcode": 0, "errmsg": "ok"})

    async def _feishu(self, request: web.Request) -> web.Response:
        kind = "lark" if request.path.startswith("/lark/") else "feishu"
        rec, _ = await self._read(request, kind, request.match_info["token"])
        f = self._failure(rec.token)
        if f and f.errcode is None:
            return self._answer(rec, 500, "Internal Server Error")
        if f and f.errcode is not None:
            return self._answer(rec, 200, {"code": f.errcode, "data": {}, "msg": "error"})
        body = rec.body if isinstance(rec.body, dict) else {}
        secret = self.secrets.get(rec.token)
        if secret is not None:
            ts = str(body.get("timestamp", ""))
            ok = ts.isdigit() and abs(self.wall_clock() - int(ts)) <= 3600
            if not ok or not hmac.compare_digest(
                feishu_sign(secret, int(ts)), str(body.get("sign", ""))
            ):
                msg = "sign match fail or timestamp is not within one hour from current time"
                return self._answer(rec, 200, {"code": 19021, "data": {}, "msg": msg})
        keyword = self.keywords.get(rec.token)
        if keyword and keyword not in self._text(rec):
            return self._answer(rec, 200, {"code": 19024, "data": {}, "msg": "Key Words Not Found"})
        if len(json.dumps(body, ensure_ascii=False).encode()) > 20_000:
            return self._answer(
                rec, 200, {"code": 9499, "data": {}, "msg": "request body too large"}
            )
        if not self._rate_ok(kind, rec.token):
            return self._answer(
                rec, 200, {"code": 11232, "data": {}, "msg": "frequency limited psm"}
            )
        return self._answer(
            rec,
            200,
            {"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {}, "msg": "success"},
        )

    async def _wecom(self, request: web.Request) -> web.Response:
        token = request.query.get("key", "")
        rec, _ = await self._read(request, "wecom", token)
        f = self._failure(token)
        if f and f.errcode is None:
            return self._answer(rec, 500, "Internal Server Error")
        if f and f.errcode is not None:
            return self._answer(rec, 200, {"errcode": f.errcode, "errmsg": "error"})
        if not token:
            return self._answer(rec, 200, {"errcode": 93000, "errmsg": "invalid webhook url"})
        body = rec.body if isinstance(rec.body, dict) else {}
        content = (
            str(body.get("markdown", {}).get("content", ""))
            if body.get("msgtype") == "markdown"
            else ""
        )
        if len(content.encode()) > 4096:
            return self._answer(
                rec, 200, {"errcode": 40058, "errmsg": "markdown.content exceed max length 4096"}
            )
        if not self._rate_ok("wecom", token):
            return self._answer(rec, 200, {"errcode": 45009, "errmsg": "api freq out of limit"})
        return self._answer(rec, 200, {"errcode": 0, "errmsg": "ok"})

    async def _teams(self, request: web.Request) -> web.Response:
        rec, raw = await self._read(request, "teams", request.match_info["token"])
        if self._failure(rec.token):
            return self._answer(rec, 500, "Internal Server Error")
        body = rec.body if isinstance(rec.body, dict) else {}
        if body.get("type") != "message" or not body.get("attachments"):
            return self._answer(
                rec,
                400,
                {
                    "error": {
                        "code": "InvalidRequestContent",
                        "message": "The request content is not valid",
                    }
                },
            )
        if len(raw) > 28_000:
            return self._answer(
                rec,
                413,
                {"error": {"code": "MessageSizeTooBig", "message": "Message size too big"}},
            )
        return self._answer(rec, 202, "")

    async def _webhook(self, request: web.Request) -> web.Response:
        rec, raw = await self._read(request, "webhook", request.match_info["token"])
        f = self._failure(rec.token)
        if f:
            return self._answer(
                rec,
                f.errcode or 500,
                "failing on purpose",
                {"Retry-After": "0"} if f.errcode == 429 else None,
            )
        secret = self.secrets.get(rec.token)
        if secret is not None and not verify_webhook(
            secret,
            {k.lower(): v for k, v in request.headers.items()},
            raw,
            now_s=int(self.wall_clock()),
        ):
            return self._answer(rec, 401, "bad signature")
        return self._answer(rec, 204, "")

    async def _control(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.fail(
            request.match_info["token"],
            str(data.get("mode", "fail")),
            data.get("errcode"),
            data.get("times"),
        )
        return web.json_response({"ok": True})

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"kind": r.kind, "token": r.token, "body": r.body} for r in self.received]
        )


_DINGTALK_MSG = {
    130101: "send too fast, exceed 20 times per minute",
    310000: "keywords not in content",
    300001: "token is not exist",
    460101: "message too long, exceed 20000 bytes",
}
