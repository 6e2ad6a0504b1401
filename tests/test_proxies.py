"""Forward proxies (``upstream.proxy``, ``alerts.proxy``, the environment's HTTP(S)_PROXY
and NO_PROXY) and TLS trouble: which proxy the config resolves, and requests carried by a
real proxy on loopback (tests/forward_proxy.py) to the simulator, over HTTP and through
CONNECT tunnels to an HTTPS simulator whose certificate a throwaway CA (trustme) issued."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from forward_proxy import ForwardProxy
from structlog.testing import capture_logs

from hpo_sync import proxies
from hpo_sync.alerts.cli import try_target
from hpo_sync.alerts.receivers import Receivers
from hpo_sync.alerts.service import AlertWorker
from hpo_sync.client import ListQuery, UpstreamClient
from hpo_sync.config import Config, ConfigError, Proxy, loads, redacted
from hpo_sync.credentials import CloudCredentials, StaticCredentials
from hpo_sync.errors import FatalUpstreamError
from hpo_sync.normalise import format_time, normalise
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import SimOptions, Simulator
from hpo_sync.store import Store

PASSWORD = "s3cret-Pw"  # of the proxy's user alice: must never be shown
WS = "100001"


def config(upstream: str = "", alerts: str = "", env: Mapping[str, str] | None = None) -> Config:
    text = f'[upstream]\n{upstream}\n[[workspaces]]\nid = "{WS}"\n{alerts}'
    return loads(text, env=dict(env or {}))


# --- which proxy (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "no_proxy", "direct"),
    [
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", "aliyuncs.com", True),
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", ".aliyuncs.com", True),
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", "paiautoml.cn-hangzhou.aliyuncs.com", True),
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", "cs.com", False),  # not a label boundary
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", "example.com, localhost", False),
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", "*", True),
        ("https://PAIAUTOML.cn-hangzhou.aliyuncs.com.", "AliyunCS.com", True),
        ("https://hooks.slack.com/services/x", "aliyuncs.com:443", False),
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", "aliyuncs.com:443", True),
        ("https://paiautoml.cn-hangzhou.aliyuncs.com", "aliyuncs.com:8443", False),
        ("http://10.1.2.3:8780", "10.0.0.0/8", True),
        ("http://10.1.2.3:8780", "192.168.0.0/16 10.1.2.3", True),
        ("http://11.1.2.3:8780", "10.0.0.0/8", False),
        ("http://[::1]:8780", "::1", True),
        ("http://[::1]:8780", "[::1]:8780", True),
        ("http://127.0.0.1:8780", "localhost", False),  # names are not resolved
        ("http://127.0.0.1:8780", "not/a-range", False),
    ],
)
def test_no_proxy_sends_the_hosts_it_names_direct(url: str, no_proxy: str, direct: bool) -> None:
    assert proxies.bypassed(url, {"NO_PROXY": no_proxy}) is direct
    assert proxies.bypassed(url, {"no_proxy": no_proxy, "NO_PROXY": ""}) is direct
    assert proxies.bypassed(url, {}) is False


def test_the_environment_names_a_proxy_per_scheme_lowercase_first() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1", "HTTP_PROXY": "x"}
    assert proxies.from_environment("https", env) == ("https_proxy", "http://lower:1")
    assert proxies.from_environment("HTTP", env) == ("HTTP_PROXY", "x")
    assert proxies.from_environment("https", {"https_proxy": " ", "HTTPS_PROXY": "h"}) == (
        "HTTPS_PROXY",
        "h",
    )
    assert proxies.from_environment("ftp", env) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://proxy:3128", None),
        ("https://u:p@proxy:3128/", None),
        ("http://[::1]:3128", None),
        ("socks5://u:pw@proxy:1080", "socks5:// proxy"),
        ("proxy:3128", "not a proxy URL"),
        ("http://u:pw@proxy:99999", "port"),
        ("http://u:pw@proxy:0", "port"),
        ("http://", "no host"),
        ("http://proxy:3128/some/path", "path"),
        ("http://proxy:3128?x=1", "path, query"),
    ],
)
def test_a_proxy_url_is_checked_without_being_quoted(value: str, problem: str | None) -> None:
    found = proxies.problem(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        assert "pw" not in found and "proxy" not in found.replace("proxy URL", "").replace(
            "proxies", ""
        ).replace("proxy is", "").replace(":// proxy", "")


def test_a_password_is_masked_when_shown() -> None:
    assert proxies.shown("http://alice:s3cret@proxy:3128") == "http://alice:***@proxy:3128"
    assert proxies.shown("http://proxy:3128") == "http://proxy:3128"
    # a user without a password may be a token (some proxies take one as the user name)
    assert proxies.shown("http://sk-proxytoken-ABC123@proxy:3128") == "http://***@proxy:3128"


# --- which proxy, as the config reads it ---------------------------------------------------


def test_without_settings_the_environment_decides_per_endpoint_scheme() -> None:
    env = {"HTTPS_PROXY": "http://proxy:3128", "HTTP_PROXY": "http://plain:8080"}
    assert config(env=env).upstream.proxy == Proxy("http://proxy:3128", "env:HTTPS_PROXY")
    assert config(env=env).upstream.proxy.source == "env:HTTPS_PROXY"  # type: ignore[union-attr]
    local = config('endpoint = "http://10.0.0.5:8780"', env=env).upstream.proxy
    assert local is not None and local.reveal() == "http://plain:8080"
    assert config(env={**env, "NO_PROXY": "aliyuncs.com"}).upstream.proxy is None
    assert config(env={}).upstream.proxy is None
    # the VPC endpoint is the one whose host NO_PROXY is checked against
    vpc = config("vpc = true", env={**env, "NO_PROXY": "paiautoml-vpc.cn-hangzhou.aliyuncs.com"})
    assert vpc.upstream.proxy is None


def test_the_config_s_proxy_replaces_the_environment_s_and_empty_means_direct(
    tmp_path: Path,
) -> None:
    env = {"HTTPS_PROXY": "http://env-proxy:3128", "MY_PROXY": f"http://alice:{PASSWORD}@p:1"}
    cfg = config('proxy = "http://corp-proxy:3128"', env=env)
    assert cfg.upstream.proxy is not None
    assert cfg.upstream.proxy.reveal() == "http://corp-proxy:3128"
    assert config('proxy = ""', env=env).upstream.proxy is None
    assert config('proxy_env = "MY_PROXY"', env=env).upstream.proxy == Proxy(env["MY_PROXY"], "x")
    (tmp_path / "proxy-url").write_text(f"http://alice:{PASSWORD}@p:1\n")
    from_file = loads(
        f'[upstream]\nproxy_file = "{tmp_path / "proxy-url"}"\n[[workspaces]]\nid = "w"\n', env={}
    ).upstream.proxy
    assert from_file is not None and from_file.reveal() == f"http://alice:{PASSWORD}@p:1"
    # NO_PROXY applies to a configured proxy too (as curl reads it)
    assert config('proxy = "http://corp:3128"', env={"NO_PROXY": "*"}).upstream.proxy is None


def test_alert_targets_take_alerts_proxy_or_their_own_or_the_environment_s() -> None:
    targets = """
[alerts]
proxy = "http://alerts-proxy:3128"
[[alerts.targets]]
name = "slack"
type = "slack"
url = "https://hooks.slack.com/services/T/B/x"
[[alerts.targets]]
name = "internal"
type = "webhook"
url = "http://hooks.internal:9000/x"
proxy = ""
[[alerts.targets]]
name = "teams"
type = "teams"
url = "https://example.webhook.office.com/x"
proxy_env = "TEAMS_PROXY"
[[alerts.targets]]
name = "nearby"
type = "webhook"
url = "https://near.example.net/x"
"""
    env = {"TEAMS_PROXY": "http://teams-proxy:1", "NO_PROXY": "example.net"}
    got = {t.name: t.proxy for t in config(alerts=targets, env=env).alerts.targets}
    assert got["slack"] is not None and got["slack"].reveal() == "http://alerts-proxy:3128"
    assert got["internal"] is None
    assert got["teams"] is not None and got["teams"].reveal() == "http://teams-proxy:1"
    assert got["nearby"] is None
    # without [alerts] proxy: the environment's, for each URL's scheme
    plain = targets.replace('proxy = "http://alerts-proxy:3128"\n', "")
    env2 = {**env, "https_proxy": "http://env-proxy:2"}
    got = {t.name: t.proxy for t in config(alerts=plain, env=env2).alerts.targets}
    assert got["slack"] is not None and got["slack"].source == "env:https_proxy"
    assert got["internal"] is None  # its own "" (and http_proxy is not set anyway)


@pytest.mark.parametrize(
    ("upstream", "env", "key", "words"),
    [
        ('proxy = "socks5://alice:PW@p:1080"', {}, "upstream.proxy", "socks5:// proxy"),
        ('proxy = "p:3128"', {}, "upstream.proxy", "not a proxy URL"),
        ("proxy = 3128", {}, "upstream.proxy", "string"),
        ('proxy = "http://p:1"\nproxy_env = "X"', {}, "upstream.proxy_env", "only one"),
        ('proxy_env = "NOT_SET"', {}, "upstream.proxy_env", "not set"),
        ('proxy_env = "P"', {"P": "http://alice:PW@p:0"}, "upstream.proxy_env", "port"),
        ("", {"HTTPS_PROXY": "socks5h://alice:PW@p:1"}, "upstream.proxy", "HTTPS_PROXY"),
        ("", {"https_proxy": "alice:PW@p"}, "upstream.proxy", "https_proxy"),
        # urlsplit reads it; yarl, which every request is made with, does not
        ('proxy_env = "P"', {"P": "http://alice:Back\\PW@p:1"}, "upstream.proxy_env", "a URL"),
        ("proxy = 'http://p\\q:1'", {}, "upstream.proxy", "cannot be read as a URL"),
    ],
)
def test_a_bad_proxy_names_its_key_and_never_shows_a_password(
    upstream: str, env: dict[str, str], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(upstream, env=env)
    message = str(info.value)
    assert key in message and words in message
    assert "PW" not in message


async def test_check_config_shows_the_proxy_with_its_password_masked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[upstream]\nproxy_env = "P"\n[[workspaces]]\nid = "{WS}"\n')
    code, out, err = await run_cli(
        "--config", str(cfg), "check-config", env={"P": f"http://alice:{PASSWORD}@p:3128"}
    )
    assert code == 0, err
    assert "http://alice:***@p:3128 (from env:P)" in out
    assert PASSWORD not in out + err
    shown = redacted(config('proxy = "http://p:3128"'))
    assert shown["upstream"]["proxy"] == "http://p:3128 (from config file)"


def test_a_literal_proxy_with_a_password_is_warned_about() -> None:
    with capture_logs() as logs:
        config(f'proxy = "http://alice:{PASSWORD}@p:1"')
        config('proxy = "http://p:1"')  # no password: nothing to warn about
    warned = [e for e in logs if e["event"] == "config.literal_secret"]
    assert [e["key"] for e in warned] == ["upstream.proxy"]
    assert PASSWORD not in repr(logs)


# --- through a real proxy ------------------------------------------------------------------


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with ForwardProxy(credentials=("alice", PASSWORD)) as p:
        yield p


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimOptions(experiments=150, workspaces=1, seed=5, latency_ms=0)) as s:
        yield s


CREDENTIALS = CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET)


def client_for(cfg: Config) -> UpstreamClient:
    return UpstreamClient(cfg.upstream, StaticCredentials(CREDENTIALS))


async def test_every_call_goes_through_the_environment_s_proxy(
    proxy: ForwardProxy, sim: Simulator
) -> None:
    env = {"HTTP_PROXY": proxy.url_with("alice", PASSWORD)}
    cfg = config(f'endpoint = "{sim.base_url}"\npage_size = 20', env=env)
    async with client_for(cfg) as client:
        listing = await client.list_all(ListQuery(workspace_id=WS))
    assert listing.consistent and len(listing.seen_ids) == 150
    assert client.stats.api_calls == len(proxy.carried) >= 8
    assert {c.method for c in proxy.carried} == {"GET"}
    assert all(c.target.startswith(f"{sim.base_url}/api/automl/v1/hpo") for c in proxy.carried)
    assert proxy.refused == []
    # ... and none when NO_PROXY names the simulator's host
    before = len(proxy.carried)
    cfg = config(f'endpoint = "{sim.base_url}"', env={**env, "NO_PROXY": "127.0.0.1"})
    async with client_for(cfg) as client:
        assert (await client.list_all(ListQuery(workspace_id=WS))).consistent
    assert len(proxy.carried) == before


async def test_a_proxy_refusing_the_tunnel_fails_at_once_naming_it_but_not_its_password(
    proxy: ForwardProxy,
) -> None:
    """A 407 to CONNECT (an https:// endpoint): aiohttp's own text of it quotes the proxy's
    URL, password and all; the error says what to check, after one attempt, not 2 minutes
    of retries."""
    cfg = config(
        'endpoint = "https://127.0.0.1:9"\nretry_max_attempts = 5',
        env={"HTTPS_PROXY": proxy.url_with("alice", "wrong-" + PASSWORD)},
    )
    async with client_for(cfg) as client:
        with pytest.raises(FatalUpstreamError) as info:
            await client.list_page(ListQuery(workspace_id=WS), 1)
    error = info.value
    assert error.code == "ProxyAuthenticationRequired" and error.http_status == 407
    assert f"the proxy http://127.0.0.1:{proxy.port} answered HTTP 407" in str(error)
    assert "user and password" in (error.hint or "")
    assert PASSWORD not in str(error) + repr(error.__dict__)
    assert client.stats.api_calls == 1 and len(proxy.refused) == 1
    assert proxy.refused[0].method == "CONNECT" and proxy.refused[0].target == "127.0.0.1:9"


async def test_a_proxy_that_is_down_is_retried_and_named_without_its_password() -> None:
    cfg = config(
        'endpoint = "https://127.0.0.1:9"\nretry_max_attempts = 2\nretry_max_total_s = 5',
        env={"HTTPS_PROXY": f"http://alice:{PASSWORD}@127.0.0.1:9"},
    )
    async with client_for(cfg) as client:
        with pytest.raises(Exception) as info:
            await client.list_page(ListQuery(workspace_id=WS), 1)
    assert "cannot connect to the proxy http://127.0.0.1:9" in str(info.value)
    assert "ProxyConnectionError" in str(info.value)
    assert client.stats.api_calls == 2
    assert PASSWORD not in str(info.value)


# --- HTTPS: a CONNECT tunnel, certificates ----------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_sim(ca: trustme.CA) -> AsyncIterator[Simulator]:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    options = SimOptions(experiments=120, workspaces=1, seed=7, latency_ms=0)
    async with Simulator(options, ssl_context=context) as s:
        assert s.base_url.startswith("https://127.0.0.1:")
        yield s


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    yield path


ENV = {
    **os.environ,
    "ALIBABA_CLOUD_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID,
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": DEFAULT_ACCESS_KEY_SECRET,
    "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",
}


async def run_cli(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hpo_sync.cli", *args, env={**ENV, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def sync_config(path: Path, endpoint: str, **upstream: Any) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in upstream.items())
    path.write_text(
        f'[upstream]\nendpoint = "{endpoint}"\nmax_qps = 200\npage_size = 25\n{extra}\n'
        f'[store]\npath = "{path.parent / "mirror.db"}"\n\n[[workspaces]]\nid = "{WS}"\n'
    )
    return path


def runs(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM sync_runs ORDER BY id")]
    finally:
        conn.close()


async def test_sync_over_https_through_a_proxy_tunnel_with_the_ca_from_ssl_cert_file(
    proxy: ForwardProxy, tls_sim: Simulator, ca_file: Path, tmp_path: Path
) -> None:
    """`hpo-sync sync` as a process, the endpoint HTTPS, HTTPS_PROXY with credentials, the
    simulator's CA trusted through SSL_CERT_FILE (as the docs say for a private CA): the
    whole workspace arrives through CONNECT tunnels, the certificate checked end to end."""
    cfg = sync_config(tmp_path / "c.toml", tls_sim.base_url)
    env = {"HTTPS_PROXY": proxy.url_with("alice", PASSWORD), "SSL_CERT_FILE": str(ca_file)}
    code, out, err = await run_cli("--config", str(cfg), "sync", "--log-format", "json", env=env)
    assert code == 0, out + err
    assert f"{WS}: full ok" in out and "120 experiments" in out
    host_port = tls_sim.base_url.removeprefix("https://")
    assert proxy.carried and {(c.method, c.target) for c in proxy.carried} == {
        ("CONNECT", host_port)
    }
    assert PASSWORD not in out + err


async def test_a_wrong_proxy_password_fails_the_sync_at_once_and_shows_no_password(
    proxy: ForwardProxy, tmp_path: Path
) -> None:
    cfg = sync_config(tmp_path / "c.toml", "https://127.0.0.1:9", proxy_env="TEST_PROXY")
    wrong = "Wr0ng-" + PASSWORD
    env = {"TEST_PROXY": proxy.url_with("alice", wrong)}
    code, out, err = await run_cli("--config", str(cfg), "sync", "--log-format", "json", env=env)
    assert code == 1
    assert "ProxyAuthenticationRequired" in out and "user and password" in out
    (run,) = runs(tmp_path / "mirror.db")
    assert run["status"] == "failed" and run["api_calls"] == 1
    assert wrong not in out + err + run["error"]


async def test_an_untrusted_certificate_fails_at_once_saying_what_to_do(
    tls_sim: Simulator, tmp_path: Path
) -> None:
    """The simulator's CA is not in the default bundle: a CertificateError after one
    attempt, with the SSL_CERT_FILE hint, not 2 minutes of retried connection errors."""
    cfg = sync_config(tmp_path / "c.toml", tls_sim.base_url)
    code, out, _ = await run_cli("--config", str(cfg), "sync", "--log-format", "json")
    assert code == 1
    assert "CertificateError" in out and "SSL_CERT_FILE" in out
    assert "was not trusted" in out and "127.0.0.1" in out
    (run,) = runs(tmp_path / "mirror.db")
    assert run["api_calls"] == 1 and run["status"] == "failed"
    assert tls_sim.stats.requests == 0  # the handshake failed: no request reached it


# --- alerts through a proxy --------------------------------------------------------------------


def alert_config(
    db: Path, receivers: Receivers, alerts_extra: str, env: Mapping[str, str], wrong_proxy: str
) -> Config:
    """One target at the receivers, through [alerts] proxy if ``alerts_extra`` sets it, and
    one at an https:// URL through ``wrong_proxy``, which refuses the tunnel."""
    text = f"""
[store]
path = "{db}"
[[workspaces]]
id = "{WS}"
[alerts]
group_wait_s = 0
{alerts_extra}
[[alerts.targets]]
name = "hook"
type = "slack"
url = "{receivers.url("slack", "tok-1")}"
[[alerts.targets]]
name = "tls-hook"
type = "slack"
url = "https://127.0.0.1:9/services/x"
proxy = "{wrong_proxy}"
[[alerts.rules]]
name = "all"
targets = ["hook", "tls-hook"]
"""
    return loads(text, env=dict(env))


def raise_one_alert(store: Store, worker: AlertWorker) -> None:
    """Baseline e1 as RUNNING, then see it FAILED: one change, queued for the worker's targets."""
    observed = format_time(datetime.now(UTC).replace(microsecond=0))
    for baseline, status in ((True, "RUNNING"), (False, "FAILED")):
        run = store.begin_run(WS, "hot", observed)
        exp = normalise({"ExperimentId": "e1", "WorkspaceId": WS, "Status": status})
        assert exp is not None
        store.apply(
            WS, [exp], observed_at=observed, run_id=run, baseline=baseline,
            on_changes=worker.on_changes,
        )  # fmt: skip


async def test_alerts_go_through_alerts_proxy_and_nowhere_else(
    proxy: ForwardProxy, tmp_path: Path
) -> None:
    receivers = Receivers()
    await receivers.start()
    db = tmp_path / "mirror.db"
    store = Store.open(db)
    try:
        extra = f'proxy = "{proxy.url_with("alice", PASSWORD)}"'
        wrong = proxy.url_with("alice", "nope-" + PASSWORD)
        cfg = alert_config(db, receivers, extra, env={}, wrong_proxy=wrong)
        worker = AlertWorker(store, cfg, rate_limits={})
        raise_one_alert(store, worker)
        assert await worker.run_once(flush=True) == 1
        await worker.close()
        assert len(receivers.of("tok-1")) == 1
        assert [(c.method, c.target) for c in proxy.carried] == [
            ("POST", receivers.url("slack", "tok-1"))
        ]
        # the other target's proxy refused the tunnel: kept to retry, saying so, no password
        assert [(c.method, c.target) for c in proxy.refused] == [("CONNECT", "127.0.0.1:9")]
        conn = sqlite3.connect(db)
        try:
            pending = conn.execute(
                "SELECT last_error FROM alert_outbox WHERE target = 'tls-hook'"
                " AND status = 'pending'"
            ).fetchall()
        finally:
            conn.close()
        assert pending == [("the proxy answered HTTP 407 (ClientHttpProxyError)",)]
        # NO_PROXY naming the receiver's host: direct
        direct = alert_config(db, receivers, extra, {"NO_PROXY": "127.0.0.1"}, wrong)
        assert direct.alerts.targets[0].proxy is None
    finally:
        store.close()
        await receivers.stop()


async def test_alerts_test_names_the_proxy_that_refused_without_its_password(
    proxy: ForwardProxy, tmp_path: Path
) -> None:
    import io

    text = f"""
[[workspaces]]
id = "{WS}"
[alerts]
proxy = "{proxy.url_with("alice", "nope-" + PASSWORD)}"
[[alerts.targets]]
name = "tls-hook"
type = "webhook"
url = "https://127.0.0.1:9/hook"
"""
    cfg = loads(text, env={})
    out = io.StringIO()
    code = await try_target(cfg.alerts.targets[0], cfg, out, datetime.now(UTC))
    assert code != 0
    shown = out.getvalue()
    assert "no answer (ClientHttpProxyError, through the proxy http://alice:***@127.0.0.1:" in shown
    assert PASSWORD not in shown
    assert proxy.refused and proxy.refused[0].method == "CONNECT"


# --- what the proxy is sent --------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        "http://alice:p%C3%A4%E2%82%AC-%40x@127.0.0.1:{port}",  # UTF-8, percent-encoded
        "http://alice:pä€-%40x@127.0.0.1:{port}",  # as typed
    ],
)
async def test_a_password_beyond_latin_1_reaches_the_proxy_as_curl_sends_it(
    sim: Simulator, tls_sim: Simulator, ca: trustme.CA, given: str
) -> None:
    """The bytes the URL's escapes stand for, UTF-8 for what was typed: on an http://
    request itself and with the CONNECT of an https:// one. aiohttp, given the URL, failed
    on the € (UnicodeEncodeError: an "internal error" of every sweep) and sent ä in Latin-1
    (a 407 for a password that is right)."""
    import ssl

    import aiohttp

    async with ForwardProxy(credentials=("alice", "pä€-@x")) as proxy:
        env = {"HTTP_PROXY": given.format(port=proxy.port)}
        env["HTTPS_PROXY"] = env["HTTP_PROXY"]
        cfg = config(f'endpoint = "{sim.base_url}"', env=env)
        async with client_for(cfg) as client:
            assert (await client.list_all(ListQuery(workspace_id=WS))).consistent
        context = ssl.create_default_context()
        ca.configure_trust(context)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        cfg = config(f'endpoint = "{tls_sim.base_url}"', env=env)
        creds = StaticCredentials(CREDENTIALS)
        async with session, UpstreamClient(cfg.upstream, creds, session=session) as client:
            assert (await client.list_all(ListQuery(workspace_id=WS))).consistent
    assert proxy.refused == []
    assert {c.method for c in proxy.carried} == {"GET", "CONNECT"}


async def test_a_proxy_page_quoting_the_request_shows_none_of_the_proxy_s_credentials(
    tmp_path: Path,
) -> None:
    """An http:// webhook through a proxy whose error page quotes the request, its
    Proxy-Authorization too: neither `alerts test` nor the outbox shows the password or its
    base64."""
    import base64
    import io

    password = "Echo-" + PASSWORD
    basic = base64.b64encode(f"alice:{password}".encode()).decode()
    async with ForwardProxy(credentials=("alice", password), echo_status=502) as proxy:
        text = f"""
[store]
path = "{tmp_path / "mirror.db"}"
[[workspaces]]
id = "{WS}"
[alerts]
group_wait_s = 0
proxy = "{proxy.url_with("alice", password)}"
[[alerts.targets]]
name = "hook"
type = "slack"
url = "http://127.0.0.1:9/services/T000/B000/tok-secret-xyz"
[[alerts.rules]]
name = "all"
targets = ["hook"]
"""
        cfg = loads(text, env={})
        out = io.StringIO()
        assert await try_target(cfg.alerts.targets[0], cfg, out, datetime.now(UTC)) != 0
        shown = out.getvalue()
        assert "HTTP 502" in shown and "your request was" in shown
        assert "Proxy-Authorization: Basic ***" in shown
        assert password not in shown and basic not in shown

        store = Store.open(tmp_path / "mirror.db")
        try:
            worker = AlertWorker(store, cfg, rate_limits={})
            raise_one_alert(store, worker)
            with capture_logs() as logs:
                assert await worker.run_once(flush=True) == 0
            await worker.close()
        finally:
            store.close()
    (row,) = [
        r for r in sqlite3.connect(tmp_path / "mirror.db").execute(
            "SELECT last_error FROM alert_outbox"
        )
    ]  # fmt: skip
    assert row[0].startswith("HTTP 502")
    for seen in (row[0], repr(logs)):
        assert password not in seen and basic not in seen
    assert len(proxy.carried) == 2  # (each answered with the page)
