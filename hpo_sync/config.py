"""Configuration: one TOML file, validated once at load into frozen, typed objects.

A bad file raises :class:`~hpo_sync.errors.ConfigError` naming the key (and the line where it
can be found); the CLI turns that into one message and exit status 2. Secrets never live in
the file: they are read from the environment or from files (systemd ``LoadCredential=``) and
held in :class:`Secret`, whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

import difflib
import hmac
import ipaddress
import json
import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from yarl import URL

from . import proxies
from .alerts.signing import webhook_key
from .errors import ConfigError, short_path

DEFAULT_CONFIG_PATH = Path("/etc/hpo-sync/config.toml")
CONFIG_ENV = "HPO_SYNC_CONFIG"

REGIONS = (
    "cn-beijing",
    "cn-wulanchabu",
    "cn-hangzhou",
    "cn-shanghai",
    "cn-shenzhen",
    "cn-hongkong",
)
EXPERIMENT_STATUSES = (
    "CREATED",
    "RUNNING",
    "FINISHED",
    "FAILED",
    "EARLY_STOPPED",
    "USER_CANCELED",
    "SYS_CANCELED",
    "WAITING",
    "NO_MORE_TRIAL",
    "UNKNOWN",
)
_STATUS_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}", re.ASCII)
DEFAULT_TERMINAL = ("FINISHED", "FAILED", "EARLY_STOPPED", "USER_CANCELED", "SYS_CANCELED")
SORT_BY_VOCABULARIES = {
    # create-time sort name -> the same vocabulary's modified-time sort name
    "GmtCreateTime": "GmtModifiedTime",
    "create_time": "update_time",
}
TARGET_TYPES = ("slack", "discord", "dingtalk", "feishu", "lark", "wecom", "teams", "webhook")

log = structlog.get_logger(__name__)


class Secret:
    """A secret value that never shows itself in repr, str, logs or config dumps."""

    __slots__ = ("_source", "_value")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self._source = source

    def reveal(self) -> str:
        return self._value

    @property
    def source(self) -> str:
        """Where the value came from (``env:NAME`` or ``file:PATH``), safe to show."""
        return self._source

    def __repr__(self) -> str:
        return f"Secret({self._source}, ***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        mine, theirs = (v.encode("utf-8", "surrogateescape") for v in (self._value, other._value))
        return hmac.compare_digest(mine, theirs)

    def __hash__(self) -> int:
        return hash(self._value)


class Proxy(Secret):
    """A forward proxy's URL (it may hold a password), with where it came from: shown with
    its password masked."""

    __slots__ = ()

    @property
    def shown(self) -> str:
        return f"{proxies.shown(self.reveal())} (from {self.source})"


@dataclass(frozen=True)
class UpstreamConfig:
    region: str = "cn-hangzhou"
    endpoint: str | None = None
    vpc: bool = False
    page_size: int = 100
    max_concurrency: int = 4
    max_qps: float = 10.0
    timeout_s: float = 10.0
    sort_by: str = "GmtCreateTime"
    sort_by_modified: str = "GmtModifiedTime"
    create_time_zone: str = "UTC"
    retry_max_attempts: int = 8
    retry_max_total_s: float = 120.0
    #: The forward proxy requests go through (None: direct), resolved when the config is
    #: read from ``proxy``/``proxy_env``/``proxy_file``, else the environment (see proxies).
    proxy: Proxy | None = None

    @property
    def base_url(self) -> str:
        if self.endpoint:
            return self.endpoint.rstrip("/")
        host = f"paiautoml{'-vpc' if self.vpc else ''}.{self.region}.aliyuncs.com"
        return f"https://{host}"

    @property
    def tz(self) -> timezone | ZoneInfo:
        return _zone(self.create_time_zone)


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("/var/lib/hpo-sync/mirror.db")


@dataclass(frozen=True)
class SyncConfig:
    hot_interval_s: float = 30.0
    full_interval_s: float = 3600.0
    terminal_statuses: tuple[str, ...] = DEFAULT_TERMINAL
    create_time_overlap_s: float = 600.0
    jitter_s: float = 5.0
    failure_backoff_max_s: float = 900.0
    #: ``hpo-sync run`` sweeps in a child process (see :mod:`hpo_sync.sweeper`).
    sweep_process: bool = True

    @property
    def non_terminal_statuses(self) -> tuple[str, ...]:
        return tuple(s for s in EXPERIMENT_STATUSES if s not in self.terminal_statuses)


@dataclass(frozen=True)
class WorkspaceConfig:
    id: str
    label: str | None = None


@dataclass(frozen=True)
class TokenConfig:
    name: str
    token: Secret
    workspaces: tuple[str, ...] = ()
    admin: bool = False


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:8787"
    tokens: tuple[TokenConfig, ...] = ()

    @property
    def host_port(self) -> tuple[str, int]:
        return _parse_listen(self.listen, "api.listen")


@dataclass(frozen=True)
class TargetConfig:
    name: str
    type: str
    url: Secret
    secret: Secret | None = None
    keyword: str | None = None
    #: The forward proxy its messages go through (None: direct): its own ``proxy``, else
    #: ``alerts.proxy``, else the environment's for the URL's scheme, unless NO_PROXY names
    #: its host.
    proxy: Proxy | None = None


@dataclass(frozen=True)
class RuleConfig:
    name: str
    targets: tuple[str, ...]
    workspaces: tuple[str, ...] = ()
    experiments: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    from_status: tuple[str, ...] = ()
    to_status: tuple[str, ...] = ()
    trial_failures_rose: bool = False
    trial_failures_min: int = 1
    quiet_hours: str | None = None


@dataclass(frozen=True)
class AlertsConfig:
    group_wait_s: float = 10.0
    max_age_s: float = 86400.0
    stalled_after_s: float = 1800.0
    console_url: str = "https://pai.console.aliyun.com/?regionId={region}&workspaceId={workspace}#/automl/hpo/{experiment_id}"
    targets: tuple[TargetConfig, ...] = ()
    rules: tuple[RuleConfig, ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class Config:
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    workspaces: tuple[WorkspaceConfig, ...] = ()
    api: ApiConfig = field(default_factory=ApiConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Path | None = None

    def workspace_ids(self) -> tuple[str, ...]:
        return tuple(w.id for w in self.workspaces)


# ---------------------------------------------------------------------------------------------
# The keys the parser accepts, per section ("[]" marks an array of tables). The example config
# and its test are checked against this, so a new key cannot go undocumented.

SECTION_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"upstream", "store", "sync", "workspaces", "api", "alerts", "logging"}),
    "upstream": frozenset(UpstreamConfig.__dataclass_fields__) | {"proxy_env", "proxy_file"},
    "store": frozenset({"path"}),
    "sync": frozenset(SyncConfig.__dataclass_fields__),
    "workspaces[]": frozenset({"id", "label"}),
    "api": frozenset({"listen", "tokens"}),
    "api.tokens[]": frozenset({"name", "token_env", "token_file", "workspaces", "admin"}),
    "alerts": frozenset(AlertsConfig.__dataclass_fields__) | {"proxy", "proxy_env", "proxy_file"},
    "alerts.targets[]": frozenset(
        {"name", "type", "url", "url_env", "url_file", "secret_env", "secret_file", "keyword"}
        | {"proxy", "proxy_env", "proxy_file"}
    ),
    "alerts.rules[]": frozenset(RuleConfig.__dataclass_fields__),
    "logging": frozenset({"level", "format"}),
}
#: keys recognised only to be refused with a pointer to their ``_env``/``_file`` forms
REFUSED_KEYS: dict[str, frozenset[str]] = {
    "api.tokens[]": frozenset({"token"}),
    "alerts.targets[]": frozenset({"secret"}),
}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
CONSOLE_URL_FIELDS = ("region", "workspace", "experiment_id")


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    """``--config`` beats ``$HPO_SYNC_CONFIG`` beats ``/etc/hpo-sync/config.toml``."""
    env = os.environ if env is None else env
    if cli_path:
        return Path(cli_path).expanduser()
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    return DEFAULT_CONFIG_PATH


def load(path: Path | str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError naming the key and line."""
    return loads(_read(Path(path)), source=Path(path), env=env)


def load_store(path: Path | str) -> StoreConfig:
    """Only the ``[store]`` section of a config file, validated as :func:`load` validates
    it: all the read-only commands (``ls``, ``show``, ``history``, ``export``, ``stats``,
    ``alerts list|retry``) need. The rest is not read — secrets above all, so an operator
    can query the mirror without the daemon's environment (its token and webhook
    variables, its credentials directory)."""
    path = Path(path)
    text = _read(path).removeprefix("\ufeff")
    data = _parse_toml(text, path)
    parser = _Parser(text, {}, path)
    parser.table(data, "", "")
    if "store" in data and not isinstance(data["store"], dict):
        raise parser.fail("store", f"expected a table, got {_type_name(data['store'])}")
    return parser.store(data.get("store", {}))


def _read(path: Path) -> str:
    shown = short_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {shown} does not exist (pass --config PATH or set ${CONFIG_ENV})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {shown} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc.strerror or exc}") from None
    return text


def loads(text: str, *, source: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Validate config text (``source`` anchors relative paths; default: the cwd)."""
    # Editors on Windows save UTF-8 with a byte order mark; TOML itself does not allow one.
    text = text.removeprefix("\ufeff")
    data = _parse_toml(text, source)
    parser = _Parser(text, os.environ if env is None else env, source)
    config = parser.parse(data)
    # Only now: a config that fails shows its error alone, not warnings about keys that
    # never came into force above it.
    for event, fields in parser.warnings:
        log.warning(event, **fields)
    return config


def _parse_toml(text: str, source: Path | None) -> dict[str, Any]:
    """The TOML of ``text`` (its byte order mark already removed)."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        where = f"config file {short_path(source)}: " if source else ""
        raise ConfigError(
            f"{where}TOML syntax error: arrays or inline tables nested too deeply"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)", message)
        line: int | None = None
        if m:
            line = int(m.group(1))
            message = f"{message[: m.start()]} (column {m.group(2)})"
        elif "(at end of document)" in message:
            line = max(1, len(text.splitlines()))
            message = message.replace(" (at end of document)", " at the end of the file")
        raise ConfigError(f"TOML syntax error: {message}", line=line) from None
    return data


_T = TypeVar("_T")

_BARE_OR_QUOTED = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*"
_ARRAY_HEADER_RE = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE_HEADER_RE = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_KEY_RE = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_BARE_OR_QUOTED)
_MULTILINE_QUOTES = ('"' * 3, "'" * 3)


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for raw in _PART_RE.findall(dotted):
        if raw[:1] == '"':
            raw = raw[1:-1].encode("utf-8").decode("unicode_escape", errors="replace")
        elif raw[:1] == "'":
            raw = raw[1:-1]
        parts.append(raw)
    return parts


def index_lines(text: str) -> dict[str, int]:
    """Map every table and key of a TOML text to the line it is on, named as the parser names
    them: ``upstream``, ``upstream.region``, ``alerts.targets[1]``,
    ``alerts.targets[1].url_env``, ``alerts.rules[0].tags.team``.

    A best-effort line scanner, not a TOML parser: keys inside inline tables and multi-line
    values are not indexed (:meth:`_Parser.line_of` falls back to their nearest ancestor).
    """
    lines: dict[str, int] = {}
    arrays: dict[str, int] = {}  # indexed path of an array of tables -> its last index
    current = ""
    in_multiline: str | None = None

    def resolve(parts: list[str]) -> str:
        path = ""
        for part in parts:
            path = f"{path}.{part}" if path else part
            if path in arrays:
                path = f"{path}[{arrays[path]}]"
        return path

    for no, line in enumerate(text.splitlines(), 1):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        if m := _ARRAY_HEADER_RE.match(line):
            parts = _key_parts(m.group(1))
            array = f"{resolve(parts[:-1])}.{parts[-1]}" if parts[:-1] else parts[-1]
            arrays[array] = arrays.get(array, -1) + 1
            current = f"{array}[{arrays[array]}]"
            lines.setdefault(array, no)
            lines.setdefault(current, no)
            continue
        if m := _TABLE_HEADER_RE.match(line):
            current = resolve(_key_parts(m.group(1)))
            lines.setdefault(current, no)
            continue
        if m := _KEY_RE.match(line):
            parts = _key_parts(m.group(1))
            lines.setdefault(".".join([current, *parts] if current else parts), no)
            rest = line[m.end() :]
            for quote in _MULTILINE_QUOTES:
                if rest.count(quote) % 2 == 1:
                    in_multiline = quote
    return lines


class _Parser:
    def __init__(self, text: str, env: Mapping[str, str], source: Path | None) -> None:
        self.lines = index_lines(text)
        self.env = env
        self.base_dir = source.parent if source else Path.cwd()
        self.source = source
        #: (event, fields) to log once the whole config has loaded (see :func:`loads`)
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    # --- error helpers -------------------------------------------------------------------

    def line_of(self, key: str) -> int | None:
        """The line of a dotted key such as ``alerts.targets[1].url``, else that of its
        nearest ancestor that has one (an inline table, an array written inline)."""
        while key:
            if key in self.lines:
                return self.lines[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return None

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, key=key, line=self.line_of(key))

    # --- typed getters -------------------------------------------------------------------

    def table(self, data: Mapping[str, Any], key: str, section: str) -> Mapping[str, Any]:
        allowed = SECTION_KEYS[section] | REFUSED_KEYS.get(section, frozenset())
        unknown = sorted(set(data) - allowed)
        if unknown:
            name = f"{key}.{unknown[0]}" if key else unknown[0]
            known = ", ".join(sorted(SECTION_KEYS[section]))
            hint = _did_you_mean(unknown[0], SECTION_KEYS[section])
            raise self.fail(name, f"unknown key{hint} (known keys here: {known})")
        return data

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        name: str,
        kind: type[_T] | tuple[type, ...],
        default: _T,
        check: Callable[[Any], str | None] | None = None,
    ) -> _T:
        if name not in data:
            return default
        value = data[name]
        full = f"{key}.{name}" if key else name
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(full, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.fail(full, f"expected {_kind_name(kinds)}, got {_type_name(value)}")
        if check:
            problem = check(value)
            if problem:
                raise self.fail(full, problem)
        return value  # type: ignore[return-value]

    def number(
        self, data: Mapping[str, Any], key: str, name: str, default: float, lo: float, hi: float
    ) -> float:
        return float(self.get(data, key, name, (int, float), default, _range(lo, hi)))

    def str_list(
        self, data: Mapping[str, Any], key: str, name: str, choices: tuple[str, ...] | None = None
    ) -> tuple[str, ...]:
        if name not in data:
            return ()
        value = data[name]
        full = f"{key}.{name}"
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(full, f"expected a list of strings, got {_type_name(value)}")
        if choices:
            bad = [v for v in value if v not in choices]
            if bad:
                raise self.fail(full, f"{_shown(bad[0])} is not one of {', '.join(choices)}")
        return tuple(value)

    def statuses(self, data: Mapping[str, Any], key: str, name: str) -> tuple[str, ...]:
        """A list of experiment statuses, in the mirror's capitals. One PAI does not document
        is taken (an upstream may use its own: SUCCEEDED, say, which a user must be able to
        call terminal), with a warning naming the documented one it is closest to, since a
        typo is likelier."""
        full = f"{key}.{name}"
        out = []
        for value in self.str_list(data, key, name):
            status = value.strip().upper()
            if not _STATUS_RE.fullmatch(status):
                raise self.fail(full, f"{_shown(value)} is no status (letters, digits and _)")
            out.append(status)
        for status in (s for s in out if s not in EXPERIMENT_STATUSES):
            close = difflib.get_close_matches(status, EXPERIMENT_STATUSES, n=1)
            self.warnings.append(
                (
                    "config.status_undocumented",
                    {
                        "key": full,
                        # (a 64-hex DingTalk token pasted here passes as a status)
                        "status": status if len(status) <= 32 else _shown(status),
                        "did_you_mean": close[0] if close else None,
                    },
                )
            )
        return tuple(out)

    def expand(self, value: str, key: str, *, quote: bool = True) -> str:
        """``~`` and ``$NAME`` / ``${NAME}`` (from the environment given to load). Without
        ``quote`` an unset variable is not named: its name is a piece of ``value``."""

        def sub(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name not in self.env:
                if not quote:
                    raise self.fail(key, "an environment variable the path uses is not set")
                raise self.fail(key, f"environment variable {name} (used in the path) is not set")
            return self.env[name]

        return os.path.expanduser(re.sub(r"\$(?:\{(\w+)\}|(\w+))", sub, value))

    def path(self, value: str, key: str, *, quote: bool = True) -> Path:
        if "\0" in value:
            raise self.fail(key, "a path cannot contain a NUL character (\\u0000)")
        path = Path(self.expand(value, key, quote=quote))
        return path if path.is_absolute() else self.base_dir / path

    def secret(
        self, data: Mapping[str, Any], key: str, base: str, *, required: bool, literal_ok: bool
    ) -> tuple[Secret, str] | None:
        """Resolve ``<base>``, ``<base>_env`` or ``<base>_file`` into a Secret, with the
        dotted key it came from."""
        given = [n for n in (base, f"{base}_env", f"{base}_file") if n in data]
        if len(given) > 1:
            raise self.fail(f"{key}.{given[1]}", f"give only one of {', '.join(given)}")
        if not given:
            if required:
                options = f"{base}, {base}_env" if literal_ok else f"{base}_env"
                raise self.fail(key, f"missing {options} or {base}_file")
            return None
        name = given[0]
        full = f"{key}.{name}"
        value = data[name]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(full, f"expected a non-empty string, got {_type_name(value)}")
        if name == base:
            if not literal_ok:
                raise self.fail(
                    full,
                    "secrets must not live in the config file; name an environment variable "
                    f"with {base}_env or a file with {base}_file",
                )
            self.warnings.append(
                ("config.literal_secret", {"key": full, "hint": f"use {base}_env or {base}_file"})
            )
            return Secret(value.strip(), "config file"), full
        if name.endswith("_env"):
            if not _ENV_NAME_RE.fullmatch(value):
                # Not quoted: what is not a variable's name is most likely the secret itself,
                # pasted into the wrong key, and this message goes to the terminal and the log.
                raise self.fail(
                    full,
                    "must name an environment variable (letters, digits and _, such as "
                    f"HPO_SYNC_{base.upper()}), not hold the value itself; what it holds is no "
                    "such name and is not shown (it may be the secret)",
                )
            env_value = self.env.get(value)
            if env_value is None or not env_value.strip():
                # Named only when it reads as a variable's name: a DingTalk secret (SEC and
                # hex) is letters and digits too.
                shown = (
                    f"environment variable {value}"
                    if _CONVENTIONAL_ENV_NAME_RE.fullmatch(value)
                    else "the environment variable it names (not shown: it may be the secret)"
                )
                raise self.fail(full, f"{shown} is not set or empty")
            return Secret(env_value.strip(), f"env:{value}"), full
        # A file that cannot be read is named only when the value is plainly a path: anything
        # else may be the secret itself, pasted into the wrong key. And as written when it
        # names variables: one meant for <base>_env (token_file = "${API_TOKEN}") would put
        # the secret itself in the message.
        plain = _plainly_a_path(value)
        path = self.path(value, full, quote=plain)
        try:
            file_value = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise self.fail(full, f"secret file {path} is not UTF-8 text") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if not plain:
                shown = f"the file that {name} names"
            else:
                shown = f"secret file {value!r}" if "$" in value else f"secret file {path}"
            raise self.fail(full, f"cannot read {shown}: {reason}") from None
        if not file_value:
            raise self.fail(full, f"secret file {path} is empty")
        exposed = _exposure(path, full)
        if exposed:
            self.warnings.append(("config.secret_file_exposed", exposed))
        return Secret(file_value, f"file:{path}"), full

    def proxy_setting(self, d: Mapping[str, Any], k: str) -> Proxy | str | None:
        """``<k>.proxy``, ``proxy_env`` or ``proxy_file``: a Proxy; ``proxy = ""``: "" (no
        proxy, whatever the environment says); none of them: None (the environment's)."""
        given = [n for n in ("proxy", "proxy_env", "proxy_file") if n in d]
        if given == ["proxy"] and isinstance(d["proxy"], str):
            value = d["proxy"].strip()
            if not value:
                return ""
            trouble = proxies.problem(value)
            if trouble:
                raise self.fail(f"{k}.proxy", f"the value {trouble}")
            if proxies.has_password(value):
                self.warnings.append(
                    (
                        "config.literal_secret",
                        {"key": f"{k}.proxy", "hint": "use proxy_env or proxy_file"},
                    )
                )
            return Proxy(value, "config file")
        # (another type, or more than one of the keys: the secret reader names what is wrong)
        resolved = self.secret(d, k, "proxy", required=False, literal_ok=True)
        if resolved is None:
            return None
        secret, key = resolved
        trouble = proxies.problem(secret.reveal())
        if trouble:
            raise self.fail(key, f"the value {trouble}")
        return Proxy(secret.reveal(), secret.source)

    def proxy_for(self, setting: Proxy | str | None, url: str, key: str) -> Proxy | None:
        """The proxy requests to ``url`` go through under ``setting`` (see
        :meth:`proxy_setting`), or None for direct; ``key`` is the setting's, for errors."""
        if setting == "" or proxies.bypassed(url, self.env):
            return None
        if isinstance(setting, Proxy):
            return setting
        found = proxies.from_environment(urlsplit(url).scheme, self.env)
        if found is None:
            return None
        name, value = found
        trouble = proxies.problem(value)
        if trouble:
            raise self.fail(
                key,
                f'the environment\'s {name} {trouble}; set {key} ("" for none), or name '
                "the host in NO_PROXY",
            )
        return Proxy(value, f"env:{name}")

    # --- sections ------------------------------------------------------------------------

    def parse(self, data: Mapping[str, Any]) -> Config:
        self.table(data, "", "")
        for section in ("upstream", "store", "sync", "api", "alerts", "logging"):
            if section in data and not isinstance(data[section], dict):
                raise self.fail(section, f"expected a table, got {_type_name(data[section])}")
        workspaces = self.workspaces(data)
        workspace_ids = {w.id for w in workspaces}
        upstream = self.upstream(data.get("upstream", {}))
        store = self.store(data.get("store", {}))
        sync = self.sync(data.get("sync", {}))
        api = self.api(data.get("api", {}), workspace_ids)
        alerts = self.alerts(data.get("alerts", {}), workspace_ids)
        if "stalled_after_s" not in data.get("alerts", {}):
            # The default, for a hot interval of up to 10 minutes; past that, three of them
            # (a config that sets neither alerts nor a stall time must not be refused below).
            stalled = max(alerts.stalled_after_s, STALLED_HOT_INTERVALS * sync.hot_interval_s)
            alerts = replace(alerts, stalled_after_s=stalled)
        if alerts.stalled_after_s <= sync.hot_interval_s:
            # A healthy workspace's last success is up to a hot interval old before each
            # sync: it would be reported stalled, then recovered, on every cycle.
            raise self.fail(
                "alerts.stalled_after_s",
                f"{_number(alerts.stalled_after_s)} s is not longer than sync.hot_interval_s "
                f"({_number(sync.hot_interval_s)} s): every healthy workspace would be reported "
                "stalled and recovered each cycle; make it several hot intervals",
            )
        return Config(
            upstream=upstream,
            store=store,
            sync=sync,
            workspaces=workspaces,
            api=api,
            alerts=alerts,
            logging=self.logging(data.get("logging", {})),
            source=self.source,
        )

    def upstream(self, d: Mapping[str, Any]) -> UpstreamConfig:
        k = "upstream"
        self.table(d, k, k)
        dflt = UpstreamConfig()
        endpoint = self.get(d, k, "endpoint", str, "", _check_url) or None
        region = self.get(d, k, "region", str, dflt.region, _check_region)
        vpc = self.get(d, k, "vpc", bool, dflt.vpc)
        sort_by = self.get(d, k, "sort_by", str, dflt.sort_by, _check_sort_name)
        sort_by_modified = self.get(
            d,
            k,
            "sort_by_modified",
            str,
            SORT_BY_VOCABULARIES.get(sort_by, dflt.sort_by_modified),
            _check_sort_name,
        )
        return UpstreamConfig(
            region=region,
            endpoint=endpoint.rstrip("/") if endpoint else None,
            vpc=vpc,
            page_size=self.get(d, k, "page_size", int, dflt.page_size, _range(1, 1000)),
            max_concurrency=self.get(
                d, k, "max_concurrency", int, dflt.max_concurrency, _range(1, 64)
            ),
            max_qps=self.number(d, k, "max_qps", dflt.max_qps, 0.01, 1e4),
            timeout_s=self.number(d, k, "timeout_s", dflt.timeout_s, 0.1, 600),
            sort_by=sort_by,
            sort_by_modified=sort_by_modified,
            create_time_zone=self.get(
                d, k, "create_time_zone", str, dflt.create_time_zone, _check_zone
            ),
            retry_max_attempts=self.get(
                d, k, "retry_max_attempts", int, dflt.retry_max_attempts, _range(1, 100)
            ),
            retry_max_total_s=self.number(
                d, k, "retry_max_total_s", dflt.retry_max_total_s, 1, 86400
            ),
            proxy=self.proxy_for(
                self.proxy_setting(d, k),
                UpstreamConfig(region=region, endpoint=endpoint, vpc=vpc).base_url,
                f"{k}.proxy",
            ),
        )

    def store(self, d: Mapping[str, Any]) -> StoreConfig:
        self.table(d, "store", "store")
        raw = self.get(d, "store", "path", str, str(StoreConfig().path), _non_empty)
        path = self.path(raw, "store.path")
        if path.is_dir():
            # Found now, naming the key, not as sync, run and serve failing to open it.
            raise self.fail(
                "store.path",
                f"{path} is a directory, not a mirror file: name the database file itself "
                f"(e.g. {path / 'mirror.db'})",
            )
        return StoreConfig(path=path)

    def sync(self, d: Mapping[str, Any]) -> SyncConfig:
        k = "sync"
        self.table(d, k, k)
        dflt = SyncConfig()
        terminal = (
            self.statuses(d, k, "terminal_statuses")
            if "terminal_statuses" in d
            else dflt.terminal_statuses
        )
        hot = self.number(d, k, "hot_interval_s", dflt.hot_interval_s, 1, 86400)
        full = self.number(d, k, "full_interval_s", dflt.full_interval_s, 10, 7 * 86400)
        if full < hot:
            raise self.fail(f"{k}.full_interval_s", "must not be shorter than hot_interval_s")
        return SyncConfig(
            hot_interval_s=hot,
            full_interval_s=full,
            terminal_statuses=terminal,
            create_time_overlap_s=self.number(
                d, k, "create_time_overlap_s", dflt.create_time_overlap_s, 0, 7 * 86400
            ),
            jitter_s=self.number(d, k, "jitter_s", dflt.jitter_s, 0, 3600),
            failure_backoff_max_s=self.number(
                d, k, "failure_backoff_max_s", dflt.failure_backoff_max_s, 1, 86400
            ),
            sweep_process=self.get(d, k, "sweep_process", bool, dflt.sweep_process),
        )

    def workspaces(self, data: Mapping[str, Any]) -> tuple[WorkspaceConfig, ...]:
        raw = data.get("workspaces")
        if raw is None:
            raise self.fail(
                "workspaces", "no [[workspaces]] configured: add at least one with an id"
            )
        if not isinstance(raw, list) or not raw:
            raise self.fail("workspaces", "expected one or more [[workspaces]] tables")
        out: list[WorkspaceConfig] = []
        seen: set[str] = set()
        for i, w in enumerate(raw):
            k = f"workspaces[{i}]"
            if not isinstance(w, dict):
                example = f"id = {json.dumps(str(w))}" if isinstance(w, int | str) else "id = …"
                raise self.fail(
                    k,
                    f"expected a table, got {_type_name(w)}: write each workspace as a "
                    f"[[workspaces]] table with {example}",
                )
            self.table(w, k, "workspaces[]")
            if "id" not in w:
                raise self.fail(k, "missing id")
            wid = w["id"]
            if isinstance(wid, int) and not isinstance(wid, bool):
                wid = str(wid)
            if not isinstance(wid, str) or not wid.strip():
                raise self.fail(f"{k}.id", "expected a non-empty string")
            wid = wid.strip()
            if not _WORKSPACE_ID_RE.fullmatch(wid):
                raise self.fail(
                    f"{k}.id",
                    f"{wid[:40]!r} cannot be a workspace id: no spaces or control characters, "
                    'at most 128 characters (PAI\'s are numbers such as "100001")',
                )
            if wid in seen:
                raise self.fail(f"{k}.id", f"workspace {wid!r} is listed twice")
            seen.add(wid)
            out.append(WorkspaceConfig(id=wid, label=self.get(w, k, "label", str, None)))
        return tuple(out)

    def api(self, d: Mapping[str, Any], workspace_ids: set[str]) -> ApiConfig:
        k = "api"
        self.table(d, k, k)
        listen = self.get(d, k, "listen", str, ApiConfig().listen)
        try:
            _parse_listen(listen, "api.listen")
        except ConfigError as exc:
            raise self.fail("api.listen", exc.bare_message) from None
        tokens: list[TokenConfig] = []
        raw = d.get("tokens", [])
        if not isinstance(raw, list):
            raise self.fail("api.tokens", "expected [[api.tokens]] tables")
        for i, t in enumerate(raw):
            tk = f"api.tokens[{i}]"
            if not isinstance(t, dict):
                raise self.fail(tk, "expected a table")
            self.table(t, tk, "api.tokens[]")
            name = self.get(t, tk, "name", str, "", _non_empty)
            if not name:
                raise self.fail(tk, "missing name")
            if any(x.name == name for x in tokens):
                raise self.fail(f"{tk}.name", f"token name {name!r} is used twice")
            resolved = self.secret(t, tk, "token", required=True, literal_ok=False)
            if resolved is None:  # pragma: no cover - required=True raises instead
                raise self.fail(tk, "missing token_env or token_file")
            token, token_key = resolved
            same = next((x for x in tokens if x.token == token), None)
            if same is not None:
                raise self.fail(token_key, f"the same token value as token {same.name!r}")
            ws = self.str_list(t, tk, "workspaces")
            unknown = [w for w in ws if w not in workspace_ids]
            if unknown:
                raise self.fail(
                    f"{tk}.workspaces", f"workspace {_shown(unknown[0])} is not configured"
                )
            tokens.append(TokenConfig(name, token, ws, self.get(t, tk, "admin", bool, False)))
        return ApiConfig(listen=listen, tokens=tuple(tokens))

    def alerts(self, d: Mapping[str, Any], workspace_ids: set[str]) -> AlertsConfig:
        k = "alerts"
        self.table(d, k, k)
        dflt = AlertsConfig()
        proxy = self.proxy_setting(d, k)
        targets: list[TargetConfig] = []
        raw_targets = d.get("targets", [])
        if not isinstance(raw_targets, list):
            raise self.fail("alerts.targets", "expected [[alerts.targets]] tables")
        for i, t in enumerate(raw_targets):
            tk = f"alerts.targets[{i}]"
            if not isinstance(t, dict):
                raise self.fail(tk, "expected a table")
            self.table(t, tk, "alerts.targets[]")
            name = self.get(t, tk, "name", str, "", _non_empty)
            if not name:
                raise self.fail(tk, "missing name")
            if any(x.name == name for x in targets):
                raise self.fail(f"{tk}.name", f"target name {name!r} is used twice")
            ttype = self.get(t, tk, "type", str, "", _choice(TARGET_TYPES))
            if not ttype:
                raise self.fail(tk, f"missing type (one of {', '.join(TARGET_TYPES)})")
            resolved = self.secret(t, tk, "url", required=True, literal_ok=True)
            if resolved is None:  # pragma: no cover - required=True raises instead
                raise self.fail(tk, "missing url, url_env or url_file")
            url, url_key = resolved
            if not re.match(r"^https?://[^\s/?#]+", url.reveal()):
                raise self.fail(
                    url_key, "the webhook URL must start with http:// or https:// and a host"
                )
            if re.search(r"\s", url.reveal()):
                raise self.fail(
                    url_key, "the webhook URL holds a blank or a line break; percent-encode it"
                )
            # Found out now, not as every alert to this target dead-lettered at send time.
            try:
                parts = urlsplit(url.reveal())
            except ValueError:  # "http://[::1/x": its text would not help (and is not shown)
                raise self.fail(
                    url_key, "the webhook URL's host cannot be read (an IPv6 address's [ … ]?)"
                ) from None
            try:
                port_ok = parts.port != 0
            except ValueError:  # not a number, or past 65535
                port_ok = False
            if not port_ok:
                raise self.fail(url_key, "the webhook URL's port is not a number from 1 to 65535")
            host_problem = _host_problem(url.reveal())
            if host_problem:
                raise self.fail(url_key, f"the webhook URL cannot be used: {host_problem}")
            secret = self.secret(t, tk, "secret", required=False, literal_ok=False)
            own = self.proxy_setting(t, tk)  # (this target's, over alerts.proxy)
            if secret:
                try:
                    webhook_key(secret[0].reveal())  # the key the signer will use
                except ValueError:
                    raise self.fail(
                        secret[1], "a whsec_ secret must be whsec_ and base64 (as issued)"
                    ) from None
            targets.append(
                TargetConfig(
                    name=name,
                    type=ttype,
                    url=url,
                    secret=secret[0] if secret else None,
                    keyword=self.get(t, tk, "keyword", str, None, _non_empty),
                    proxy=self.proxy_for(
                        own if own is not None else proxy,
                        url.reveal(),
                        f"{tk}.proxy" if own is not None else f"{k}.proxy",
                    ),
                )
            )
        target_names = {t.name for t in targets}
        max_age_s = self.number(d, k, "max_age_s", dflt.max_age_s, 60, 30 * 86400)
        group_wait_s = self.number(d, k, "group_wait_s", dflt.group_wait_s, 0, 3600)
        if group_wait_s >= max_age_s:
            # Expiry counts from when the alert was raised, and none is sent before the wait
            # is over: every alert would expire unsent, never tried once.
            raise self.fail(
                f"{k}.group_wait_s",
                f"{_number(group_wait_s)} s is not shorter than alerts.max_age_s "
                f"({_number(max_age_s)} s): "
                "every alert would expire unsent; shorten the wait or raise max_age_s",
            )
        rules: list[RuleConfig] = []
        raw_rules = d.get("rules", [])
        if not isinstance(raw_rules, list):
            raise self.fail("alerts.rules", "expected [[alerts.rules]] tables")
        for i, r in enumerate(raw_rules):
            rk = f"alerts.rules[{i}]"
            if not isinstance(r, dict):
                raise self.fail(rk, "expected a table")
            self.table(r, rk, "alerts.rules[]")
            name = self.get(r, rk, "name", str, "", _non_empty)
            if not name:
                raise self.fail(rk, "missing name")
            if any(x.name == name for x in rules):
                raise self.fail(f"{rk}.name", f"rule name {name!r} is used twice")
            rule_targets = self.str_list(r, rk, "targets")
            if not rule_targets:
                raise self.fail(f"{rk}.targets", "name at least one target")
            missing = [t for t in rule_targets if t not in target_names]
            if missing:
                raise self.fail(f"{rk}.targets", f"no target named {_shown(missing[0])}")
            ws = self.str_list(r, rk, "workspaces")
            unknown = [w for w in ws if w not in workspace_ids]
            if unknown:
                raise self.fail(
                    f"{rk}.workspaces", f"workspace {_shown(unknown[0])} is not configured"
                )
            tags_raw = self.get(r, rk, "tags", dict, {})
            tags = []
            for tkey, tval in tags_raw.items():
                if not isinstance(tval, str):
                    raise self.fail(f"{rk}.tags.{tkey}", "tag values must be strings")
                tags.append((tkey, tval))
            experiments = self.str_list(r, rk, "experiments")
            if any(not g.strip() for g in experiments):
                raise self.fail(f"{rk}.experiments", "an empty name pattern matches nothing")
            rules.append(
                RuleConfig(
                    name=name,
                    targets=rule_targets,
                    workspaces=ws,
                    experiments=experiments,
                    tags=tuple(tags),
                    from_status=self.statuses(r, rk, "from_status"),
                    to_status=self.statuses(r, rk, "to_status"),
                    trial_failures_rose=self.get(r, rk, "trial_failures_rose", bool, False),
                    trial_failures_min=self.get(
                        r, rk, "trial_failures_min", int, 1, _range(1, 10**6)
                    ),
                    quiet_hours=self.get(r, rk, "quiet_hours", str, None, _check_quiet_hours),
                )
            )
            if "trial_failures_min" in r and not rules[-1].trial_failures_rose:
                # Read only with trial_failures_rose: alone, the rule had no condition left
                # and alerted on every change.
                raise self.fail(
                    f"{rk}.trial_failures_min",
                    "only counts with trial_failures_rose = true (set it, or remove this key)",
                )
            quiet_s = _quiet_window_s(rules[-1].quiet_hours)
            if quiet_s >= max_age_s:
                # Expiry counts from when the alert was raised: one raised as the window
                # opens would expire before it closes, never tried once.
                raise self.fail(
                    f"{rk}.quiet_hours",
                    f"a quiet window of {quiet_s / 3600:g} h is not shorter than "
                    f"alerts.max_age_s ({_number(max_age_s)} s): alerts raised as it begins would "
                    "expire unsent; shorten the window or raise max_age_s",
                )
        return AlertsConfig(
            group_wait_s=group_wait_s,
            max_age_s=max_age_s,
            stalled_after_s=self.number(
                d, k, "stalled_after_s", dflt.stalled_after_s, 10, 30 * 86400
            ),
            console_url=self.get(d, k, "console_url", str, dflt.console_url, _check_console_url),
            targets=tuple(targets),
            rules=tuple(rules),
        )

    def logging(self, d: Mapping[str, Any]) -> LoggingConfig:
        self.table(d, "logging", "logging")
        level = self.get(d, "logging", "level", str, "info", _choice(LOG_LEVELS, fold=True))
        fmt = self.get(d, "logging", "format", str, "auto", _choice(LOG_FORMATS, fold=True))
        return LoggingConfig(level=level.lower(), format=fmt.lower())


# ---------------------------------------------------------------------------------------------
# Checks (return a problem string or None)


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a table",
        list: "a list",
    }
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a table",
        list: "a list",
    }.get(type(value), f"a {type(value).__name__}")


def _did_you_mean(name: str, known: frozenset[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _number(x: float) -> str:
    """A limit as a user writes it: 2592000, not 2.592e+06 (as ``{:g}`` has it)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return (
            None if lo <= v <= hi else f"must be between {_number(lo)} and {_number(hi)}, got {v}"
        )

    return check


def _shown(v: Any, limit: int = 32) -> str:
    """``v`` quoted for an error message, unless it may be a secret pasted into the wrong
    key (a webhook URL, a token: with ``://``, or longer than ``limit``, a little more than
    any name the key takes), which the message then leaves out, as the ``*_env`` keys'
    messages do. (A DingTalk token is 64 hex digits, a WeCom key a 36-character UUID.)"""
    text = str(v)
    if "://" in text or len(text) > limit:
        return f"a value of {len(text)} characters (not shown: it may be a secret)"
    return repr(v)


def _choice(choices: tuple[str, ...], *, fold: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = (v.lower() if fold else v) in choices
        limit = max(len(c) for c in choices) + 4  # (room for a typo of the longest)
        return None if ok else f"{_shown(v, limit)} is not one of {', '.join(choices)}"

    return check


def _non_empty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


#: What a workspace id may look like: PAI's are decimal numbers; anything printable without
#: spaces is let through (it goes upstream as a query parameter and is refused there). The
#: read API takes the same ids (``api.openapi``).
WORKSPACE_ID_MAX_LEN = 128
WORKSPACE_ID_CHARS = r"[^\s\x00-\x1f\x7f]"
_WORKSPACE_ID_RE = re.compile(rf"{WORKSPACE_ID_CHARS}{{1,{WORKSPACE_ID_MAX_LEN}}}")


def _exposure(path: Path, key: str) -> dict[str, Any] | None:
    """The fields of a warning (as ssh refuses) when a secret file is readable or writable
    by group or others, else None. A warning, not an error: a group-readable file may be the
    deliberate way a deployment shares it, and refusing would stop the daemon over a mode it
    can do nothing about."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return {
        "key": key,
        "path": str(path),
        "mode": oct(mode & 0o777),
        "hint": f"chmod 600 {path} (or hand it over with systemd's LoadCredential=)",
    }


#: What a ``*_env`` key may hold: the name of an environment variable, as shells write them.
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


#: ``alerts.stalled_after_s`` when not set: its default, or this many hot intervals if longer.
STALLED_HOT_INTERVALS = 3

#: A ``*_env`` value an error may quote: a variable's name as people write them, in
#: capitals, with an underscore unless it is short (``HPO_SYNC_SLACK_URL``, ``TOKEN``). Not
#: a DingTalk secret (``SEC`` and lower-case hex) or a capitalised random token.
_CONVENTIONAL_ENV_NAME_RE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z][A-Z0-9]{0,15}")


def _plainly_a_path(value: str) -> bool:
    """Whether a ``*_file`` value may be quoted in an error: an absolute path (as written,
    from ``~`` or from a variable such as ``${CREDENTIALS_DIRECTORY}``) of the characters
    paths are made of. Anything else (a relative name, a value with ``+``, ``=``, ``:`` or a
    blank, as base64 secrets and URLs have) cannot be told apart from a secret pasted into
    the wrong key."""
    absolute = value.startswith(("/", "~")) or re.match(r"\$\{?[A-Za-z_]", value)
    return bool(absolute) and re.fullmatch(r"[A-Za-z0-9._~/${}-]+", value) is not None


def _host_problem(url: str) -> str | None:
    """What the client's URL parser (yarl, which every request is built with) or the host's
    IDNA encoding (done when connecting) would refuse in ``url``, without quoting it (a
    webhook URL holds its token): found now, not as every sync or alert failing later."""
    try:
        host = URL(url).host
    except ValueError as exc:  # "Invalid URL: backslash ('\\') is not allowed in ..."
        text = str(exc)
        authority = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)", url)
        if authority and authority.group(1):  # (some of its messages quote it)
            text = text.replace(authority.group(1), "…")
        return text
    if host:
        try:
            host.encode("idna")
        except UnicodeError:
            return "the host is not a valid name (a label of more than 63 characters, or empty)"
    return None


def _check_url(v: Any) -> str | None:
    if v == "":
        return None
    problem = "expected a base URL, such as http://127.0.0.1:8780"
    # A path is a proxy's prefix, which the client sends before the API path and does not
    # sign (the proxy strips it before the gateway, which checks the signed path).
    match = re.match(r"^https?://[^\s/?#@]+(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?$", v)
    if not match:
        return f"{problem} (scheme, host[:port] and at most a path: no query, fragment or user)"
    if "/api/automl/" in f"{match.group(1) or ''}/":  # (client.PATH, not imported: aiohttp)
        return f"{problem}, without the API path (/api/automl/…): the client adds it"
    # The client builds every request from this URL: a host or port it cannot read would
    # otherwise only fail at the first sync.
    try:
        parts = urlsplit(v)
    except ValueError:  # an unclosed or invalid [IPv6] host
        return f"{problem} (a host in brackets must be an IPv6 address, closed: http://[::1]:8780)"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return f"{problem} (the port must be a number from 1 to 65535)"
    if not parts.hostname:
        return f"{problem} (the host is missing)"
    host_problem = _host_problem(v)
    if host_problem:
        return f"{problem} ({host_problem})"
    return None


def _check_region(v: Any) -> str | None:
    # (one label of the endpoint's host name: at most 63 characters)
    if re.match(r"^[a-z]{2}(-[a-z0-9]+)+$", v) and len(v) <= 63:
        return None
    return f"{_shown(v)} is not a region id (e.g. {', '.join(REGIONS)})"


def _check_sort_name(v: Any) -> str | None:
    return None if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v) else f"{_shown(v)} is not a field name"


# Minutes 00 to 59: "+08:60" is no offset (not +09:00), as parse_time reads upstream times.
_OFFSET_RE = re.compile(r"^(?:UTC|GMT)?([+-])(\d{1,2})(?::?([0-5]\d))?$", re.ASCII)


def _zone(name: str) -> timezone | ZoneInfo:
    """An IANA zone name, ``UTC``, or a fixed offset such as ``+08:00`` or ``UTC+8``."""
    if name.upper() in ("UTC", "Z", "GMT"):
        return UTC
    m = _OFFSET_RE.match(name)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        offset = timedelta(hours=int(m.group(2)), minutes=int(m.group(3) or 0))
        return timezone(sign * offset)  # ValueError beyond ±24 h
    return ZoneInfo(name)


def _check_zone(v: Any) -> str | None:
    try:
        _zone(v)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Asia" is a directory
        return (
            f"unknown time zone {v!r} (use an IANA name such as UTC or Asia/Shanghai, "
            "or an offset such as +08:00)"
        )
    return None


def _check_quiet_hours(v: Any) -> str | None:
    if re.match(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$", v, re.ASCII):
        return None
    return "expected HH:MM-HH:MM (UTC), e.g. 22:00-07:00"


def _quiet_window_s(spec: str | None) -> int:
    """How long a ``quiet_hours`` window lasts, in seconds (0 for none or an empty one)."""
    if not spec:
        return 0
    start, end = ((int(t[:2]) * 60 + int(t[3:])) for t in spec.split("-"))
    return (end - start) % 1440 * 60


def _check_console_url(v: Any) -> str | None:
    if not re.match(r"^https?://", v):
        return "expected an http:// or https:// URL template"
    fields = ", ".join("{" + f + "}" for f in CONSOLE_URL_FIELDS)
    allowed = f"(the template may use {fields}; {{{{ and }}}} for literal braces)"
    try:
        parsed = list(string.Formatter().parse(v))
    except ValueError as exc:
        return f"bad placeholder: {exc} {allowed}"
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in CONSOLE_URL_FIELDS:
            return f"bad placeholder {{{name}}} {allowed}"
        if spec or conversion:
            # A format spec has no use in a URL, and a huge width ({region:999999999999})
            # would build a string that exhausts memory.
            return f"bad placeholder {{{name}}}: write it bare, without a format spec or conversion"
    return None


_HOSTNAME_RE = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _parse_listen(value: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into (host, port); an empty host is loopback."""
    problem = ConfigError("expected HOST:PORT, e.g. 127.0.0.1:8787 or [::1]:8787", key=key)
    host, sep, port = value.strip().rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise problem
    if int(port) > 65535:
        raise ConfigError(f"the port must be a number from 0 to 65535, got {int(port)}", key=key)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise problem from None
        return host[1:-1], int(port)
    if not host:
        return "127.0.0.1", int(port)
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
            raise problem from None
    return host, int(port)


# ---------------------------------------------------------------------------------------------
# Dump


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data, every secret replaced by where it comes from."""

    def conv(value: Any) -> Any:
        if isinstance(value, Proxy):
            return value.shown
        if isinstance(value, Secret):
            return f"<redacted: {value.source}>"
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, RuleConfig):
            return {**conv_fields(value), "tags": dict(value.tags)}
        if hasattr(value, "__dataclass_fields__"):
            return conv_fields(value)
        if isinstance(value, tuple | list):
            return [conv(v) for v in value]
        return value

    def conv_fields(value: Any) -> dict[str, Any]:
        return {f: conv(getattr(value, f)) for f in value.__dataclass_fields__ if f != "source"}

    out: dict[str, Any] = conv(config)
    return out
