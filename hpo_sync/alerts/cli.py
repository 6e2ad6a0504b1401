"""``hpo-sync alerts test|list|retry``: try a target, look at the outbox, re-queue dead alerts.

Nothing printed ever contains a webhook URL or a secret: targets are shown by name only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp

from hpo_sync import cli, proxies
from hpo_sync.cli import UsageError
from hpo_sync.cli_query import limit_type, table_width
from hpo_sync.config import Config, TargetConfig
from hpo_sync.errors import SchemaTooOldError, StoreError, StoreInUseError
from hpo_sync.normalise import format_time
from hpo_sync.render import Column, change_text, format_table, json_array_chunks, json_line
from hpo_sync.store import Store, acquire_lock

from . import outbox
from .classify import Sent, classify, redact
from .render import AlertItem, console_link, render
from .service import send_message, target_secrets

Handler = Callable[[argparse.Namespace], int]
Command = Callable[[str, str, Handler], argparse.ArgumentParser]


def register_cli(sub: Any, command: Command) -> None:
    """Add ``hpo-sync alerts …`` (see :mod:`hpo_sync.cli`)."""
    p = command("alerts", "test alert targets, list and retry alert deliveries", _need_action)
    actions = p.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)

    t = actions.add_parser(
        "test",
        help="send a sample message to TARGET and print its answer",
        description="send a sample message to TARGET and print its answer",
    )
    cli._common(t, top=False)
    t.add_argument("target", metavar="TARGET", help="a [[alerts.targets]] name")
    t.set_defaults(handler=cmd_test)

    ls = actions.add_parser(
        "list",
        help="list alert deliveries (newest first)",
        description="list alert deliveries (newest first)",
    )
    cli._common(ls, top=False)
    ls.add_argument("--db", metavar="PATH", help="the mirror (default: the config's [store] path)")
    which = ls.add_mutually_exclusive_group()
    which.add_argument("--pending", action="store_true", help="only pending deliveries")
    which.add_argument("--dead", action="store_true", help="only dead-lettered deliveries")
    ls.add_argument(
        "--limit",
        type=limit_type,
        default=50,
        metavar="N",
        help="at most N rows (default 50; 0: all)",
    )
    ls.add_argument(
        "--format",
        choices=("table", "json", "jsonl"),
        default="table",
        help="table (default), json (one array) or jsonl (one object per line)",
    )
    ls.set_defaults(handler=cmd_list)

    r = actions.add_parser(
        "retry",
        help="queue dead-lettered deliveries again, due now",
        description="queue dead-lettered deliveries again, due now (their max_age_s restarts)",
    )
    cli._common(r, top=False)
    r.add_argument("--db", metavar="PATH", help="the mirror (default: the config's [store] path)")
    r.add_argument("ids", metavar="ID", type=_outbox_id, nargs="*", help="alert_outbox ids")
    r.add_argument("--all-dead", action="store_true", help="every dead-lettered delivery")
    r.set_defaults(handler=cmd_retry)


def _outbox_id(text: str) -> int:
    """An ``alert_outbox`` id: a positive whole number SQLite can hold."""
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or not 0 < int(value) < 2**63:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an alert id (see `hpo-sync alerts list`)"
        )
    return int(value)


def _need_action(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires one
    raise UsageError("name an action: test, list or retry")


# --- test ------------------------------------------------------------------------------------


def sample_item(cfg: Config, now: datetime) -> AlertItem:
    """The made-up change ``alerts test`` announces."""
    ws = cfg.workspaces[0] if cfg.workspaces else None
    ws_id = ws.id if ws else "12345"
    return AlertItem(
        outbox_id=0,
        rule="test",
        workspace_id=ws_id,
        experiment_id="exp-test",
        name="hpo-sync test message",
        field="Status",
        old_value="RUNNING",
        new_value="FAILED",
        observed_at=format_time(now),
        trial_status={"FAILED": 1, "SUCCEEDED": 3},
        failed_delta=1,
        workspace_label=ws.label if ws else None,
        console_url=console_link(cfg.alerts.console_url, cfg.upstream.region, ws_id, "exp-test"),
    )


async def try_target(target: TargetConfig, cfg: Config, out: TextIO, now: datetime) -> int:
    (message,) = render(target.type, [sample_item(cfg, now)], keyword=target.keyword)
    async with aiohttp.ClientSession() as session:
        try:
            answer = await send_message(
                session, target, message.payload, now=now, msg_id=f"hposync_test_{uuid.uuid4().hex}"
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # The exception's text may name the URL: show only its kind.
            proxy = target.proxy
            via = f", through the proxy {proxies.shown(proxy.reveal())}" if proxy else ""
            print(f"{target.name} ({target.type}): no answer ({type(exc).__name__}{via})", file=out)
            return cli.EXIT_FAILED
    secrets = target_secrets(target)
    outcome = classify(target.type, answer.status, answer.headers, answer.body, secrets)
    print(f"{target.name} ({target.type}): HTTP {answer.status}", file=out)
    body = redact(answer.body.decode("utf-8", "replace"), secrets)
    print(body if body else "(empty body)", file=out)
    verdict = (
        "sent"
        if isinstance(outcome, Sent)
        else f"{type(outcome).__name__.lower()}: {outcome.reason}"
    )
    print(f"=> {verdict}", file=out)
    return cli.EXIT_OK if isinstance(outcome, Sent) else cli.EXIT_FAILED


def cmd_test(args: argparse.Namespace) -> int:
    cfg = cli.load_config(args)
    cli.setup_logging(args, cfg)
    target = next((t for t in cfg.alerts.targets if t.name == args.target), None)
    if target is None:
        names = ", ".join(t.name for t in cfg.alerts.targets) or "none configured"
        raise UsageError(f"no target named {args.target!r} (targets: {names})")
    return asyncio.run(try_target(target, cfg, sys.stdout, datetime.now(UTC)))


# --- list / retry ----------------------------------------------------------------------------

_LIST_SQL = f"""
SELECT o.id, o.status, o.target, o.rule, o.attempts, o.created_at, o.next_attempt_at,
       o.sent_at, o.last_error, o.message_id, c.workspace_id, c.experiment_id,
       {outbox.SHOWN_NAME_SQL}, c.field, c.old_value, c.new_value, c.observed_at
FROM alert_outbox o JOIN changes c ON c.id = o.change_id
LEFT JOIN experiments e ON e.experiment_id = c.experiment_id
{{where}} ORDER BY o.id DESC LIMIT ?
"""
_LIST_KEYS = (
    "id",
    "status",
    "target",
    "rule",
    "attempts",
    "created_at",
    "next_attempt_at",
    "sent_at",
    "last_error",
    "message_id",
    "workspace_id",
    "experiment_id",
    "name",
    "field",
    "from",
    "to",
    "observed_at",
)


def list_rows(store: Store, status: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` deliveries (0: all), of one status or all, and one more if
    there are more (the caller says so and drops it)."""
    where = "WHERE o.status = ?" if status else ""
    sql_limit = limit + 1 if limit > 0 else -1  # SQLite: a negative LIMIT is no limit
    params: tuple[Any, ...] = (status, sql_limit) if status else (sql_limit,)
    with store.reader() as conn:
        return [
            dict(zip(_LIST_KEYS, r, strict=True))
            for r in conn.execute(_LIST_SQL.format(where=where), params)
        ]


#: The table of ``alerts list``: as in ``ls``, the text columns are cut with ``…`` to fit
#: a terminal (or ``$COLUMNS``) and kept whole in a pipe or a file.
LIST_COLUMNS = (
    Column("ID", align="right", widest=6),
    Column("STATUS", widest=7),
    Column("TARGET", shrink=True, min_width=8),
    Column("TRIES", align="right"),
    Column("EXPERIMENT", shrink=True, min_width=16),
    Column("CHANGE / ERROR", shrink=True, min_width=20),
)


def print_rows(
    rows: Sequence[dict[str, Any]], fmt: str, out: TextIO, width: int | None = None
) -> None:
    if fmt == "json":  # one array, as `hpo-sync ls` and `history` write
        out.write("".join(json_array_chunks(rows)))
        return
    if fmt == "jsonl":
        out.write("".join(json_line(row) for row in rows))
        return
    if not rows:  # on stderr, as `ls` says it: a table with no rows prints nothing
        print("hpo-sync: no alert deliveries", file=sys.stderr)
        return
    cells = []
    for r in rows:
        # Upstream's names and a target's answers are shown as `ls` shows text (the table
        # cleans every cell): escapes, control and bidirectional characters reached the
        # terminal as they were.
        # (trial counts spelled out, as `history` and `show` write them)
        change = f"{r['field']} {change_text(r['field'], r['from'], r['to'])}"
        tail = f"{change}  [{r['last_error']}]" if r["last_error"] else change
        cells.append(
            [
                str(r["id"]),
                r["status"],
                r["target"],
                str(r["attempts"]),
                f"{r['name'] or ''} ({r['experiment_id']})",
                tail,
            ]
        )
    out.write("".join(line + "\n" for line in format_table(LIST_COLUMNS, cells, width)))


def cmd_list(args: argparse.Namespace) -> int:
    path = cli.default_db_path(args)
    if not path.exists():
        raise StoreError(f"no mirror at {path} — run `hpo-sync sync` first (or pass --db PATH)")
    cli.setup_logging(args)
    status = outbox.PENDING if args.pending else outbox.DEAD if args.dead else None
    store = Store.open(path, readonly=True)
    try:
        rows = list_rows(store, status, args.limit)
        more = args.limit > 0 and len(rows) > args.limit
        shown = rows[: args.limit] if more else rows
        print_rows(shown, args.format, sys.stdout, table_width(sys.stdout))
        if more:  # on stderr, as `ls` says it: the output stays clean for scripts
            print(
                f"hpo-sync: showing the newest {args.limit}; --limit N for more, --limit 0 for all",
                file=sys.stderr,
            )
    finally:
        store.close()
    return cli.EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all_dead):
        raise UsageError("give alert ids or --all-dead (not both)")
    path = cli.default_db_path(args)
    if not path.exists():
        raise StoreError(f"no mirror at {path} (pass --db PATH)")
    cli.setup_logging(args)
    # No single-instance lock (a running daemon holds it): one short write transaction,
    # which SQLite serialises with the daemon's. An older mirror is upgraded only while no
    # other hpo-sync process uses it: a daemon of that older version would go on writing
    # the old schema's rows into the new one.
    try:
        store = Store.open(path, upgrade=False)
    except SchemaTooOldError as old:
        try:
            lock = acquire_lock(path)
        except StoreInUseError as busy:
            raise StoreError(f"{old}, and cannot upgrade it: {busy}") from None
        try:
            store = Store.open(path)
        finally:
            lock.release()
    try:
        with store.write("re-queue dead alerts") as conn:
            n = outbox.retry_rows(conn, datetime.now(UTC), args.ids, all_dead=args.all_dead)
    finally:
        store.close()
    print(f"re-queued {n} dead alert deliver{'y' if n == 1 else 'ies'}")
    given = len(set(args.ids or ()))
    if n < given:
        # (exit 1, as `show` and `history` of an unknown id: a script can tell a typo)
        print(
            f"hpo-sync: {given - n} of the {given} ids given are not dead-lettered deliveries"
            " (pending, sent, or no such id): not re-queued",
            file=sys.stderr,
        )
        return cli.EXIT_FAILED
    return cli.EXIT_OK
