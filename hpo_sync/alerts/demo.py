"""The demo's chat receivers: ``hpo-sync demo`` finds :func:`start_demo_extra` here and sends
its alerts to emulated Slack, DingTalk (signed, with a keyword) and generic webhook targets."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .receivers import Received, Receivers

DING_TOKEN = "demo-dingtalk-token"
DING_SECRET = "SECdemo-dingtalk-secret"
KEYWORD = "hpo-sync"


@dataclass
class AlertsDemo:
    """What the demo runs for alerts (see :class:`hpo_sync.demo.DemoExtra`)."""

    receivers: Receivers
    config_toml: str
    banner: list[str] = field(default_factory=list)

    async def stop(self) -> None:
        await self.receivers.stop()


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def _summary(rec: Received) -> str:
    body = rec.body if isinstance(rec.body, dict) else {}
    if rec.kind == "webhook":
        n = len(body.get("alerts", []))
        return f"{n} change{'s' if n != 1 else ''} as JSON"
    title = body.get("markdown", {}).get("title") if rec.kind == "dingtalk" else None
    text = title or str(body.get("text", "")).splitlines()[0].strip("*")
    return text


async def start_demo_extra(data_dir: Path) -> AlertsDemo:
    """Start the receivers; the returned TOML points alert targets and rules at them."""
    alerts_dir = data_dir / "alerts"
    alerts_dir.mkdir(parents=True, exist_ok=True)
    received_log = alerts_dir / "received.jsonl"

    def on_receive(rec: Received) -> None:
        with received_log.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": rec.kind, "body": rec.body}, ensure_ascii=False) + "\n")
        # The demo's own output notices a closed pipe and stops; nothing to do here.
        with contextlib.suppress(BrokenPipeError):
            print(f"  alert delivered to {rec.kind}: {_summary(rec)}", flush=True, file=sys.stdout)

    receivers = Receivers(
        secrets={DING_TOKEN: DING_SECRET}, keywords={DING_TOKEN: KEYWORD}, on_receive=on_receive
    )
    base = await receivers.start()
    slack_url = _secret_file(alerts_dir / "slack-url", receivers.url("slack", "demo-slack-token"))
    ding_url = _secret_file(alerts_dir / "dingtalk-url", receivers.url("dingtalk", DING_TOKEN))
    ding_secret = _secret_file(alerts_dir / "dingtalk-secret", DING_SECRET)
    hook_url = _secret_file(alerts_dir / "webhook-url", receivers.url("webhook", "demo-hook"))
    toml = f"""
[alerts]
group_wait_s = 5
# the receivers are on loopback: no proxy the environment names
proxy = ""

[[alerts.targets]]
name = "demo-slack"
type = "slack"
url_file = "{slack_url}"

[[alerts.targets]]
name = "demo-dingtalk"
type = "dingtalk"
url_file = "{ding_url}"
secret_file = "{ding_secret}"
keyword = "{KEYWORD}"

[[alerts.targets]]
name = "demo-webhook"
type = "webhook"
url_file = "{hook_url}"

[[alerts.rules]]
name = "experiment ended badly"
targets = ["demo-slack", "demo-dingtalk", "demo-webhook"]
to_status = ["FAILED", "SYS_CANCELED", "EARLY_STOPPED"]

[[alerts.rules]]
name = "trials failing"
targets = ["demo-webhook"]
trial_failures_rose = true
"""
    banner = [
        f"alerts     emulated Slack, DingTalk and webhook receivers at {base};",
        f"             what they received: {received_log}",
    ]
    return AlertsDemo(receivers, toml, banner)
