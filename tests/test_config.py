"""The config file: the example loads and documents every key; every mistake is named."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from hpo_sync import config
from hpo_sync.config import (
    DEFAULT_CONFIG_PATH,
    REFUSED_KEYS,
    SECTION_KEYS,
    AlertsConfig,
    ApiConfig,
    Config,
    LoggingConfig,
    RuleConfig,
    Secret,
    StoreConfig,
    SyncConfig,
    TargetConfig,
    TokenConfig,
    UpstreamConfig,
    WorkspaceConfig,
    load,
    loads,
    redacted,
    resolve_path,
)
from hpo_sync.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "hpo-sync.example.toml"
EXAMPLE_ENV = {
    "HPO_SYNC_API_TOKEN": "tok-3f9a1c7e5b2d",
    "HPO_SYNC_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/slk9q8w7e6",
    "HPO_SYNC_DINGTALK_WEBHOOK_URL": "https://oapi.dingtalk.com/robot/send?access_token=dt5x4c3v",
    "HPO_SYNC_DINGTALK_SECRET": "SECd1n9t4lk",
}

MINIMAL = '[[workspaces]]\nid = "ws1"\n'


def error(text: str, env: dict[str, str] | None = None, source: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, env=env or {}, source=source)
    return str(info.value)


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the line holding ``needle`` (its n-th occurrence)."""
    hits = [no for no, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


# --- the example file ----------------------------------------------------------------------


def test_the_example_loads() -> None:
    with capture_logs() as logs:
        cfg = load(EXAMPLE, env=EXAMPLE_ENV)
    assert logs == []  # no literal secret in it, so no warning
    assert cfg.source == EXAMPLE
    assert cfg.workspace_ids() == ("12345", "67890")
    assert cfg.upstream == UpstreamConfig()  # it sets every default explicitly or not at all
    assert cfg.sync == SyncConfig()
    assert cfg.logging == LoggingConfig()
    assert cfg.store == StoreConfig()
    assert cfg.api.listen == ApiConfig().listen
    assert cfg.api.tokens[0].token.reveal() == EXAMPLE_ENV["HPO_SYNC_API_TOKEN"]
    assert cfg.alerts.targets[1].secret is not None
    assert cfg.alerts.targets[1].secret.reveal() == EXAMPLE_ENV["HPO_SYNC_DINGTALK_SECRET"]
    rules = {r.name: r for r in cfg.alerts.rules}
    assert set(rules["experiment failed"].to_status) == {"FAILED", "SYS_CANCELED"}
    assert rules["experiment finished"].to_status == ("FINISHED",)


def test_the_example_needs_its_environment() -> None:
    with pytest.raises(ConfigError, match=r"api\.tokens\[0\]\.token_env \(line \d+\)"):
        load(EXAMPLE, env={})


def _documented_keys(text: str) -> dict[str, set[str]]:
    """Section (arrays as ``name[]``) -> keys set or shown commented-out in the text."""
    keys: dict[str, set[str]] = {"": set()}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        commented = re.match(r"^#\s?(\[\[?[A-Za-z_.]+\]\]?\s*$|[A-Za-z_]+\s*=.*)$", line)
        if commented:
            line = commented.group(1)
        elif line.startswith("#"):
            continue
        if m := re.match(r"^\[\[([A-Za-z_.]+)\]\]$", line):
            section = m.group(1) + "[]"
        elif m := re.match(r"^\[([A-Za-z_.]+)\]$", line):
            section = m.group(1)
        elif m := re.match(r"^([A-Za-z_]+)\s*=", line):
            keys.setdefault(section, set()).add(m.group(1))
            continue
        else:
            continue
        keys.setdefault(section, set())
        parent, _, leaf = section.removesuffix("[]").rpartition(".")
        keys.setdefault(parent, set()).add(leaf)  # a table is a key of its parent
    return keys


def test_every_accepted_key_is_documented_in_the_example() -> None:
    documented = _documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    missing = {
        f"{section}.{key}" if section else key
        for section, accepted in SECTION_KEYS.items()
        for key in accepted
        if key not in documented.get(section, set())
    }
    assert not missing, f"keys the parser accepts but the example does not show: {missing}"
    unknown = {
        f"{section}.{key}" if section else key
        for section, shown in documented.items()
        for key in shown
        if key not in SECTION_KEYS.get(section, frozenset())
    }
    assert not unknown, f"keys shown in the example that the parser rejects: {unknown}"


SECTIONS_OF: dict[type, str] = {
    Config: "",
    UpstreamConfig: "upstream",
    StoreConfig: "store",
    SyncConfig: "sync",
    WorkspaceConfig: "workspaces[]",
    ApiConfig: "api",
    TokenConfig: "api.tokens[]",
    AlertsConfig: "alerts",
    TargetConfig: "alerts.targets[]",
    RuleConfig: "alerts.rules[]",
    LoggingConfig: "logging",
}


def test_every_config_field_is_a_key_in_the_example() -> None:
    """A field added to a config object must be parsed and documented (or the test fails)."""
    documented = _documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    for cls, section in SECTIONS_OF.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is Config and f.name == "source":
                continue  # where the file was found, not a key
            shown = documented.get(section, set())
            if "Secret" in str(hints[f.name]):  # secrets are named, never written
                assert {f"{f.name}_env", f"{f.name}_file"} <= shown, (section, f.name)
            else:
                assert f.name in shown, f"{section or 'top level'}: {f.name} is not documented"


def test_every_config_class_is_covered() -> None:
    found = {Config}
    todo = [Config]
    while todo:
        cls = todo.pop()
        for hint in typing.get_type_hints(cls).values():
            for arg in [hint, *typing.get_args(hint)]:
                if dataclasses.is_dataclass(arg) and arg not in found:
                    found.add(arg)  # type: ignore[arg-type]
                    todo.append(arg)  # type: ignore[arg-type]
    assert found == set(SECTIONS_OF)


def test_refused_keys_name_their_replacements() -> None:
    for section, refused in REFUSED_KEYS.items():
        for key in refused:
            assert {f"{key}_env", f"{key}_file"} <= SECTION_KEYS[section]


# --- defaults and values -------------------------------------------------------------------


def test_a_minimal_config_takes_the_defaults(tmp_path: Path) -> None:
    cfg = loads(MINIMAL, env={})
    assert cfg == Config(workspaces=(WorkspaceConfig("ws1"),))
    assert cfg.upstream.base_url == "https://paiautoml.cn-hangzhou.aliyuncs.com"
    assert cfg.sync.non_terminal_statuses == (
        "CREATED",
        "RUNNING",
        "WAITING",
        "NO_MORE_TRIAL",
        "UNKNOWN",
    )
    assert cfg.api.host_port == ("127.0.0.1", 8787)


@pytest.mark.parametrize(
    ("upstream", "base_url"),
    [
        ('region = "cn-shanghai"', "https://paiautoml.cn-shanghai.aliyuncs.com"),
        ('region = "cn-beijing"\nvpc = true', "https://paiautoml-vpc.cn-beijing.aliyuncs.com"),
        ('endpoint = "http://127.0.0.1:8780/"\nvpc = true', "http://127.0.0.1:8780"),
    ],
)
def test_base_url(upstream: str, base_url: str) -> None:
    cfg = loads(f"[upstream]\n{upstream}\n{MINIMAL}", env={})
    assert cfg.upstream.base_url == base_url


@pytest.mark.parametrize(
    ("zone", "offset"),
    [
        ("UTC", timedelta(0)),
        ("Asia/Shanghai", timedelta(hours=8)),
        ("+08:00", timedelta(hours=8)),
        ("UTC+8", timedelta(hours=8)),
        ("-05:30", -timedelta(hours=5, minutes=30)),
    ],
)
def test_create_time_zone(zone: str, offset: timedelta) -> None:
    from datetime import datetime

    cfg = loads(f'[upstream]\ncreate_time_zone = "{zone}"\n{MINIMAL}', env={})
    assert datetime(2024, 1, 1, tzinfo=cfg.upstream.tz).utcoffset() == offset
    if "/" in zone:
        assert cfg.upstream.tz == ZoneInfo(zone)


def test_sort_by_modified_follows_the_vocabulary_of_sort_by() -> None:
    cfg = loads(f'[upstream]\nsort_by = "create_time"\n{MINIMAL}', env={})
    assert cfg.upstream.sort_by_modified == "update_time"
    cfg = loads(f'[upstream]\nsort_by = "create_time"\nsort_by_modified = "x"\n{MINIMAL}', env={})
    assert cfg.upstream.sort_by_modified == "x"


def test_numbers_accept_integers_and_floats() -> None:
    cfg = loads(f"[upstream]\nmax_qps = 2\ntimeout_s = 2.5\n{MINIMAL}", env={})
    assert cfg.upstream.max_qps == 2.0
    assert isinstance(cfg.upstream.max_qps, float)
    assert cfg.upstream.timeout_s == 2.5


def test_numeric_workspace_ids_become_text() -> None:
    cfg = loads("[[workspaces]]\nid = 12345\n[[workspaces]]\nid = ' w2 '\n", env={})
    assert cfg.workspace_ids() == ("12345", "w2")


def test_logging_names_are_case_insensitive() -> None:
    cfg = loads(f'[logging]\nlevel = "DEBUG"\nformat = "JSON"\n{MINIMAL}', env={})
    assert cfg.logging == LoggingConfig(level="debug", format="json")


def test_store_path_is_expanded_and_anchored(tmp_path: Path) -> None:
    cfg_file = tmp_path / "etc" / "config.toml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(f'[store]\npath = "data/mirror.db"\n{MINIMAL}', encoding="utf-8")
    assert load(cfg_file, env={}).store.path == tmp_path / "etc" / "data" / "mirror.db"
    text = f'[store]\npath = "${{STATE_DIRECTORY}}/mirror.db"\n{MINIMAL}'
    cfg = loads(text, env={"STATE_DIRECTORY": "/var/lib/hpo-sync"})
    assert cfg.store.path == Path("/var/lib/hpo-sync/mirror.db")
    message = error(text, env={})
    assert "store.path (line 2)" in message
    assert "STATE_DIRECTORY" in message


def test_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "api-token").write_text("  file-token-value\n", encoding="utf-8")
    (tmp_path / "hook").write_text("https://example.com/hook?key=filekey\n", encoding="utf-8")
    text = f"""{MINIMAL}
[[api.tokens]]
name = "t"
token_file = "${{CREDENTIALS_DIRECTORY}}/api-token"
[[alerts.targets]]
name = "hook"
type = "webhook"
url_file = "hook"
"""
    cfg = loads(text, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}, source=tmp_path / "c.toml")
    assert cfg.api.tokens[0].token.reveal() == "file-token-value"
    assert cfg.api.tokens[0].token.source == f"file:{tmp_path / 'api-token'}"
    assert cfg.alerts.targets[0].url.reveal() == "https://example.com/hook?key=filekey"


def test_a_secret_file_others_can_read_is_warned_about(tmp_path: Path) -> None:
    token = tmp_path / "api-token"
    token.write_text("file-token-value\n", encoding="utf-8")
    text = f'{MINIMAL}[[api.tokens]]\nname = "t"\ntoken_file = "{token}"\n'
    token.chmod(0o600)
    with capture_logs() as logs:
        loads(text, env={})
    assert not [e for e in logs if e["event"] == "config.secret_file_exposed"]
    token.chmod(0o644)
    with capture_logs() as logs:
        loads(text, env={})
    (warning,) = [e for e in logs if e["event"] == "config.secret_file_exposed"]
    assert warning["key"] == "api.tokens[0].token_file" and warning["mode"] == "0o644"
    assert warning["log_level"] == "warning" and "file-token-value" not in repr(logs)


# --- errors: each names the key and the line ----------------------------------------------


def test_toml_syntax_error_names_the_line() -> None:
    message = error('[upstream]\nregion = "cn-hangzhou"\npage_size = = 3\n')
    assert message.startswith("line 3: TOML syntax error")
    message = error('[upstream]\nregion = "cn-hangzhou\n')
    assert "line 2" in message
    message = error(f"{MINIMAL}[upstream]\nregion = \n")  # at the very end
    assert re.search(r"line \d+", message)


def test_duplicate_table_is_a_syntax_error() -> None:
    assert error("[api]\n[upstream]\n[api]\n").startswith("line 3:")


# Each place a key can live, as (header line to insert after, dotted key of the bogus key).
LEVELS = [
    (None, "bogus_key"),
    ("[upstream]", "upstream.bogus_key"),
    ("[store]", "store.bogus_key"),
    ("[sync]", "sync.bogus_key"),
    ("[[workspaces]]#2", "workspaces[1].bogus_key"),
    ("[api]", "api.bogus_key"),
    ("[[api.tokens]]", "api.tokens[0].bogus_key"),
    ("[alerts]", "alerts.bogus_key"),
    ("[[alerts.targets]]#2", "alerts.targets[1].bogus_key"),
    ("[[alerts.rules]]#3", "alerts.rules[2].bogus_key"),
    ("[logging]", "logging.bogus_key"),
]


@pytest.mark.parametrize(("after", "key"), LEVELS, ids=[k for _, k in LEVELS])
def test_unknown_key_at_every_level(after: str | None, key: str) -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    if after is None:
        at = 0
    else:
        header, _, nth = after.partition("#")
        at = [i for i, line in enumerate(lines) if line == header][int(nth or 1) - 1] + 1
    lines.insert(at, "bogus_key = 1")
    message = error("\n".join(lines), env=EXAMPLE_ENV)
    assert message.startswith(f"{key} (line {at + 1}): unknown key")


def test_unknown_key_suggests_the_near_one() -> None:
    message = error(f"[upstream]\nmax_qsp = 3\n{MINIMAL}")
    assert message.startswith("upstream.max_qsp (line 2): unknown key (did you mean 'max_qps'?)")
    message = error(f"[upstreams]\nregion = 'cn-beijing'\n{MINIMAL}")
    assert message.startswith("upstreams (line 1): unknown key (did you mean 'upstream'?)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f'[upstream]\npage_size = "100"\n{MINIMAL}',
            "upstream.page_size (line 2): expected an integer, got a string",
        ),
        (
            f"[upstream]\npage_size = 10.5\n{MINIMAL}",
            "upstream.page_size (line 2): expected an integer, got a number",
        ),
        (
            f'[upstream]\nvpc = "yes"\n{MINIMAL}',
            "upstream.vpc (line 2): expected true or false, got a string",
        ),
        (
            f"[upstream]\nmax_qps = true\n{MINIMAL}",
            "upstream.max_qps (line 2): expected a number, got a boolean",
        ),
        (
            f"[sync]\nterminal_statuses = 'FAILED'\n{MINIMAL}",
            "sync.terminal_statuses (line 2): expected a list of strings",
        ),
        (f"[store]\npath = 5\n{MINIMAL}", "store.path (line 2): expected a string, got an integer"),
        (f"upstream = 5\n{MINIMAL}", "upstream (line 1): expected a table, got an integer"),
        (f"[logging]\nlevel = 3\n{MINIMAL}", "logging.level (line 2): expected a string"),
        ("[[workspaces]]\nid = true\n", "workspaces[0].id (line 2): expected a non-empty string"),
        (
            "[[workspaces]]\nid = 'a'\nlabel = 1\n",
            "workspaces[0].label (line 3): expected a string",
        ),
        ('workspaces = ["a"]\n', "workspaces[0] (line 1): expected a table, got a string"),
        (f"[api]\ntokens = 'x'\n{MINIMAL}", "api.tokens (line 2): expected [[api.tokens]] tables"),
        (
            f"{MINIMAL}[alerts]\ntargets = 5\n",
            "alerts.targets (line 4): expected [[alerts.targets]] tables",
        ),
    ],
)
def test_wrong_type(text: str, expected: str) -> None:
    assert error(text).startswith(expected)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("[upstream]\npage_size = 0", "upstream.page_size"),
        ("[upstream]\npage_size = 100000", "upstream.page_size"),
        ("[upstream]\nmax_qps = 0", "upstream.max_qps"),
        ("[upstream]\nmax_qps = nan", "upstream.max_qps"),
        ("[upstream]\nmax_qps = inf", "upstream.max_qps"),
        ("[upstream]\nmax_concurrency = 65", "upstream.max_concurrency"),
        ("[upstream]\ntimeout_s = -1", "upstream.timeout_s"),
        ("[upstream]\nretry_max_attempts = 0", "upstream.retry_max_attempts"),
        ("[sync]\nhot_interval_s = 0", "sync.hot_interval_s"),
        ("[sync]\njitter_s = -5", "sync.jitter_s"),
        ("[alerts]\ngroup_wait_s = 99999", "alerts.group_wait_s"),
        ("[alerts]\nmax_age_s = 1", "alerts.max_age_s"),
    ],
)
def test_out_of_range(setting: str, key: str) -> None:
    text = f"{setting}\n{MINIMAL}"
    message = error(text)
    leaf = key.rpartition(".")[2]
    assert message.startswith(f"{key} (line {line_of(text, leaf)}): must be between")


def test_a_range_names_its_bounds_as_written() -> None:
    """Not 2.592e+06 (as ``{:g}`` writes 2592000); fractions stay fractions."""
    assert error(f"[alerts]\nmax_age_s = 59\n{MINIMAL}").endswith(
        "must be between 60 and 2592000, got 59"
    )
    assert "must be between 0.1 and " in error(f"[upstream]\ntimeout_s = 0.01\n{MINIMAL}")


@pytest.mark.parametrize(
    ("setting", "key", "fragment"),
    [
        ('[upstream]\nregion = "Hangzhou"', "upstream.region", "not a region id"),
        ('[upstream]\nendpoint = "localhost:8780"', "upstream.endpoint", "base URL"),
        ('[upstream]\nendpoint = "http://h/path?x=1"', "upstream.endpoint", "no query"),
        ('[upstream]\nendpoint = "http://h/p#f"', "upstream.endpoint", "no query, fragment"),
        (
            '[upstream]\nendpoint = "https://h/api/automl/v1/hpo/experiments"',
            "upstream.endpoint",
            "without the API path",
        ),
        ('[upstream]\nendpoint = "http://h/pai/api/automl"', "upstream.endpoint", "API path"),
        ('[upstream]\nendpoint = "http://h:99999"', "upstream.endpoint", "from 1 to 65535"),
        ('[upstream]\nendpoint = "http://h:abc"', "upstream.endpoint", "from 1 to 65535"),
        ('[upstream]\nendpoint = "http://h:0"', "upstream.endpoint", "from 1 to 65535"),
        ('[upstream]\nendpoint = "http://[::1"', "upstream.endpoint", "IPv6"),
        ('[upstream]\nendpoint = "http://[zz]:80"', "upstream.endpoint", "IPv6"),
        # what the client's URL parser or the connection's IDNA encoding would refuse later
        ('[upstream]\nendpoint = "http://h\\\\x"', "upstream.endpoint", "backslash"),
        (f'[upstream]\nendpoint = "http://{"a" * 64}.com"', "upstream.endpoint", "63"),
        (f'[upstream]\nregion = "cn-{"a" * 70}"', "upstream.region", "not a region id"),
        ('[upstream]\nsort_by = ""', "upstream.sort_by", "not a field name"),
        (
            '[upstream]\ncreate_time_zone = "Mars/Olympus"',
            "upstream.create_time_zone",
            "unknown time zone",
        ),
        ('[upstream]\ncreate_time_zone = "Asia"', "upstream.create_time_zone", "unknown time zone"),
        ('[upstream]\ncreate_time_zone = ""', "upstream.create_time_zone", "unknown time zone"),
        (
            '[upstream]\ncreate_time_zone = "+25:00"',
            "upstream.create_time_zone",
            "unknown time zone",
        ),
        ('[sync]\nterminal_statuses = ["DONE!"]', "sync.terminal_statuses", "'DONE!' is no status"),
        ('[logging]\nlevel = "verbose"', "logging.level", "is not one of"),
        ('[logging]\nformat = "xml"', "logging.format", "is not one of"),
        ('[alerts]\nconsole_url = "https://x/{workspace_id}"', "alerts.console_url", "placeholder"),
        ('[alerts]\nconsole_url = "https://x/{"', "alerts.console_url", "placeholder"),
        ('[alerts]\nconsole_url = "pai.console.aliyun.com"', "alerts.console_url", "URL"),
        (
            '[alerts]\nconsole_url = "https://x/{region:999999999999}"',
            "alerts.console_url",
            "without a format spec",
        ),
        ('[alerts]\nconsole_url = "https://x/{region!r}"', "alerts.console_url", "bare"),
        ('[alerts]\nconsole_url = "https://x/{region.upper}"', "alerts.console_url", "{region."),
        ('[store]\npath = "/tmp/a\\u0000b.db"', "store.path", "NUL"),
    ],
)
def test_bad_values(setting: str, key: str, fragment: str) -> None:
    text = f"{setting}\n{MINIMAL}"
    message = error(text)
    assert message.startswith(f"{key} (line 2): ")
    assert fragment in message


@pytest.mark.parametrize(
    "listen",
    [
        "localhost",
        "127.0.0.1",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "1.2.3.4.5:80",
        "bad host:80",
        "[::1:80",
        "[not-v6]:80",
        "::1",
        "127.0.0.1:٨٠",
    ],
)
def test_bad_listen_address(listen: str) -> None:
    message = error(f'[api]\nlisten = "{listen}"\n{MINIMAL}')
    assert message.startswith("api.listen (line 2): expected HOST:PORT")


def test_a_listen_port_out_of_range_says_so() -> None:
    message = error(f'[api]\nlisten = "127.0.0.1:99999"\n{MINIMAL}')
    assert message == "api.listen (line 2): the port must be a number from 0 to 65535, got 99999"


@pytest.mark.parametrize(
    ("listen", "host_port"),
    [
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:8787", ("::1", 8787)),
        ("localhost:0", ("localhost", 0)),
        (":9000", ("127.0.0.1", 9000)),
        ("mirror.internal.example:8787", ("mirror.internal.example", 8787)),
    ],
)
def test_good_listen_address(listen: str, host_port: tuple[str, int]) -> None:
    assert loads(f'[api]\nlisten = "{listen}"\n{MINIMAL}', env={}).api.host_port == host_port


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:8780", "http://[::1]:65535/", "https://h", "https://gw.example/pai/"],
)
def test_good_endpoints(endpoint: str) -> None:
    cfg = loads(f'[upstream]\nendpoint = "{endpoint}"\n{MINIMAL}', env={})
    assert cfg.upstream.base_url == endpoint.rstrip("/")


def test_console_url_with_literal_braces() -> None:
    template = "https://x/{{raw}}/{region}/{workspace}/{experiment_id}"
    cfg = loads(f'[alerts]\nconsole_url = "{template}"\n{MINIMAL}', env={})
    assert cfg.alerts.console_url == template


def test_a_secret_file_path_with_nul_is_named() -> None:
    text = f'{MINIMAL}[[api.tokens]]\nname = "t"\ntoken_file = "/run/a\\u0000b"\n'
    assert error(text).startswith("api.tokens[0].token_file (line 5): ")
    assert "NUL" in error(text)


def test_deeply_nested_values_are_a_syntax_error(tmp_path: Path) -> None:
    depth = 50_000
    text = f"a = {'[' * depth}{']' * depth}\n{MINIMAL}"
    assert "nested too deeply" in error(text)
    path = tmp_path / "deep.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"deep\.toml.*nested too deeply"):
        load(path)
    inline = f"a = {'{b = ' * depth}1{'}' * depth}\n{MINIMAL}"
    assert "nested too deeply" in error(inline)


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + f'[upstream]\nregion = "cn-beijing"\n{MINIMAL}'.encode())
    cfg = load(path, env={})
    assert cfg.upstream.region == "cn-beijing"
    # line numbers still count from the first line
    path.write_bytes(b"\xef\xbb\xbf" + f"[upstream]\npage_size = 0\n{MINIMAL}".encode())
    with pytest.raises(ConfigError, match=r"^upstream\.page_size \(line 2\)"):
        load(path, env={})


def test_full_sweeps_not_more_often_than_hot_ones() -> None:
    text = f"[sync]\nhot_interval_s = 600\nfull_interval_s = 60\n{MINIMAL}"
    assert error(text).startswith("sync.full_interval_s (line 3): must not be shorter than")


def test_no_workspaces() -> None:
    assert error("[upstream]\n").startswith("workspaces: no [[workspaces]] configured")
    assert error("workspaces = []\n").startswith("workspaces (line 1): expected one or more")
    assert error("[[workspaces]]\nlabel = 'x'\n").startswith("workspaces[0] (line 1): missing id")


def test_workspace_shapes_and_ids() -> None:
    message = error("workspaces = [100001]\n")
    assert message.startswith("workspaces[0] (line 1): expected a table, got an integer")
    assert 'with id = "100001"' in message
    for bad in ("../x y", "a\\tb", "x" * 129):
        message = error(f'[[workspaces]]\nid = "{bad}"\n')
        assert message.startswith("workspaces[0].id (line 2): "), message
        assert "cannot be a workspace id" in message
    assert loads('[[workspaces]]\nid = "ws-1.a_b"\n', env={}).workspace_ids() == ("ws-1.a_b",)


def test_duplicate_workspace() -> None:
    text = "[[workspaces]]\nid = 'a'\n\n[[workspaces]]\nid = 'b'\n\n[[workspaces]]\nid = 'a'\n"
    assert error(text).startswith("workspaces[2].id (line 8): workspace 'a' is listed twice")


def test_inline_tables_point_at_their_line() -> None:
    text = 'workspaces = [\n  { id = "a" },\n  { id = "a" },\n]\n'
    assert error(text).startswith("workspaces[1].id (line 1): workspace 'a' is listed twice")


TOKEN = f'{MINIMAL}\n[[api.tokens]]\nname = "ops"\n'


def test_token_env_naming_an_unset_variable() -> None:
    text = f'{TOKEN}token_env = "NOT_SET_ANYWHERE"\n'
    message = error(text, env={"OTHER": "x"})
    assert message.startswith(
        "api.tokens[0].token_env (line 6): environment variable NOT_SET_ANYWHERE is not set"
    )
    assert error(text, env={"NOT_SET_ANYWHERE": "  "}).startswith("api.tokens[0].token_env")


def test_a_literal_token_is_refused() -> None:
    message = error(f'{TOKEN}token = "s3cr3t-literal"\n')
    assert message.startswith("api.tokens[0].token (line 6): secrets must not live in the config")
    assert "token_env" in message
    assert "token_file" in message
    assert "s3cr3t-literal" not in message


def test_a_literal_target_secret_is_refused() -> None:
    text = (
        f"{MINIMAL}[[alerts.targets]]\n"
        'name = "d"\ntype = "dingtalk"\nurl = "https://x"\nsecret = "SECliteral"\n'
    )
    with capture_logs():
        message = error(text)
    assert message.startswith("alerts.targets[0].secret (line 7): secrets must not live")
    assert "SECliteral" not in message


def test_a_token_needs_a_value_and_only_one() -> None:
    assert error(TOKEN).startswith("api.tokens[0] (line 4): missing token_env or token_file")
    message = error(f'{TOKEN}token_env = "A"\ntoken_file = "/x"\n', env={"A": "v"})
    assert message.startswith("api.tokens[0].token_file (line 7): give only one of")


def test_token_names_and_values_are_unique() -> None:
    text = f'{TOKEN}token_env = "A"\n[[api.tokens]]\nname = "ops"\ntoken_env = "B"\n'
    assert error(text, env={"A": "1", "B": "2"}).startswith("api.tokens[1].name (line 8)")
    text = f'{TOKEN}token_env = "A"\n[[api.tokens]]\nname = "two"\ntoken_env = "B"\n'
    message = error(text, env={"A": "same-value", "B": "same-value"})
    assert message.startswith("api.tokens[1].token_env (line 9): the same token value")
    assert "same-value" not in message


def test_token_workspaces_must_be_configured() -> None:
    text = f'{TOKEN}token_env = "A"\nworkspaces = ["ws1", "nope"]\n'
    assert error(text, env={"A": "v"}).startswith(
        "api.tokens[0].workspaces (line 7): workspace 'nope' is not configured"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read secret file"),  # missing
        ("dir", "cannot read secret file"),  # a directory
        (b"\xff\xfe\x00binary", "is not UTF-8 text"),
        ("   \n", "is empty"),
    ],
)
def test_unreadable_secret_file(tmp_path: Path, content: str | bytes | None, fragment: str) -> None:
    secret = tmp_path / "token"
    if content == "dir":
        secret.mkdir()
    elif isinstance(content, bytes):
        secret.write_bytes(content)
    elif content is not None:
        secret.write_text(content, encoding="utf-8")
    message = error(f'{TOKEN}token_file = "{secret}"\n')
    assert message.startswith("api.tokens[0].token_file (line 6): ")
    assert fragment in message


def test_a_file_path_made_of_a_secret_variable_is_not_shown_expanded() -> None:
    """token_file = "${API_TOKEN}" (meant: token_env): the file named by the variable's value
    does not exist, and the message names the path as written, not the token it expands
    to (which would also reach the log on a reload)."""
    message = error(f'{TOKEN}token_file = "${{API_TOKEN}}"\n', env={"API_TOKEN": "S3cr3tTok"})
    assert message.startswith(
        "api.tokens[0].token_file (line 6): cannot read secret file '${API_TOKEN}'"
    )
    assert "S3cr3tTok" not in message


def test_unreadable_secret_file_without_permission(tmp_path: Path) -> None:
    import os

    secret = tmp_path / "token"
    secret.write_text("v", encoding="utf-8")
    secret.chmod(0)
    try:
        if os.access(secret, os.R_OK):
            pytest.skip("running as root: permissions do not stop us")
        message = error(f'{TOKEN}token_file = "{secret}"\n')
        assert message.startswith("api.tokens[0].token_file (line 6): cannot read secret file")
        assert "Permission denied" in message
    finally:
        secret.chmod(0o600)


TARGET = f'{MINIMAL}\n[[alerts.targets]]\nname = "slack"\ntype = "slack"\n'


def test_a_literal_target_url_is_allowed_with_a_warning() -> None:
    url = "https://hooks.slack.com/services/T1/B2/literalsecretpart"
    with capture_logs() as logs:
        cfg = loads(f'{TARGET}url = "{url}"\n', env={})
    assert cfg.alerts.targets[0].url.reveal() == url
    assert cfg.alerts.targets[0].url.source == "config file"
    assert [e["event"] for e in logs] == ["config.literal_secret"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["key"] == "alerts.targets[0].url"
    assert "literalsecretpart" not in json.dumps(logs)


def test_target_url_env_naming_an_unset_variable() -> None:
    message = error(f'{TARGET}url_env = "SLACK_URL"\n')
    assert message.startswith(
        "alerts.targets[0].url_env (line 7): environment variable SLACK_URL is not set"
    )


def test_target_url_must_be_http_and_the_error_names_where_it_came_from() -> None:
    message = error(
        f'{TARGET}url_env = "SLACK_URL"\n', env={"SLACK_URL": "hooks.slack.com/x/topsecret"}
    )
    assert message.startswith("alerts.targets[0].url_env (line 7): the webhook URL must start")
    assert "topsecret" not in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('name = "x"\nurl_env = "U"', "alerts.targets[0] (line 4): missing type"),
        ('type = "slack"\nurl_env = "U"', "alerts.targets[0] (line 4): missing name"),
        (
            'name = "x"\ntype = "telegram"\nurl_env = "U"',
            "alerts.targets[0].type (line 6): 'telegram' is not one of",
        ),
        (
            'name = "x"\ntype = "slack"',
            "alerts.targets[0] (line 4): missing url, url_env or url_file",
        ),
        (
            'name = "x"\ntype = "slack"\nurl_env = "U"\nurl = "https://h"',
            "alerts.targets[0].url_env (line 7): give only one of",
        ),
        (
            'name = "x"\ntype = "slack"\nurl_env = "U"\nsecret_env = "NOPE"',
            "alerts.targets[0].secret_env (line 8): environment variable NOPE",
        ),
        (
            'name = "x"\ntype = "slack"\nurl_env = "U"\nkeyword = ""',
            "alerts.targets[0].keyword (line 8): must not be empty",
        ),
    ],
)
def test_bad_targets(body: str, expected: str) -> None:
    assert error(f"{MINIMAL}\n[[alerts.targets]]\n{body}\n", env={"U": "https://h"}).startswith(
        expected
    )


URL_KEY, SECRET_KEY = "alerts.targets[0].url_env (line 7)", "alerts.targets[0].secret_env (line 8)"
UNUSABLE = "the webhook URL cannot be used:"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"U": "http://127.0.0.1:99999/x"}, f"{URL_KEY}: the webhook URL's port"),
        ({"U": "http://h:0/x"}, f"{URL_KEY}: the webhook URL's port"),
        ({"U": "http://[::1/x"}, f"{URL_KEY}: the webhook URL's host cannot be read"),
        ({"U": "http://h\\x/robot?access_token=abc"}, f"{URL_KEY}: {UNUSABLE} Invalid URL"),
        ({"U": f"http://{'a' * 64}.com/hook?abc"}, f"{URL_KEY}: {UNUSABLE} the host is not"),
        ({"U": "https://h", "S": "whsec_abc"}, f"{SECRET_KEY}: a whsec_ secret"),
        ({"U": "https://h", "S": "whsec_!!!!"}, f"{SECRET_KEY}: a whsec_"),
    ],
)  # fmt: skip
def test_a_target_that_could_never_be_sent_to_is_a_config_error(
    env: dict[str, str], expected: str
) -> None:
    """Found when the config loads (check-config, run, a reload), not as every alert to it
    dead-lettered with a misleading reason; and the secret itself is never quoted."""
    body = 'name = "x"\ntype = "webhook"\nurl_env = "U"\nsecret_env = "S"\n'
    message = error(f"{MINIMAL}\n[[alerts.targets]]\n{body}", env={"S": "whsec_YWJj", **env})
    assert message.startswith(expected), message
    assert "abc" not in message and "!!!!" not in message
    # a good whsec_ secret and a URL with a port are fine
    ok = f"{MINIMAL}\n[[alerts.targets]]\n{body}"
    config.loads(ok, env={"U": "http://127.0.0.1:8080/x", "S": "whsec_YWJj"})


def test_duplicate_target_names() -> None:
    text = (
        f'{TARGET}url_env = "U"\n'
        '[[alerts.targets]]\nname = "slack"\ntype = "teams"\nurl_env = "U"\n'
    )
    assert error(text, env={"U": "https://h"}).startswith(
        "alerts.targets[1].name (line 9): target name 'slack' is used twice"
    )


RULES = f'{TARGET}url_env = "U"\n\n[[alerts.rules]]\nname = "r"\n'
ENV_U = {"U": "https://hooks.example.com/x"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            'targets = ["slack", "nowhere"]',
            "alerts.rules[0].targets (line 11): no target named 'nowhere'",
        ),
        ("targets = []", "alerts.rules[0].targets (line 11): name at least one target"),
        (
            'targets = ["slack"]\nworkspaces = ["ws9"]',
            "alerts.rules[0].workspaces (line 12): workspace 'ws9' is not configured",
        ),
        (
            'targets = ["slack"]\nto_status = ["BROKEN DOWN"]',
            "alerts.rules[0].to_status (line 12): 'BROKEN DOWN' is no status",
        ),
        (
            'targets = ["slack"]\nfrom_status = [""]',
            "alerts.rules[0].from_status (line 12): '' is no status",
        ),
        (
            'targets = ["slack"]\nexperiments = ["ok*", " "]',
            "alerts.rules[0].experiments (line 12): an empty name pattern",
        ),
        (
            'targets = ["slack"]\ntags = ["a"]',
            "alerts.rules[0].tags (line 12): expected a table, got a list",
        ),
        (
            'targets = ["slack"]\ntags = { team = 5 }',
            "alerts.rules[0].tags.team (line 12): tag values must be strings",
        ),
        (
            'targets = ["slack"]\ntrial_failures_min = 0',
            "alerts.rules[0].trial_failures_min (line 12): must be between",
        ),
        (
            'targets = ["slack"]\ntrial_failures_rose = "yes"',
            "alerts.rules[0].trial_failures_rose (line 12): expected true or false",
        ),
        (
            'targets = ["slack"]\nquiet_hours = "22-07"',
            "alerts.rules[0].quiet_hours (line 12): expected HH:MM-HH:MM",
        ),
        (
            'targets = ["slack"]\nquiet_hours = "24:00-07:00"',
            "alerts.rules[0].quiet_hours (line 12): expected HH:MM-HH:MM",
        ),
    ],
)
def test_bad_rules(body: str, expected: str) -> None:
    assert error(f"{RULES}{body}\n", env=ENV_U).startswith(expected)


def test_a_quiet_window_not_shorter_than_max_age_is_refused() -> None:
    """Alerts raised as the window opens would expire before it closes, never tried once."""
    text = (
        f'{MINIMAL}\n[alerts]\nmax_age_s = 3600\n\n[[alerts.targets]]\nname = "slack"\n'
        'type = "slack"\nurl_env = "U"\n\n[[alerts.rules]]\nname = "r"\n'
        'targets = ["slack"]\nquiet_hours = "{}"\n'
    )
    message = error(text.format("22:00-06:00"), env=ENV_U)
    assert message.startswith("alerts.rules[0].quiet_hours (line ")
    assert "8 h is not shorter than alerts.max_age_s (3600 s)" in message
    assert loads(text.format("22:00-22:30"), env=ENV_U).alerts.rules[0].quiet_hours
    assert loads(text.format("07:00-07:00"), env=ENV_U).alerts.max_age_s == 3600  # empty


def test_a_target_url_with_a_blank_is_refused_without_quoting_it() -> None:
    message = error(f'{TARGET}url_env = "U"\n', env={"U": "https://h.example/sl TOPSECRET"})
    assert message.startswith("alerts.targets[0].url_env (line 7): the webhook URL holds a blank")
    assert "TOPSECRET" not in message


def test_rule_tags_as_a_table_point_at_their_own_line() -> None:
    text = f'{RULES}targets = ["slack"]\n\n[alerts.rules.tags]\nteam = "nlp"\nstage = 3\n'
    assert error(text, env=ENV_U).startswith("alerts.rules[0].tags.stage (line 15): tag values")


def test_rule_keys_in_a_second_rule_point_at_that_rule() -> None:
    text = f'{RULES}targets = ["slack"]\n[[alerts.rules]]\nname = "r2"\ntargets = ["gone"]\n'
    assert error(text, env=ENV_U).startswith("alerts.rules[1].targets (line 14): no target named")


def test_duplicate_rule_names() -> None:
    text = f'{RULES}targets = ["slack"]\n[[alerts.rules]]\nname = "r"\ntargets = ["slack"]\n'
    assert error(text, env=ENV_U).startswith("alerts.rules[1].name (line 13): rule name 'r'")


def test_a_good_rule() -> None:
    text = f"""{RULES}targets = ["slack"]
workspaces = ["ws1"]
experiments = ["bert_*"]
tags = {{ team = "nlp", env = "prod" }}
from_status = ["RUNNING"]
to_status = ["FAILED", "SYS_CANCELED"]
trial_failures_rose = true
trial_failures_min = 2
quiet_hours = "22:00-07:00"
"""
    rule = loads(text, env=ENV_U).alerts.rules[0]
    assert rule == RuleConfig(
        name="r",
        targets=("slack",),
        workspaces=("ws1",),
        experiments=("bert_*",),
        tags=(("team", "nlp"), ("env", "prod")),
        from_status=("RUNNING",),
        to_status=("FAILED", "SYS_CANCELED"),
        trial_failures_rose=True,
        trial_failures_min=2,
        quiet_hours="22:00-07:00",
    )


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist .*--config"):
        load(tmp_path / "missing.toml")
    # a path of hundreds of characters is shortened, not printed whole
    long_path = tmp_path / ("a/" * 300) / "x.toml"
    with pytest.raises(ConfigError) as info:
        load(long_path)
    message = str(info.value)
    assert len(message) < 250 and f"({len(str(long_path))} characters)" in message, message
    assert message.startswith(f"config file {str(tmp_path)[:40]}") and "x.toml (" in message
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"# caf\xe9\n" + MINIMAL.encode())
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path)


def test_config_error_carries_key_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        loads(f"[upstream]\npage_size = 0\n{MINIMAL}", env={})
    assert info.value.key == "upstream.page_size"
    assert info.value.line == 2


# --- resolve_path ---------------------------------------------------------------------------


def test_resolve_path_precedence() -> None:
    env = {"HPO_SYNC_CONFIG": "/from/env.toml"}
    assert resolve_path("/from/cli.toml", env) == Path("/from/cli.toml")
    assert resolve_path(None, env) == Path("/from/env.toml")
    assert resolve_path("", env) == Path("/from/env.toml")
    assert resolve_path(None, {}) == DEFAULT_CONFIG_PATH == Path("/etc/hpo-sync/config.toml")
    assert resolve_path(None, {"HPO_SYNC_CONFIG": ""}) == DEFAULT_CONFIG_PATH
    assert resolve_path("~/hpo.toml", {}) == Path.home() / "hpo.toml"


def test_resolve_path_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_SYNC_CONFIG", "/x/y.toml")
    assert resolve_path(None) == Path("/x/y.toml")
    monkeypatch.delenv("HPO_SYNC_CONFIG")
    assert resolve_path(None) == DEFAULT_CONFIG_PATH


# --- secrets never show ---------------------------------------------------------------------


def test_redacted_shows_no_secret(tmp_path: Path) -> None:
    (tmp_path / "feishu-secret").write_text("fsFILESECRET42\n", encoding="utf-8")
    literal_url = "http://127.0.0.1:9000/hook?token=LITERALURLSECRET"
    text = (
        EXAMPLE.read_text(encoding="utf-8")
        + f"""
[[alerts.targets]]
name = "feishu"
type = "feishu"
url = "{literal_url}"
secret_file = "{tmp_path / "feishu-secret"}"
"""
    )
    with capture_logs():
        cfg = loads(text, env=EXAMPLE_ENV, source=EXAMPLE)
    dump = json.dumps(redacted(cfg), ensure_ascii=False)
    secrets = [*EXAMPLE_ENV.values(), "fsFILESECRET42", "LITERALURLSECRET", literal_url]
    for value in secrets:
        assert value not in dump
        assert value not in repr(cfg)
        assert value not in str(cfg)
    assert "<redacted: env:HPO_SYNC_API_TOKEN>" in dump
    assert f"<redacted: file:{tmp_path / 'feishu-secret'}>" in dump
    assert "<redacted: config file>" in dump
    data = redacted(cfg)
    assert data["upstream"]["region"] == "cn-hangzhou"  # the rest is all there
    assert data["alerts"]["rules"][2]["tags"] == {"team": "nlp"}


def test_secret_never_shows_its_value() -> None:
    secret = Secret("hunter2-value", "env:API_TOKEN")
    for shown in (
        repr(secret),
        str(secret),
        f"{secret}",
        "{}".format(secret),  # noqa: UP032
        repr([secret]),
        repr({"k": secret}),
    ):
        assert "hunter2" not in shown
        assert "env:API_TOKEN" in shown
    assert secret.reveal() == "hunter2-value"
    assert secret.source == "env:API_TOKEN"
    assert secret == Secret("hunter2-value", "file:/elsewhere")
    assert secret != Secret("other", "env:API_TOKEN")
    assert secret != "hunter2-value"
    token = TokenConfig("t", secret)
    assert "hunter2" not in repr(token)


def test_errors_do_not_echo_secret_values(tmp_path: Path) -> None:
    """Whatever goes wrong around a secret, its value is not in the message."""
    value = "https://oapi.dingtalk.com/robot/send?access_token=TOPSECRETTOKEN"
    env = {"U": value, "S": "SECTOPSECRET"}
    texts = [
        f'{TARGET}url_env = "U"\nsecret_env = "S"\nsecret_file = "/x"\n',
        f'{TARGET}url_env = "U"\nkeyword = 5\n',
        f'{TARGET}url_env = "U"\ntype2 = 1\n',
    ]
    for text in texts:
        message = error(text, env=env)
        assert "TOPSECRET" not in message


def test_dump_of_a_real_config_round_trips_through_json() -> None:
    cfg = load(EXAMPLE, env=EXAMPLE_ENV)
    data = json.loads(json.dumps(redacted(cfg)))
    assert set(data) == {f.name for f in dataclasses.fields(Config)} - {"source"}


def test_every_dataclass_is_frozen() -> None:
    for cls in SECTIONS_OF:
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]


def test_config_module_exports() -> None:
    for name in ("load", "loads", "resolve_path", "redacted", "Config", "Secret"):
        assert hasattr(config, name)
    assert UpstreamConfig().tz.utcoffset(None) == timedelta(0)


CANARY = "https://hooks.slack.com/services/T0/B0/CANARYSLACKHOOK01xyz"


#: where each secret key goes: the table above it
SECRET_TABLES = {
    "token": TOKEN,
    "url": TARGET,
    "secret": f'{TARGET}url_env = "U"\n',
}


@pytest.mark.parametrize("key", ["token_env", "url_env", "secret_env"])
@pytest.mark.parametrize("value", [CANARY, "xoxb-CANARY-0123456789", "CANARY TOKEN", "9CANARY"])
def test_a_secret_pasted_into_an_env_key_is_not_quoted(key: str, value: str) -> None:
    """What is not a variable's name is most likely the secret itself: never echoed into the
    terminal or (on a reload) the log."""
    table = SECRET_TABLES[key.rpartition("_")[0]]
    text = f'{table}{key} = "{value}"\n'
    message = error(text, env=ENV_U)
    where = "api.tokens[0]" if key == "token_env" else "alerts.targets[0]"
    line = line_of(text, f"{key} =")
    assert message.startswith(f"{where}.{key} (line {line}): must name an environment variable")
    assert "CANARY" not in message


DINGTALK_SECRET = "SEC4f3a9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1"


@pytest.mark.parametrize("key", ["token_env", "url_env", "secret_env"])
@pytest.mark.parametrize("value", [DINGTALK_SECRET, "Q8ZrXk2pLm9Nw4Vt7Ys1Bc6Df3Gh0Jk5", "A" * 17])
def test_a_secret_that_could_be_a_variable_name_is_not_quoted(key: str, value: str) -> None:
    """A DingTalk signing secret (SEC and hex), or a random token, is letters and digits
    like a variable's name: named as "the environment variable it names", not quoted."""
    table = SECRET_TABLES[key.rpartition("_")[0]]
    message = error(f'{table}{key} = "{value}"\n', env=ENV_U)
    assert value not in message and value[:8] not in message
    assert "the environment variable it names (not shown" in message
    # a name as people write them still is, for the operator to set
    assert "environment variable HPO_SYNC_TOKEN is not set" in error(
        f'{table}{key} = "HPO_SYNC_TOKEN"\n', env=ENV_U
    )


@pytest.mark.parametrize("key", ["token_file", "url_file", "secret_file"])
@pytest.mark.parametrize(
    "value",
    [
        CANARY,
        "CANARYSECRET0123",
        "/CANARY SECRET",
        "s3cr$CANARY",
        "ftp://CANARY",
        "/q8ZrCANARY+Xk2pLm9Nw4Vt7Ys1=",  # base64 that happens to start with /
    ],
)
def test_a_secret_pasted_into_a_file_key_is_not_quoted(
    key: str, value: str, tmp_path: Path
) -> None:
    """Only a value that plainly is a path is quoted: any other may be the secret itself."""
    table = SECRET_TABLES[key.rpartition("_")[0]]
    text = f'{table}{key} = "{value}"\n'
    message = error(text, env=ENV_U, source=tmp_path / "c.toml")
    where = "api.tokens[0]" if key == "token_file" else "alerts.targets[0]"
    assert message.startswith(f"{where}.{key} (line {line_of(text, f'{key} =')}): ")
    assert "CANARY" not in message
    if "$" not in value:
        assert f"cannot read the file that {key} names: No such file" in message
    # a value that plainly is a path is still quoted: it is what the operator must fix
    absent = tmp_path / "no-such-secret"
    message = error(f'{table}{key} = "{absent}"\n', env=ENV_U)
    assert f"cannot read secret file {absent}: No such file" in message


def test_a_group_wait_not_shorter_than_max_age_is_refused() -> None:
    """No alert is sent before the wait is over, and expiry counts from when it was raised:
    every alert would expire unsent (dead, 'expired', never tried once)."""
    text = f"{MINIMAL}\n[alerts]\nmax_age_s = 600\ngroup_wait_s = {{}}\n"
    for wait in ("600", "900"):
        message = error(text.format(wait))
        assert message.startswith("alerts.group_wait_s (line 6): ")
        assert f"{wait} s is not shorter than alerts.max_age_s (600 s)" in message
    assert loads(text.format("599"), env={}).alerts.group_wait_s == 599


def test_a_stall_threshold_not_longer_than_the_hot_interval_is_refused() -> None:
    """A healthy workspace's last success is up to a hot interval old before each sync: a
    stall threshold within it would report it stalled and recovered on every cycle."""
    text = f"{MINIMAL}\n[sync]\nhot_interval_s = 40\n\n[alerts]\nstalled_after_s = {{}}\n"
    for after in ("10", "40"):
        message = error(text.format(after))
        assert message.startswith("alerts.stalled_after_s (line 8): ")
        assert f"{after} s is not longer than sync.hot_interval_s (40 s)" in message
    assert loads(text.format("41"), env={}).alerts.stalled_after_s == 41
    # not set: the default, or three hot intervals when those are longer (no refusal of a
    # key the file does not hold)
    hourly = f"{MINIMAL}\n[sync]\nhot_interval_s = 3600\nfull_interval_s = 7200\n"
    assert loads(hourly, env={}).alerts.stalled_after_s == 3 * 3600
    assert loads(MINIMAL, env={}).alerts.stalled_after_s == 1800


def test_a_store_path_naming_a_directory_is_refused(tmp_path: Path) -> None:
    """Found at load (check-config says so), naming the key, not as sync, run and serve
    failing to open the mirror."""
    text = f'{MINIMAL}[store]\npath = "{tmp_path}"\n'
    expected = f"store.path (line 4): {tmp_path} is a directory, not a mirror file"
    assert error(text).startswith(expected)
    config_file = tmp_path / "c.toml"
    config_file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config.load_store(config_file)  # the read commands' view of it too
    assert loads(f'{MINIMAL}[store]\npath = "{tmp_path}/m.db"\n', env={}).store.path


@pytest.mark.parametrize("zone", ["+08:60", "+08:99", "UTC+5:75", "+0860", "-0575", "GMT+860"])
def test_create_time_zone_minutes_past_59_are_refused(zone: str) -> None:
    """Not read as a later offset: "+08:60" used to be UTC+09:00, "+08:99" +09:39."""
    message = error(f'[upstream]\ncreate_time_zone = "{zone}"\n{MINIMAL}')
    assert message.startswith(f"upstream.create_time_zone (line 2): unknown time zone {zone!r}")


def test_a_config_that_fails_logs_no_warnings_first() -> None:
    """One message for a config error: the literal URL's warning waits for a config that
    loads (test_a_literal_target_url_is_allowed_with_a_warning has it then)."""
    url = "https://hooks.slack.com/services/T1/B2/literalsecretpart"
    with capture_logs() as logs:
        message = error(f'{TARGET}url = "{url}"\n[alerts]\nmax_age_s = 1\n')
    assert message.startswith("alerts.max_age_s (line 9): ")
    assert logs == []


def test_a_failing_config_does_not_warn_of_an_exposed_secret_file(tmp_path: Path) -> None:
    token = tmp_path / "api-token"
    token.write_text("file-token-value\n", encoding="utf-8")
    token.chmod(0o644)
    text = f'{MINIMAL}[[api.tokens]]\nname = "t"\ntoken_file = "{token}"\n'
    with capture_logs() as logs:
        error(f"{text}[logging]\nlevel = 'loud'\n")
    assert logs == []
    with capture_logs() as logs:
        loads(text, env={})
    assert [e["event"] for e in logs] == ["config.secret_file_exposed"]


def test_a_status_pai_does_not_document_is_taken_with_a_warning() -> None:
    """An upstream may report statuses of its own (SUCCEEDED): a user must be able to call
    one terminal, or alert on it (they were refused, and such experiments counted as
    running forever, listed by every hot sweep). Written in any case, kept in capitals as
    the mirror keeps statuses; a warning names the documented status it is closest to, as
    a typo is likelier."""
    with capture_logs() as logs:
        cfg = loads(f'{MINIMAL}\n[sync]\nterminal_statuses = ["Succeeded", "FINISHD", "FAILED"]\n')
    assert cfg.sync.terminal_statuses == ("SUCCEEDED", "FINISHD", "FAILED")
    warned = [(e["event"], e["status"], e["did_you_mean"]) for e in logs]
    assert warned == [
        ("config.status_undocumented", "SUCCEEDED", None),
        ("config.status_undocumented", "FINISHD", "FINISHED"),
    ]
    assert all(e["key"] == "sync.terminal_statuses" for e in logs)


def test_a_secret_pasted_into_a_key_of_choices_is_not_quoted(tmp_path: Path) -> None:
    """A DingTalk URL pasted into a target's ``type`` (or a rule's ``targets``): the error
    names the key and the choices, not the value, which may be the robot's token, on the
    terminal or in the journal (as the ``*_env`` keys' errors already leave theirs out)."""
    url = "https://oapi.dingtalk.com/robot/send?access_token=9f86d081884c7d659a2feaa0c55ad015"
    token = "9f86d081884c7d659a2feaa0c55ad0159f86d081884c7d659a2feaa0c55ad015"  # 64 hex
    wecom_key = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"  # a UUID
    for field, value in (("type", url), ("type", token), ("type", wecom_key)):
        text = f"""
[[workspaces]]
id = "100001"

[[alerts.targets]]
name = "ops"
{field} = "{value}"
url = "https://example.invalid/hook"
"""
        message = error(text)
        assert message.startswith("alerts.targets[0].type (line 7): a value of"), message
        assert "not shown" in message and "is not one of" in message
        assert value not in message and "access_token" not in message
    # a typo is still quoted: it helps, and is no secret
    assert "'dingtlak' is not one of" in error(
        '[[workspaces]]\nid = "1"\n[[alerts.targets]]\nname = "ops"\ntype = "dingtlak"\n'
        'url = "https://example.invalid/hook"\n'
    )
    region = error(
        '[upstream]\nregion = "cn-hangzhou sk-LIVE-abcdef0123456789-0000"\n'
        '[[workspaces]]\nid = "1"\n'
    )
    assert "sk-LIVE" not in region and "not a region id" in region


def test_a_secret_pasted_into_statuses_or_workspaces_is_not_shown() -> None:
    """A 64-hex DingTalk token passes as a status (letters and digits, once in capitals):
    the warning that it is undocumented leaves it out. A robot URL in a rule's or an API
    token's ``workspaces`` is left out of the error that it is no configured workspace."""
    token = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    head = '[[workspaces]]\nid = "100001"\n[[alerts.targets]]\nname = "ops"\ntype = "slack"\n'
    head += 'url_env = "HOOK"\n[[alerts.rules]]\nname = "r"\ntargets = ["ops"]\n'
    env = {"HOOK": "https://hooks.slack.com/services/T/B/x"}
    with capture_logs() as logs:
        loads(head + f'to_status = ["{token}", "SUCCEEDED"]\n', env=env)
    shown = [e["status"] for e in logs if e["event"] == "config.status_undocumented"]
    assert len(shown) == 2 and "SUCCEEDED" in shown, logs
    assert token.upper() not in repr(logs) and token not in repr(logs)
    url = "https://oapi.dingtalk.com/robot/send?access_token=e3b0c44298fc1c149afbf4c8996fb924"
    message = error(head + f'workspaces = ["{url}"]\n', env=env)
    assert "is not configured" in message and "access_token" not in message, message
    message = error(
        '[[workspaces]]\nid = "100001"\n[api]\n[[api.tokens]]\nname = "t"\n'
        f'token_env = "TOK"\nworkspaces = ["{url}"]\n',
        env={"TOK": "x" * 40},
    )
    assert "is not configured" in message and "access_token" not in message, message


def test_trial_failures_min_without_trial_failures_rose_is_refused() -> None:
    """The minimum is read only with ``trial_failures_rose``: alone, the rule had no
    condition left and alerted on every change, with no word of it."""
    head = '[[workspaces]]\nid = "100001"\n[[alerts.targets]]\nname = "ops"\ntype = "slack"\n'
    head += 'url_env = "HOOK"\n[[alerts.rules]]\nname = "r"\ntargets = ["ops"]\n'
    env = {"HOOK": "https://hooks.slack.com/services/T/B/x"}
    message = error(head + "trial_failures_min = 3\n", env=env)
    assert message.startswith("alerts.rules[0].trial_failures_min"), message
    assert "trial_failures_rose" in message
    rule = loads(head + "trial_failures_rose = true\ntrial_failures_min = 3\n", env=env)
    assert rule.alerts.rules[0].trial_failures_min == 3
