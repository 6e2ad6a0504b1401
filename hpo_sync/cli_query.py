"""The read-only query commands: ``ls``, ``show``, ``history``, ``export`` and ``stats``.

They never touch the network and open the mirror read-only, so they are safe while the daemon
writes. ``--db PATH`` names the mirror (no config file needed); without it the config's
``[store] path`` is used. Big results stream: ``ls``, ``history`` (whatever the ``--limit``)
and ``export`` walk the mirror page by page (keyset pages; ``history --limit N`` first finds
where its latest N begin, with one ``OFFSET`` that holds no rows), so memory stays flat
however large the mirror is.

Exit status: 0 success (an empty result included); 1 when there is no mirror at the path, the
file cannot be read, or ``show``/``history`` names an experiment the mirror lacks; 2 for bad
arguments (a bad date, ``--tag`` without ``=``, an unknown sort …) or a bad config.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import shutil
import sys
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, TextIO

from . import cli
from . import render as r
from .config import EXPERIMENT_STATUSES
from .errors import ConfigError, HpoSyncError, StoreError
from .normalise import format_time, parse_time, round_up_fraction
from .store import (
    ChangeRow,
    ExperimentFilter,
    PageKey,
    SortOrder,
    Store,
    WorkspaceStats,
    is_mirror_file,
)

Handler = Callable[[argparse.Namespace], int]
Command = Callable[[str, str, Handler], argparse.ArgumentParser]

#: Rows per keyset page when streaming experiments or changes.
PAGE_SIZE = 500
DEFAULT_LIMIT = 50
DEFAULT_STATS_SINCE = "7d"
SORTS: tuple[SortOrder, ...] = ("-created", "created", "-modified", "modified", "name", "-name")
HISTORY_FIELDS = ("Status", "TrialStatus", "Deleted")
EXPORT_KINDS = ("experiments", "changes", "sync_runs")

_RELATIVE_RE = re.compile(r"^(\d+)\s*([smhdwSMHDW])$", re.ASCII)
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The longest age ``--since`` takes (about 100 years): older times are given as a date.
MAX_AGE_DAYS = 36_525
#: The largest ``--limit``: beyond any mirror's size, and within SQLite's integers.
MAX_LIMIT = 1_000_000_000
#: The longest ``--name``, in bytes of UTF-8: far beyond any experiment name, and well
#: inside SQLite's 50,000-byte limit on a LIKE pattern even once every byte is escaped.
MAX_NAME_BYTES = 1000


class NoSuchExperimentError(HpoSyncError):
    """The mirror holds no experiment with the id given."""


def utc_now() -> datetime:
    """The wall clock (a seam for tests of relative ``--since`` values)."""
    return datetime.now(UTC)


# --- argument types (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimeArg:
    """A ``--since``/``--created-*`` value: an absolute UTC time, or an age (``7d``) that is
    turned into a time against the clock when the command runs."""

    at: str | None = None
    ago: timedelta | None = None

    def resolve(self, now: datetime) -> str:
        """The time as ``YYYY-MM-DDTHH:MM:SSZ``."""
        if self.at is not None:
            return self.at
        assert self.ago is not None
        return format_time(now - self.ago)


_MINUTE_FRACTION_RE = re.compile(r"[Tt ]\d{2}:\d{2}[.,]")


def parse_time_arg(text: str, *, relative: bool = False) -> TimeArg:
    """Parse an ISO date or datetime (UTC unless it names a zone), or with ``relative`` an age
    such as ``90m``, ``12h``, ``7d``, ``2w``. Raises ValueError with a message for people."""
    value = text.strip()
    m = _RELATIVE_RE.match(value)
    if relative and value[:1] == "-" and _RELATIVE_RE.match(value[1:]):
        raise ValueError(
            f"{text!r}: an age counts back from now, without a sign: write {value[1:]}"
        )
    if relative and m:
        digits, unit = m.group(1).lstrip("0") or "0", m.group(2)
        if unit == "M":  # months or minutes? neither guessed
            raise ValueError(f"{text!r}: m is minutes (M is not read); for months give a date")
        unit = unit.lower()
        # Checked before converting: a datetime cannot reach before year 1 (and an int of
        # thousands of digits cannot even be read).
        if len(digits) > 15 or int(digits) * _UNITS_S[unit] > MAX_AGE_DAYS * 86400:
            raise ValueError(
                f"the age {text!r} reaches back too far: at most {MAX_AGE_DAYS}d "
                "(about 100 years); give a date for an earlier time, e.g. 1970-01-01"
            )
        return TimeArg(ago=timedelta(seconds=int(digits) * _UNITS_S[unit]))
    forms = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][Z|±HH:MM] (UTC unless a zone is given)"
    if relative:
        forms += ", or an age such as 12h, 7d, 2w"
    # parse_time also reads bare numbers as epoch seconds (far more likely a typo here), and
    # a fraction after the minutes (08:30.5), which no bound could round the API's way.
    unreadable = value.isdigit() or _MINUTE_FRACTION_RE.search(value) is not None
    dt = None if unreadable else parse_time(value)
    if dt is None:
        raise ValueError(f"cannot read {text!r} as a time: use {forms}")
    try:
        dt = round_up_fraction(dt, value)  # as the API does: stored times are whole seconds
    except OverflowError:
        raise ValueError(f"{text!r} rounds up past the last representable time") from None
    return TimeArg(at=format_time(dt))


def parse_tag(text: str) -> tuple[str, str]:
    """``key=value`` → ``(key, value)``; the value may be empty, the key may not. The key
    ends at the first ``=`` not escaped as ``\\=`` (``k\\=x=v``: key ``k=x``, value
    ``v``); ``\\\\`` in the key is one backslash, any other backslash itself. The value is
    taken as it is."""
    match = re.match(r"((?:[^=\\]|\\[=\\]|\\(?![=\\]))*)=(.*)\Z", text, re.DOTALL)
    key = re.sub(r"\\([=\\])", r"\1", match.group(1)).strip() if match else ""
    if not match or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, match.group(2)


def _arg_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def parse_limit(text: str) -> int:
    """A ``--limit``: a whole number from 0 (no limit) to :data:`MAX_LIMIT`."""
    value = text.strip()
    if not re.fullmatch(r"[+-]?\d+", value, re.ASCII):
        raise ValueError(f"expected a whole number, got {text!r}")
    if len(value.lstrip("+-").lstrip("0")) > len(str(MAX_LIMIT)):
        n = MAX_LIMIT + 1 if not value.startswith("-") else -1  # too many digits to read
    else:
        n = int(value)
    if n < 0:
        raise ValueError(f"must be 0 (no limit) or more, got {text.strip()}")
    if n > MAX_LIMIT:
        raise ValueError(f"must be at most {MAX_LIMIT:,}, got {text.strip()}; 0 means no limit")
    return n


def parse_name(text: str) -> str:
    """A ``--name``: at most :data:`MAX_NAME_BYTES` bytes of UTF-8 (longer, the query
    would fail in SQLite, as a "pattern too complex")."""
    # surrogatepass: bytes that are not UTF-8 are counted here, refused later by name.
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"at most {MAX_NAME_BYTES:,} bytes of UTF-8, got {size:,}")
    return text


def _output_path(text: str) -> str:
    if not text.strip():
        raise ValueError("empty path; name a file, or - for standard output")
    if text != "-" and Path(text).is_dir():
        raise ValueError(f"{text} is a directory; name a file in it")
    if text != "-" and not (parent := Path(text).resolve().parent).is_dir():
        # (the resolved one: a symlink to a file in a missing directory names that one)
        shown = Path(text).parent if parent == Path(text).absolute().parent else parent
        raise ValueError(f"directory {shown} does not exist")
    return text


def _field_name(text: str) -> str:
    # Case-insensitive; an unknown value falls through to argparse's choices message.
    return {f.lower(): f for f in HISTORY_FIELDS}.get(text.lower(), text)


_time_type = _arg_type(parse_time_arg, "time")
_since_type = _arg_type(lambda t: parse_time_arg(t, relative=True), "since")
_tag_type = _arg_type(parse_tag, "tag")
limit_type = _arg_type(parse_limit, "limit")
_output_type = _arg_type(_output_path, "output")
_name_type = _arg_type(parse_name, "name")


# --- registration -----------------------------------------------------------------------------


def _allow_dash_values(p: argparse.ArgumentParser, values: Sequence[str]) -> None:
    """Let ``--sort -created`` work: argparse takes any word starting with ``-`` for an
    option, so without this only ``--sort=-created`` would. ``None`` from
    ``_parse_optional`` means "a positional value" in every Python that has it."""
    original = p._parse_optional
    dash_values = frozenset(values)

    def parse_optional(arg_string: str) -> Any:
        return None if arg_string in dash_values else original(arg_string)

    p._parse_optional = parse_optional  # type: ignore[method-assign]


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        metavar="PATH",
        help="the mirror to read (default: the config's [store] path; no config needed)",
    )


def _workspace_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace",
        action="append",
        default=[],
        metavar="ID",
        help="only this workspace (repeatable)",
    )


def _format_option(
    p: argparse.ArgumentParser, choices: Sequence[str], default: str, note: str = ""
) -> None:
    p.add_argument(
        "--format",
        choices=choices,
        default=default,
        help=f"output format (default: {default}){note}",
    )


def register_cli(sub: Any, command: Command) -> None:
    """Add the query commands to the ``hpo-sync`` parser (see :mod:`hpo_sync.cli`)."""
    p = command("ls", "list the mirror's experiments (offline, read-only)", cmd_ls)
    _db_option(p)
    _workspace_option(p)
    p.add_argument(
        "--status",
        action="append",
        default=[],
        metavar="STATUS",
        help="only this status, e.g. FAILED (repeatable; any case)",
    )
    p.add_argument(
        "--name",
        type=_name_type,
        metavar="TEXT",
        help=f"name contains TEXT (case-insensitive; at most {MAX_NAME_BYTES} bytes)",
    )
    p.add_argument("--creator", metavar="ID", help="created by this user (exact)")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        type=_tag_type,
        metavar="KEY=VALUE",
        help="has this tag (repeatable: all must match)",
    )
    p.add_argument(
        "--created-after",
        type=_time_type,
        metavar="TIME",
        help="created at or after TIME (ISO date or datetime, UTC)",
    )
    p.add_argument(
        "--created-before",
        type=_time_type,
        metavar="TIME",
        help="created before TIME (ISO date or datetime, UTC; a date means its midnight)",
    )
    p.add_argument(
        "--include-deleted",
        action="store_true",
        help="include experiments deleted upstream (marked in the table)",
    )
    p.add_argument(
        "--sort",
        choices=SORTS,
        default="-created",
        help="order; '-' is descending (default: -created, newest first)",
    )
    _allow_dash_values(p, [s for s in SORTS if s.startswith("-")])
    p.add_argument(
        "--limit",
        type=limit_type,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N rows (default {DEFAULT_LIMIT}; 0: all, streamed)",
    )
    _format_option(p, ("table", "json", "jsonl", "csv"), "table")

    p = command("show", "show one experiment: every field, and its history", cmd_show)
    p.add_argument("experiment_id", metavar="ID", help="the ExperimentId")
    _db_option(p)
    _format_option(
        p,
        ("table", "json", "csv"),
        "table",
        "; csv: the experiment as one record, as `ls --format csv` writes it (a CSV row has "
        "no room for its history: that is `hpo-sync history ID --format csv`)",
    )

    p = command("history", "show recorded changes of Status, TrialStatus and Deleted", cmd_history)
    p.add_argument(
        "experiment_id", metavar="ID", nargs="?", help="only this experiment (default: all)"
    )
    _db_option(p)
    p.add_argument(
        "--since",
        type=_since_type,
        metavar="WHEN",
        help="observed at or after WHEN: an ISO date/datetime (UTC) or an age (12h, 7d, 2w)",
    )
    p.add_argument(
        "--field",
        type=_field_name,
        choices=HISTORY_FIELDS,
        help="only changes of this field",
    )
    _workspace_option(p)
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="hide rows written by a workspace's first full sync (what already existed)",
    )
    p.add_argument(
        "--limit",
        type=limit_type,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"the latest N changes (default {DEFAULT_LIMIT}; 0: all, streamed)",
    )
    _format_option(p, ("table", "json", "jsonl", "csv"), "table")

    p = command("export", "stream every row of a table as JSON lines or CSV", cmd_export)
    _db_option(p)
    _format_option(p, ("jsonl", "csv"), "jsonl")
    p.add_argument(
        "--kind",
        choices=EXPORT_KINDS,
        default="experiments",
        help="what to export (default: experiments)",
    )
    _workspace_option(p)
    p.add_argument(
        "--output",
        type=_output_type,
        metavar="FILE",
        help="write to FILE (replaced only once complete) instead of standard output",
    )

    p = command(
        "stats",
        "per workspace: experiments by status, failure rate and median run time",
        cmd_stats,
    )
    _db_option(p)
    p.add_argument(
        "--since",
        type=_since_type,
        default=parse_time_arg(DEFAULT_STATS_SINCE, relative=True),
        metavar="WHEN",
        help="count runs that ended at or after WHEN: an ISO date/datetime (UTC) or an age "
        f"(12h, 7d, 2w; default {DEFAULT_STATS_SINCE})",
    )
    _workspace_option(p)
    _format_option(p, ("table", "json"), "table")


# --- plumbing -------------------------------------------------------------------------------


def _open_store(args: argparse.Namespace) -> Store:
    try:
        path = cli.default_db_path(args)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; or name the mirror with --db PATH") from None
    if not path.exists():
        raise StoreError(f"no mirror at {path} — run `hpo-sync sync` first (or pass --db PATH)")
    return Store.open(path, readonly=True)


def _handler(run: Callable[[argparse.Namespace, Store, TextIO], int]) -> Handler:
    """Open the mirror, run the command against stdout, and end quietly when the reader of a
    pipe goes away (``hpo-sync ls --limit 0 | head``)."""

    def handle(args: argparse.Namespace) -> int:
        store = _open_store(args)
        cli.setup_logging(args)
        out = sys.stdout
        try:
            code = run(args, store, out)  # (a closed pipe ends it in cli.main, quietly)
            out.flush()
            return code
        except BrokenPipeError:
            raise
        except OSError as exc:
            # Only standard output is written here without a wrapper (files are written
            # by _output, which says which file): a full disk, a quota, an I/O error.
            print(
                f"hpo-sync: cannot write standard output: {exc.strerror or exc}",
                file=sys.stderr,
            )
            cli.quiet_stream(out)  # nor again at exit, with a traceback
            return cli.EXIT_FAILED
        except UnicodeEncodeError as exc:
            # Standard output in a locale's encoding (Latin-1, say) that lacks a character
            # of the mirror, a CJK name: say so and how to fix it, not a traceback.
            char = exc.object[exc.start : exc.start + 1] if isinstance(exc.object, str) else ""
            what = f"U+{ord(char):04X}" if char else "a character"
            print(
                f"hpo-sync: cannot write standard output: its encoding ({exc.encoding}) has "
                f"no {what}; use a UTF-8 locale, or set PYTHONIOENCODING=utf-8",
                file=sys.stderr,
            )
            cli.quiet_stream(out)  # what is still buffered cannot be written either
            return cli.EXIT_FAILED
        finally:
            store.close()

    handle.__name__ = run.__name__
    handle.__doc__ = run.__doc__
    return handle


def table_width(out: IO[str]) -> int | None:
    """Columns to fit tables into: the terminal's, else ``$COLUMNS``, else no limit (a pipe
    or file gets whole names)."""
    if out.isatty():
        return shutil.get_terminal_size().columns
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return None
    return columns if columns > 0 else None


def _note(text: str) -> None:
    print(f"hpo-sync: {text}", file=sys.stderr)


def _warn_unknown_workspaces(store: Store, wanted: Iterable[str | None]) -> None:
    known = [w.workspace_id for w in store.workspaces()]
    for ws in wanted:
        if ws is not None and ws not in known:
            listed = ", ".join(known) or "none yet"
            _note(f"workspace {ws!r} is not in the mirror (it has: {listed})")


def _warn_unknown_statuses(store: Store, wanted: Iterable[str]) -> None:
    """A ``--status`` that PAI does not use and the mirror does not hold matches nothing:
    most likely a typo, so say so (the listing still runs: PAI may add statuses)."""
    unknown = [s for s in wanted if s.strip().upper() not in EXPERIMENT_STATUSES]
    if not unknown:
        return
    held = {s for s in store.counts_by_status(include_deleted=True) if s}
    for status in unknown:
        if status.strip().upper() in held:
            continue
        close = difflib.get_close_matches(status.strip().upper(), EXPERIMENT_STATUSES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        _note(
            f"status {status!r} is not one PAI uses and no experiment in the mirror has it "
            f"({hint}known: {', '.join(EXPERIMENT_STATUSES)})"
        )


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_table(
    out: TextIO,
    columns: Sequence[r.Column],
    rows: Iterable[Sequence[str]],
    max_width: int | None,
) -> int:
    """Stream an aligned table; widths come from the first page. Returns the row count.

    The first rows are printed before the last are read, so a wider cell may come later.
    On a terminal (``max_width``) a name is cut to its column, as on the first page; piped,
    nothing is cut: the longer cell pushes the rest of its line right, and the whole name
    reaches the reader (columns that know their widest cell are sized for it)."""
    widths: list[int] | None = None
    cut = max_width is not None
    n = 0
    for batch in _batches(rows, PAGE_SIZE):
        if widths is None:
            widths = r.fit_widths(columns, batch, max_width)
            out.write(r.format_header(columns, widths) + "\n")
        out.write("".join(r.format_row(columns, widths, c, cut=cut) + "\n" for c in batch))
        out.flush()
        n += len(batch)
    return n


def _write_records(
    out: TextIO,
    fmt: str,
    header: Sequence[str],
    records: Iterable[Mapping[str, Any]],
) -> int:
    """Stream records as ``json`` (one array), ``jsonl`` or ``csv``. Returns the count."""
    n = 0

    def counted() -> Iterator[Mapping[str, Any]]:
        nonlocal n
        for record in records:
            n += 1
            yield record

    if fmt == "json":
        chunks = r.json_array_chunks(counted())
    elif fmt == "jsonl":
        chunks = (r.json_line(rec) for rec in counted())
    elif fmt == "csv":
        chunks = r.csv_chunks(header, counted())
    else:  # pragma: no cover - argparse choices
        raise ValueError(f"unknown format {fmt!r}")
    for chunk in chunks:
        out.write(chunk)
    out.flush()
    return n


# --- ls -------------------------------------------------------------------------------------


class ExperimentWalk:
    """Experiments page by page (keyset pagination) up to ``limit`` (0: all), from
    :meth:`rows`; afterwards ``more`` tells whether the limit cut the listing short.

    Every page is read in one snapshot: a page per snapshot, while a sync writes, listed
    twice an experiment whose sort key moved past the cursor (``--sort modified``) and
    left out one that moved before it. Read it in one thread (the mirror's read
    connections are per thread), and close the generator when done early."""

    def __init__(
        self, store: Store, filters: ExperimentFilter, sort: SortOrder, limit: int
    ) -> None:
        self.store, self.filters, self.sort, self.limit = store, filters, sort, limit
        self.more = False

    def rows(self) -> Generator[dict[str, Any], None, None]:
        """The rows, in one read snapshot until the end or :meth:`close` of the generator."""
        with self.store.reader():
            yield from self._pages()

    def _pages(self) -> Iterator[dict[str, Any]]:
        remaining = self.limit or None
        after: PageKey | None = None
        while True:
            size = min(PAGE_SIZE, remaining) if remaining is not None else PAGE_SIZE
            page = self.store.list_experiments(self.filters, self.sort, size, after)
            yield from page.rows
            if remaining is not None:
                remaining -= len(page.rows)
                if remaining <= 0:
                    self.more = page.has_more
                    return
            if not page.has_more:
                return
            after = page.last_key


#: The width of :func:`render.short_time`'s cells (``2024-03-01 08:30``).
TIME_WIDTH = len("2024-03-01 08:30")


def ls_columns(*, include_deleted: bool) -> tuple[r.Column, ...]:
    """The ``ls`` table's columns. A streamed table's widths come from its first page, so
    the columns whose widest cell is known are sized for it up front, to stay aligned when
    it first appears later: STATUS for the longest status PAI uses (and `` (deleted)``
    when deleted rows are listed), the times for ``short_time``'s. Names, ids, workspaces,
    trial counts and a status PAI adds cannot be known in advance: piped, a wider one
    pushes the rest of its line right."""
    status = max(EXPERIMENT_STATUSES, key=len)
    return (
        r.Column("STATUS", min_width=6, widest=len(r.status_cell(status, include_deleted))),
        r.Column("NAME", shrink=True),
        r.Column("ID"),
        r.Column("WORKSPACE"),
        r.Column("TRIALS", align="right"),
        r.Column("CREATED", widest=TIME_WIDTH),
        r.Column("MODIFIED", widest=TIME_WIDTH),
    )


def ls_cells(row: Mapping[str, Any]) -> list[str]:
    """A decoded experiment row as the cells of the ``ls`` table."""
    return [
        r.status_cell(row["status"], row["deleted"]),
        row["name"] or r.NONE_CELL,
        row["experiment_id"],
        row["workspace_id"],
        r.trials_cell(row["trial_count"], row["trial_status"]),
        r.short_time(row["gmt_create_time"]),
        r.short_time(row["gmt_modified_time"]),
    ]


def filters_from_args(args: argparse.Namespace) -> ExperimentFilter:
    return ExperimentFilter(
        workspaces=tuple(args.workspace),
        statuses=tuple(s.strip() for s in args.status),  # as _warn_unknown_statuses reads them
        name=args.name,
        creator=args.creator,
        tags=tuple(args.tag),
        created_after=args.created_after.at if args.created_after else None,
        created_before=args.created_before.at if args.created_before else None,
        include_deleted=args.include_deleted,
    )


def _ls(args: argparse.Namespace, store: Store, out: TextIO) -> int:
    filters = filters_from_args(args)
    _warn_unknown_workspaces(store, filters.workspaces)
    _warn_unknown_statuses(store, filters.statuses)
    walk = ExperimentWalk(store, filters, args.sort, args.limit)
    # Closed here, whatever happens: a reader that leaves the pipe (| head) stops the walk
    # mid-page, and its snapshot must end before the mirror closes, not at some later GC.
    with contextlib.closing(walk.rows()) as rows:
        if args.format == "table":
            columns = ls_columns(include_deleted=args.include_deleted)
            n = _write_table(out, columns, (ls_cells(row) for row in rows), table_width(out))
            if n == 0:
                _note("no experiments match")
            elif walk.more:
                _note(f"showing the first {n}; --limit N for more, --limit 0 for all")
        else:
            records = (r.experiment_record(row) for row in rows)
            n = _write_records(out, args.format, r.EXPERIMENT_FIELDS, records)
            if walk.more:  # on stderr, so a script's file stays clean but nobody is misled
                _note(f"wrote the first {n}; --limit N for more, --limit 0 for all")
    return cli.EXIT_OK


cmd_ls = _handler(_ls)


# --- show and history -----------------------------------------------------------------------


def _require_experiment(store: Store, experiment_id: str) -> dict[str, Any]:
    row = store.get_experiment(experiment_id)
    if row is None:
        raise NoSuchExperimentError(
            f"no experiment {experiment_id!r} in the mirror at {store.path} — find ids with "
            "`hpo-sync ls` (add --include-deleted to see deleted ones)"
        )
    return row


def change_record(change: ChangeRow) -> dict[str, Any]:
    return r.pascal_record(change._asdict())


#: The change is never cut (the new status is what the table is read for): a line with a
#: long one runs wider than the terminal, as a long id does.
SHOW_HISTORY_COLUMNS = (
    r.Column("OBSERVED"),
    r.Column("FIELD"),
    r.Column("CHANGE"),
    r.Column("RUN"),
)


def show_lines(
    row: Mapping[str, Any], changes: Sequence[ChangeRow], width: int | None
) -> list[str]:
    """The ``show`` page of one experiment: every field, then its history."""
    record = r.experiment_record(row)
    pairs: list[tuple[str, str]] = []
    for key, value in record.items():
        if key == "TrialStatus":
            text = r.trial_status_text(value)
        elif key == "Tags":
            text = r.tags_text(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = r.NONE_CELL if value is None or value == "" else str(value)
        pairs.append((key, text))
    lines = r.format_fields(pairs)
    lines += ["", f"History ({len(changes)} change{'' if len(changes) == 1 else 's'}, UTC)"]
    if changes:
        cells = [
            [
                c.observed_at,
                c.field,
                r.change_text(c.field, c.old_value, c.new_value),
                r.run_cell(c.sync_run_id, c.baseline),
            ]
            for c in changes
        ]
        lines += r.format_table(SHOW_HISTORY_COLUMNS, cells, width)
    return lines


def _show(args: argparse.Namespace, store: Store, out: TextIO) -> int:
    # One snapshot for the experiment and its history: a sync committing in between could
    # show a status its last history row does not reach.
    with store.reader():
        row = _require_experiment(store, args.experiment_id)
        changes = store.history(experiment_id=args.experiment_id)
    if args.format == "csv":
        # The very header and cells of `ls --format csv`: a CSV row has no room for the
        # history, which `history ID --format csv` gives.
        _write_records(out, "csv", r.EXPERIMENT_FIELDS, [r.experiment_record(row)])
        return cli.EXIT_OK
    if args.format == "json":
        record = r.experiment_record(row)
        record["History"] = [change_record(c) for c in changes]
        out.write(r.json_document(record))
    else:
        out.write("".join(line + "\n" for line in show_lines(row, changes, table_width(out))))
    out.flush()
    return cli.EXIT_OK


cmd_show = _handler(_show)


#: Sized up front where the widest cell is known, as in :func:`ls_columns`. Only the name is
#: cut to fit a terminal; the change never is (see SHOW_HISTORY_COLUMNS).
HISTORY_COLUMNS = (
    r.Column("ID", align="right"),
    r.Column("OBSERVED", widest=TIME_WIDTH),
    r.Column("EXPERIMENT"),
    r.Column("NAME", shrink=True),
    r.Column("WORKSPACE"),
    r.Column("FIELD", widest=max(map(len, HISTORY_FIELDS))),
    r.Column("CHANGE"),
    r.Column("RUN"),
)


class _Names:
    """Experiment names for history rows, looked up once each (bounded)."""

    def __init__(self, store: Store, max_size: int = 10_000) -> None:
        self.store, self.max_size = store, max_size
        self.names: dict[str, str | None] = {}

    def __call__(self, experiment_id: str) -> str:
        if experiment_id not in self.names:
            if len(self.names) >= self.max_size:
                self.names.clear()
            row = self.store.get_experiment(experiment_id)
            self.names[experiment_id] = row["name"] if row else None
        return self.names[experiment_id] or r.NONE_CELL


def _history_rows(
    store: Store, args: argparse.Namespace, since: str | None
) -> tuple[Iterator[ChangeRow], bool]:
    """The selected changes in ``id`` order, and whether ``--limit`` left older ones out."""
    query: dict[str, Any] = {
        "experiment_id": args.experiment_id,
        "since": since,
        "field": args.field,
        "workspace": args.workspace,
        "include_baseline": not args.no_baseline,
    }
    after_id: int | None = None
    more = False
    if args.limit:
        # The latest N, oldest first, streamed like the rest (N may be a billion): the
        # (N+1)-th newest row, if there is one, is where the ascending walk starts after.
        edge = store.history(**query, limit=1, offset=args.limit, newest_first=True)
        if edge:
            after_id, more = edge[0].id, True

    def stream() -> Iterator[ChangeRow]:
        # With a limit, counted rather than read to the end: once N are there, rows a sync
        # adds meanwhile (their ids are higher) stay out, as they would have from one
        # query; with fewer than N in all, such rows may come in at the end, as with
        # --limit 0.
        cursor, remaining = after_id, args.limit or None
        while remaining is None or remaining > 0:
            size = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            page = store.history(**query, after_id=cursor, limit=size)
            if not page:
                return
            yield from page
            cursor = page[-1].id
            if remaining is not None:
                remaining -= len(page)

    return stream(), more


def _history(args: argparse.Namespace, store: Store, out: TextIO) -> int:
    if args.experiment_id is not None:
        _require_experiment(store, args.experiment_id)
    _warn_unknown_workspaces(store, args.workspace)
    since = args.since.resolve(utc_now()) if args.since else None
    changes, more = _history_rows(store, args, since)
    if args.format != "table":
        n = _write_records(out, args.format, r.CHANGE_FIELDS, (change_record(c) for c in changes))
        if more:
            _note(f"wrote the latest {n}; --limit N for more, --limit 0 for all")
        return cli.EXIT_OK
    name = _Names(store)
    rows = (
        [
            str(c.id),
            r.short_time(c.observed_at),
            c.experiment_id,
            name(c.experiment_id),
            c.workspace_id,
            c.field,
            r.change_text(c.field, c.old_value, c.new_value),
            r.run_cell(c.sync_run_id, c.baseline),
        ]
        for c in changes
    )
    n = _write_table(out, HISTORY_COLUMNS, rows, table_width(out))
    if n == 0:
        _note("no changes match")
    elif more:
        _note(f"showing the latest {n}; --limit N for more, --limit 0 for all")
    return cli.EXIT_OK


cmd_history = _handler(_history)


# --- export ---------------------------------------------------------------------------------

_EXPORT_HEADERS = {
    "experiments": r.EXPERIMENT_FIELDS,
    "changes": r.CHANGE_FIELDS,
    "sync_runs": r.SYNC_RUN_FIELDS,
}


def _check_output(path: str, db: Path) -> Path:
    """Where ``--output`` writes: the file itself, its symlink's target for a symlink. A
    path that is the mirror or one of its files is a usage error (replacing it would
    destroy the mirror)."""
    dest = Path(path).resolve()  # through symlinks: the file that would really change
    if is_mirror_file(dest, db):
        raise cli.UsageError(f"--output {path} is the mirror's own file ({dest}); name another")
    return dest


_DESCRIPTOR_PATH = re.compile(r"/dev/(?:fd/(\d+)|std(out|err))|/proc/self/fd/(\d+)")


def _descriptor(path: str) -> int | None:
    """The descriptor a path such as /dev/stdout, /dev/fd/3 or /proc/self/fd/1 names."""
    m = _DESCRIPTOR_PATH.fullmatch(os.path.normpath(path))
    if m is None:
        return None
    if m[2]:
        return 1 if m[2] == "out" else 2
    return int(m[1] or m[3])


@contextmanager
def _output(path: str | None, fmt: str, db: Path) -> Iterator[TextIO]:
    """Standard output, or a file that appears only once completely written (written next to
    it, then renamed over it; through a symlink, over its target, so the link stays). A
    path naming one of this process's descriptors (/dev/stdout, /dev/fd/N) is written
    through that descriptor, and what is not a regular file (a FIFO, a device) is written
    to directly: renamed over, either would be replaced by a file."""
    if path is None or path == "-":
        yield sys.stdout
        return
    newline = "" if fmt == "csv" else None
    fd = _descriptor(path)
    if fd is not None:
        # /dev/stdout and its kin name a descriptor this process holds open, as the shell
        # opened it (a pipe, or a file opened to append to): resolved and renamed over,
        # the file would lose what it held; opened anew, it would be truncated. Written to
        # through that descriptor, ``>> file`` appends and ``| cmd`` reads, as for ``-``.
        if fd == 1:
            yield sys.stdout
            return
        try:
            with os.fdopen(os.dup(fd), "w", encoding="utf-8", newline=newline) as f:
                yield f
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return
    dest = _check_output(path, db)
    try:
        if dest.exists() and not dest.is_file():
            with dest.open("w", encoding="utf-8", newline=newline) as f:
                yield f
            return
        partial = dest.with_name(f".{dest.name}.partial")
        try:
            with partial.open("w", encoding="utf-8", newline=newline) as f:
                yield f
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
    except BrokenPipeError:
        raise  # a FIFO's reader went away: as for `| head`, a quiet end (cli.main)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _export(args: argparse.Namespace, store: Store, out: TextIO) -> int:
    kind: Literal["experiments", "changes", "sync_runs"] = args.kind
    _warn_unknown_workspaces(store, args.workspace)
    rows = store.iter_export(kind, workspace=args.workspace, decode=False)
    records: Iterator[dict[str, Any]]
    if kind == "experiments":
        records = (r.experiment_record(row) for row in rows)
    else:
        records = (r.pascal_record(row) for row in rows)
    try:
        with _output(args.output, args.format, Path(store.path)) as dest:
            n = _write_records(dest, args.format, _EXPORT_HEADERS[kind], records)
    finally:
        # Closing the generator ends its read transaction now, not at garbage collection.
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    if args.output not in (None, "-"):
        _note(f"exported {n} {kind.replace('_', ' ')} rows to {args.output}")
    return cli.EXIT_OK


cmd_export = _handler(_export)


# --- stats ----------------------------------------------------------------------------------


def stats_record(s: WorkspaceStats) -> dict[str, Any]:
    return {
        "WorkspaceId": s.workspace_id,
        "Experiments": sum(s.counts_by_status.values()),
        "CountsByStatus": {
            r.status_key(k): s.counts_by_status[k] for k in r.ordered_statuses(s.counts_by_status)
        },
        "Ended": s.finished,
        "EndedByStatus": s.finished_by_status,
        "Failed": s.failed,
        "FailureRate": s.failure_rate,
        "MedianRunTimeS": s.median_run_time_s,
        "RunsTimed": s.timed,
    }


def stats_lines(stats: Sequence[WorkspaceStats], since: str, width: int | None) -> list[str]:
    """The ``stats`` table: current counts by status, then the window's ended runs."""
    statuses = r.ordered_statuses({k for s in stats for k in s.counts_by_status})
    columns = [
        r.Column("WORKSPACE"),
        r.Column("TOTAL", align="right"),
        *(r.Column(r.status_key(k), align="right") for k in statuses),
        r.Column("ENDED", align="right"),
        r.Column("ENDED FAILED", align="right"),
        r.Column("FAILURE RATE", align="right"),
        r.Column("MEDIAN RUN", align="right"),
    ]
    rows = [
        [
            s.workspace_id,
            str(sum(s.counts_by_status.values())),
            *(str(s.counts_by_status.get(k, 0)) for k in statuses),
            str(s.finished),
            str(s.failed),
            r.rate_text(s.failure_rate),
            r.duration_text(s.median_run_time_s),
        ]
        for s in stats
    ]
    untimed = ", ".join(
        f"{s.workspace_id} {s.finished - s.timed} of {s.finished}"
        for s in stats
        if s.timed < s.finished
    )
    return [
        *r.format_table(columns, rows, width),
        "",
        "TOTAL and the status columns: experiments now, deleted ones left out.",
        f"Since {since}: the runs that ENDED (reached a terminal status), how many of",
        "them FAILED (and the FAILURE RATE), and their MEDIAN RUN time (from first seen",
        "RUNNING after the baseline, else from creation, to the end).",
        *(
            [
                "The median leaves out runs with no known start (a restart whose RUNNING no",
                f"sync saw): {untimed}.",
            ]
            if untimed
            else []
        ),
    ]


def _stats(args: argparse.Namespace, store: Store, out: TextIO) -> int:
    since = args.since.resolve(utc_now())
    _warn_unknown_workspaces(store, args.workspace)
    stats = list(store.stats(since, workspace=args.workspace).values())
    if args.format == "json":
        record = {"Since": since, "Workspaces": [stats_record(s) for s in stats]}
        out.write(r.json_document(record))
    elif not stats:
        if not args.workspace:  # (an unknown --workspace was named above)
            _note("the mirror has no workspaces yet")
    else:
        out.write("".join(line + "\n" for line in stats_lines(stats, since, table_width(out))))
    out.flush()
    return cli.EXIT_OK


cmd_stats = _handler(_stats)
