"""Alerts through a real ``hpo-sync run`` process: SIGKILL while a target is down (the pending
alerts are delivered after the restart), after delivery (nothing is sent twice), and after
the target took a message but before it was marked sent (it is sent again as the same
message, under the same ``webhook-id``)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from daemon_harness import Daemons, config_text, query, sim_post, wait_db
from hook_server import Hook

from hpo_sync.alerts.receivers import Receivers
from hpo_sync.sim.server import SimOptions, Simulator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOKEN = "daemon-hook-S3CRET"
HOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        await ds.cleanup()


def write_config(tmp_path: Path, sim: Simulator, url: str) -> tuple[Path, Path]:
    """A daemon config for workspace 100001 of ``sim``, alerting the webhook at ``url``;
    returns the mirror's path and the config's."""
    db, cfg = tmp_path / "mirror.db", tmp_path / "config.toml"
    cfg.write_text(
        config_text(sim_url=sim.base_url, db=db, workspaces=["100001"])
        + alerts_toml(tmp_path, url),
        encoding="utf-8",
    )
    return db, cfg


def alerts_toml(tmp_path: Path, url: str) -> str:
    (tmp_path / "hook-url").write_text(url)
    (tmp_path / "hook-secret").write_text(HOOK_SECRET)
    return f"""
[alerts]
group_wait_s = 0

[[alerts.targets]]
name = "hook"
type = "webhook"
url_file = "{tmp_path / "hook-url"}"
secret_file = "{tmp_path / "hook-secret"}"

[[alerts.rules]]
name = "status"
targets = ["hook"]
to_status = ["CREATED", "RUNNING", "FINISHED", "FAILED", "EARLY_STOPPED", "USER_CANCELED",
             "SYS_CANCELED", "WAITING", "NO_MORE_TRIAL", "UNKNOWN"]
"""


def delivered(receivers: Receivers) -> Counter[tuple[str, str, str]]:
    return Counter(
        (a["experiment_id"], a["field"], a["observed_at"])
        for r in receivers.of(TOKEN)
        for a in r.body["alerts"]
    )


def outbox(db: Path, status: str) -> int:
    return int(query(db, "SELECT count(*) FROM alert_outbox WHERE status = ?", (status,))[0][0])


async def wait_all_sent(db: Path, timeout_s: float = 30) -> None:
    await wait_db(
        db,
        "SELECT 1 WHERE (SELECT count(*) FROM alert_outbox) > 0"
        " AND NOT EXISTS (SELECT 1 FROM alert_outbox WHERE status != 'sent')",
        timeout_s=timeout_s,
    )


async def test_sigkill_before_and_after_delivery(tmp_path: Path, daemons: Daemons) -> None:
    receivers = Receivers(secrets={TOKEN: HOOK_SECRET})
    await receivers.start()
    try:
        async with Simulator(SimOptions(experiments=80, workspaces=1, seed=5, speed=0)) as sim:
            db, cfg = write_config(tmp_path, sim, receivers.url("webhook", TOKEN))
            d = await daemons.start(cfg, "first")
            await wait_db(db, "SELECT 1 FROM workspaces WHERE baseline_at IS NOT NULL", daemon=d)
            port = receivers.port
            await receivers.stop()  # the target goes down

            await sim_post(sim.base_url, "/_sim/advance", {"seconds": 1800})
            await wait_db(
                db, "SELECT 1 FROM alert_outbox WHERE attempts >= 1", daemon=d, timeout_s=30
            )
            d.proc.send_signal(signal.SIGKILL)
            await d.proc.wait()
            assert outbox(db, "sent") == 0
            pending = outbox(db, "pending")
            assert pending > 0

            await receivers.start(port=port)  # back up; a new process resumes
            d2 = await daemons.start(cfg, "second")
            await wait_all_sent(db)
            got = delivered(receivers)
            assert sum(got.values()) == outbox(db, "sent") >= pending
            assert max(got.values()) == 1  # nothing twice

            # Kill -9 after delivery: the restarted daemon does not resend.
            sent_before = sum(got.values())
            d2.proc.send_signal(signal.SIGKILL)
            await d2.proc.wait()
            d3 = await daemons.start(cfg, "third")
            await d3.wait_event("sync.finished")
            await asyncio.sleep(2.5)  # a couple of worker rounds
            assert sum(delivered(receivers).values()) == sent_before
            log = (tmp_path / "second.log").read_text()
            assert '"alert.sent"' in log
            for secret in (TOKEN, HOOK_SECRET, f"127.0.0.1:{port}"):
                assert secret not in log
            assert json.dumps(TOKEN) not in (tmp_path / "first.log").read_text()
    finally:
        await receivers.stop()


async def test_sighup_with_changed_rules_sends_nothing_again(
    tmp_path: Path, daemons: Daemons
) -> None:
    """Reloading with different rules neither re-sends what was delivered nor loses what
    the new rules match afterwards (unlike a notifier that forgets its state on reload)."""
    receivers = Receivers(secrets={TOKEN: HOOK_SECRET})
    await receivers.start()
    try:
        async with Simulator(SimOptions(experiments=80, workspaces=1, seed=9, speed=0)) as sim:
            db = tmp_path / "mirror.db"
            cfg = tmp_path / "config.toml"
            base = config_text(sim_url=sim.base_url, db=db, workspaces=["100001"])
            rules = alerts_toml(tmp_path, receivers.url("webhook", TOKEN))
            cfg.write_text(base + rules, encoding="utf-8")
            d = await daemons.start(cfg)
            await wait_db(db, "SELECT 1 FROM workspaces WHERE baseline_at IS NOT NULL", daemon=d)
            await sim_post(sim.base_url, "/_sim/advance", {"seconds": 1800})
            await wait_all_sent(db)
            sent_before = sum(delivered(receivers).values())
            assert sent_before > 0

            # Same target, the rule renamed and widened by a second rule: a reload that
            # rebuilt delivery state from the rules would send all of it again.
            changed = rules.replace('name = "status"', 'name = "every-status"') + (
                '\n[[alerts.rules]]\nname = "trials"\ntargets = ["hook"]\n'
                "trial_failures_rose = true\n"
            )
            cfg.write_text(base + changed, encoding="utf-8")
            d.proc.send_signal(signal.SIGHUP)
            await d.wait_event("config.reloaded")
            await d.wait_event("sync.finished")
            await asyncio.sleep(2.5)  # a couple of worker rounds
            assert sum(delivered(receivers).values()) == sent_before

            # What happens after the reload is delivered, once.
            await sim_post(sim.base_url, "/_sim/advance", {"seconds": 1800})
            await wait_db(
                db,
                "SELECT 1 FROM alert_outbox WHERE rule != 'status'"
                " AND NOT EXISTS (SELECT 1 FROM alert_outbox WHERE status != 'sent')",
                timeout_s=30,
                daemon=d,
            )
            got = delivered(receivers)
            assert sum(got.values()) > sent_before
            assert max(got.values()) == 1
            assert sum(got.values()) == outbox(db, "sent")
    finally:
        await receivers.stop()


async def test_sigkill_after_the_target_took_a_message_resends_it_under_its_id(
    tmp_path: Path, daemons: Daemons
) -> None:
    """kill -9 while the target holds a message it has taken, before the daemon could mark
    it sent, with newer alerts queued behind it: the restarted daemon sends the message
    again with the same ``webhook-id`` and the same alerts (so the receiver can drop it as
    a redelivery), and the newer alerts in messages of their own. The restart used to
    regroup everything pending under a new id."""
    hook = Hook(HOOK_SECRET, held={0: asyncio.Event()})
    runner, url = await hook.serve()
    try:
        async with Simulator(SimOptions(experiments=80, workspaces=1, seed=5, speed=0)) as sim:
            db, cfg = write_config(tmp_path, sim, url)
            d = await daemons.start(cfg, "first")
            await wait_db(db, "SELECT 1 FROM workspaces WHERE baseline_at IS NOT NULL", daemon=d)
            await sim_post(sim.base_url, "/_sim/advance", {"seconds": 1800})
            while not hook.got:  # the first message arrives, and is not answered
                d.check_alive()
                await asyncio.sleep(0.05)
            (first,) = hook.got
            taken = len(first.alerts)
            await sim_post(sim.base_url, "/_sim/advance", {"seconds": 1800})
            await wait_db(
                db,
                "SELECT 1 WHERE (SELECT count(*) FROM alert_outbox) > ?",
                (taken,),
                daemon=d,
                timeout_s=30,
            )
            # still in flight: not marked sent, not even timed out (10 s)
            assert outbox(db, "sent") == 0
            assert query(db, "SELECT max(attempts) FROM alert_outbox")[0][0] == 0
            d.proc.send_signal(signal.SIGKILL)
            await d.proc.wait()
            hook.held[0].set()

            await daemons.start(cfg, "second")
            await wait_all_sent(db)
    finally:
        hook.held[0].set()
        await runner.cleanup()

    def key(alert: dict[str, object]) -> tuple[object, ...]:
        return (alert["experiment_id"], alert["field"], alert["observed_at"])

    again = [g for g in hook.got[1:] if g.webhook_id == first.webhook_id]
    assert len(again) == 1, [g.webhook_id for g in hook.got]
    assert [key(a) for a in again[0].alerts] == [key(a) for a in first.alerts]
    others = [key(a) for g in hook.got[1:] if g is not again[0] for a in g.alerts]
    assert others and not set(others) & {key(a) for a in first.alerts}
    assert len(others) == len(set(others)) == outbox(db, "sent") - taken
