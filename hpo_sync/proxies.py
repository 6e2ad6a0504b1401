"""Which forward proxy a request goes through (pure: the environment is passed in).

The config's ``proxy`` (``upstream.proxy``, ``alerts.proxy``, or their ``_env``/``_file``
forms) when given, else the environment's ``https_proxy``/``HTTPS_PROXY`` for an ``https://``
URL and ``http_proxy``/``HTTP_PROXY`` for an ``http://`` one, the lowercase name first, as
Python's urllib, requests and pip read them (curl and the official SDK read these variables
too), so a host that reaches the API through a proxy for them does with hpo-sync too.
``no_proxy``/``NO_PROXY`` (see :func:`bypassed`) sends the hosts it names direct, whichever
proxy applies; ``proxy = ""`` sends everything direct, whatever the environment says.

aiohttp can read the environment itself (``trust_env=True``), but then it also reads
``~/.netrc`` and, for any host the file has an entry for (or a ``default`` one), adds basic
auth, which aiohttp refuses next to the client's own ``Authorization`` header: every request
would fail. And it looks the proxy up in a thread on every request. So the proxy is found
once, here, and given to each request (:func:`request_options`).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from yarl import URL

#: The environment variables read for each URL scheme, in order of precedence.
ENV_NAMES: dict[str, tuple[str, str]] = {
    "https": ("https_proxy", "HTTPS_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY"),
}
NO_PROXY_NAMES = ("no_proxy", "NO_PROXY")


def from_environment(scheme: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """``(variable, value)`` of the proxy ``env`` gives for URLs of ``scheme``, if any."""
    for name in ENV_NAMES.get(scheme.lower(), ()):
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def bypassed(url: str, env: Mapping[str, str]) -> bool:
    """Whether ``env``'s ``no_proxy``/``NO_PROXY`` sends requests to ``url``'s host direct.

    As curl reads it: entries separated by commas (or blanks); ``*`` matches every host; a
    name matches itself and its subdomains (a leading dot is ignored); ``name:port`` only
    that port; an address or an address range (``10.0.0.0/8``) the host's address. The
    standard library's matcher (urllib's ``proxy_bypass_environment``) is undocumented and
    knows no ranges, which NO_PROXY on cloud hosts often holds (the metadata service's)."""
    no_proxy = next((v for n in NO_PROXY_NAMES if (v := env.get(n, "").strip())), "")
    if not no_proxy:
        return False
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme.lower())
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in re.split(r"[\s,]+", no_proxy.lower()):
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if address is not None and address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass  # not a range: matches nothing, as curl reads it
            continue
        name, want_port = entry, None
        match = re.fullmatch(r"(\[[^\]]*\]|[^:]*):(\d+)", entry)
        if match:
            name, want_port = match.group(1), int(match.group(2))
        name = name.strip("[]").lstrip(".").rstrip(".")
        if not name or (want_port is not None and want_port != port):
            continue
        if address is not None:
            try:
                if address == ipaddress.ip_address(name):
                    return True
            except ValueError:
                pass
            continue
        if host == name or host.endswith("." + name):
            return True
    return False


def problem(value: str) -> str | None:
    """What is wrong with ``value`` as a proxy URL, without quoting it (it may hold a
    password), or None."""
    scheme, sep, _ = value.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return "is not a proxy URL (expected http://[user:password@]host:port)"
    if scheme.lower() not in ("http", "https"):
        return (
            f"is a {scheme.lower()}:// proxy: only http:// and https:// proxies are supported "
            "(expected http://[user:password@]host:port)"
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "has a port that is not a number from 1 to 65535, or an unclosed [IPv6] host"
    if not parts.hostname:
        return "has no host (expected http://[user:password@]host:port)"
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "has a path, query or fragment: a proxy is a scheme, host and port"
    if re.search(r"\s", value):
        return "holds white space"
    try:
        URL(value)  # what every request is made with (it refuses a backslash, say)
    except ValueError:
        return (
            "cannot be read as a URL (a backslash, or another character a URL cannot hold, in "
            "the user, password or host: percent-encode it)"
        )
    return None


def has_password(value: str) -> bool:
    try:
        return urlsplit(value).password is not None
    except ValueError:
        return False


def shown(value: str) -> str:
    """``value`` with its password (if any) replaced by ``***``: safe to print. A user
    without a password is masked too: some proxies take a token as the user name."""
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return "<unreadable proxy URL>"
    _, at, host = parts.netloc.rpartition("@")
    if not at:
        return value
    if password is None:
        return parts._replace(netloc=f"***@{host}").geturl()
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def authorization(value: str) -> str | None:
    """The ``Proxy-Authorization`` value for the user and password in proxy URL ``value``
    (None without them): Basic, over the very bytes the URL's percent-escapes stand for, as
    curl sends them. (aiohttp, given the URL, would encode the decoded text as Latin-1: a
    password with a character beyond it failed every request, and one with ``ä`` reached
    the proxy in bytes it does not read as the password.)"""
    url = URL(value)
    if url.raw_user is None and url.raw_password is None:
        return None
    login = unquote_to_bytes(url.raw_user or "") + b":" + unquote_to_bytes(url.raw_password or "")
    return "Basic " + base64.b64encode(login).decode("ascii")


def request_options(proxy: str | None, scheme: str) -> tuple[dict[str, Any], dict[str, str]]:
    """For a request to a URL of ``scheme`` through ``proxy`` (None: direct): aiohttp's
    keyword arguments, and the headers to add to the request. The proxy goes without its
    user and password (no text aiohttp makes of it can quote them); the credentials go in
    ``Proxy-Authorization``: with the ``CONNECT`` of an ``https://`` target (never inside
    the tunnel, where the target would see them), or on an ``http://`` target's request
    itself, which the proxy reads and answers or forwards."""
    if proxy is None:
        return {}, {}
    options: dict[str, Any] = {"proxy": URL(proxy).with_user(None)}
    credentials = authorization(proxy)
    if credentials is None:
        return options, {}
    if scheme.lower() == "https":
        return {**options, "proxy_headers": {"Proxy-Authorization": credentials}}, {}
    return options, {"Proxy-Authorization": credentials}
