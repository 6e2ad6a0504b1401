"""ACS3-HMAC-SHA256: the documented vectors, and the official SDK's own function as oracle."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from alibabacloud_tea_openapi.utils import Utils as TeaOpenApiUtils
from darabonba.request import DaraRequest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpo_sync import signing

try:  # the older util package carries its own copy of the function: check against both
    from alibabacloud_openapi_util.client import Client as OpenApiUtilClient
    from Tea.request import TeaRequest
except ImportError:  # pragma: no cover - absent in a slimmer test environment
    OpenApiUtilClient = None
    TeaRequest = None

EXPERIMENTS_PATH = "/api/automl/v1/hpo/experiments"

VECTOR_1: dict[str, Any] = dict(
    method="POST",
    path="/",
    query={
        "ImageId": "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
        "RegionId": "cn-shanghai",
    },
    headers={
        "host": "ecs.cn-shanghai.aliyuncs.com",
        "x-acs-action": "RunInstances",
        "x-acs-content-sha256": signing.EMPTY_SHA256,
        "x-acs-date": "2023-10-26T10:22:32Z",
        "x-acs-signature-nonce": "3156853299f313e23d1673dc12e1703d",
        "x-acs-version": "2014-05-26",
    },
    access_key_id="YourAccessKeyId",
    access_key_secret="YourAccessKeySecret",
)

VECTOR_2: dict[str, Any] = dict(
    method="GET",
    path=EXPERIMENTS_PATH,
    query={
        "WorkspaceId": "12345",
        "PageNumber": "1",
        "PageSize": "50",
        "Status": "RUNNING",
        "MinCreateTime": "2024-01-01 00:00:00",
        "Name": "exp a*b~c",
        "Tag": '[{"Key":"team","Value":"ml ops"}]',
    },
    headers={
        "host": "paiautoml.cn-hangzhou.aliyuncs.com",
        "x-acs-action": "ListHpoExperiments",
        "x-acs-version": "2022-08-28",
        "x-acs-date": "2024-11-05T08:09:10Z",
        "x-acs-signature-nonce": "c9f1d8a2b3e4f5061728394a5b6c7d8e",
        "x-acs-content-sha256": signing.EMPTY_SHA256,
    },
    access_key_id="testid",
    access_key_secret="testsecret",
)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- documented vectors ------------------------------------------------------------------


def test_vector_1_documented_run_instances() -> None:
    signed = signing.sign(**VECTOR_1)
    assert sha256_hex(signed.canonical_request) == (
        "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
    )
    assert signed.signature == "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
    assert signed.authorization == (
        "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,"
        "SignedHeaders=host;x-acs-action;x-acs-content-sha256;x-acs-date;"
        "x-acs-signature-nonce;x-acs-version,"
        "Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
    )


def test_vector_2_list_hpo_experiments() -> None:
    assert signing.canonical_query(VECTOR_2["query"]) == (
        "MinCreateTime=2024-01-01%2000%3A00%3A00&Name=exp%20a%2Ab~c&PageNumber=1&PageSize=50"
        "&Status=RUNNING&Tag=%5B%7B%22Key%22%3A%22team%22%2C%22Value%22%3A%22ml%20ops%22%7D%5D"
        "&WorkspaceId=12345"
    )
    signed = signing.sign(**VECTOR_2)
    assert sha256_hex(signed.canonical_request) == (
        "3350ebafad732ba6fc1a19fc98574621e7c859177b0cc7d56e08e01671dbb44b"
    )
    assert signed.signature == "31677cbcabb21692b29bed21f02163bbd200c4b43494a7b940e10338c2e944a8"


@pytest.mark.parametrize("vector", [VECTOR_1, VECTOR_2], ids=["vector1", "vector2"])
def test_vectors_match_the_sdk(vector: dict[str, Any]) -> None:
    assert signing.sign(**vector).authorization == sdk_authorization(**vector)


# --- percent-encoding --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("AZaz09-_.~", "AZaz09-_.~"),
        (" ", "%20"),
        ("*", "%2A"),
        ("+", "%2B"),
        ("/", "%2F"),
        ("%", "%25"),
        ("=", "%3D"),
        ("&", "%26"),
        (":", "%3A"),
        ("é", "%C3%A9"),
        ("实验", "%E5%AE%9E%E9%AA%8C"),
        ("🚀", "%F0%9F%9A%80"),
    ],
)
def test_percent_encode_is_rfc3986(raw: str, encoded: str) -> None:
    assert signing.percent_encode(raw) == encoded


def test_values_of_one_header_name_in_different_cases_are_sorted_and_joined() -> None:
    """As the official SDK does: whatever order the two spellings come in."""
    for headers in (
        {"X-Acs-Meta": "zeta", "x-acs-meta": "alpha", "Host": "h"},
        {"x-acs-meta": "alpha", "X-ACS-META": " zeta "},
    ):
        block, names = signing.canonical_headers(headers)
        assert "x-acs-meta:alpha,zeta\n" in block
        assert names.split(";").count("x-acs-meta") == 1


def test_canonical_query_sorts_by_name_and_keeps_empty_values() -> None:
    assert signing.canonical_query({"b": "2", "a": "", "C": "x y"}) == "C=x%20y&a=&b=2"
    assert signing.canonical_query({}) == ""


def test_only_host_content_type_and_x_acs_headers_are_signed() -> None:
    block, names = signing.canonical_headers(
        {
            "Host": " example.com ",
            "Content-Type": "application/json",
            "X-Acs-Date": "2024-01-01T00:00:00Z",
            "User-Agent": "hpo-sync",
            "Accept": "application/json",
            "Authorization": "x",
        }
    )
    assert names == "content-type;host;x-acs-date"
    assert block == (
        "content-type:application/json\nhost:example.com\nx-acs-date:2024-01-01T00:00:00Z\n"
    )


# --- the official SDK as oracle ----------------------------------------------------------


def sdk_authorization(
    *,
    method: str,
    path: str,
    query: dict[str, str],
    headers: dict[str, str],
    access_key_id: str,
    access_key_secret: str,
    body_sha256: str = signing.EMPTY_SHA256,
) -> str:
    """What the official SDK computes: it signs every header it is given, so pass it the ones
    hpo-sync signs (host, content-type, x-acs-*), as the SDK's own request would hold."""
    request = DaraRequest()
    request.method = method
    request.pathname = path
    request.query = dict(query)
    request.headers = dict(headers)
    auth: str = TeaOpenApiUtils.get_authorization(
        request, signing.ALGORITHM, body_sha256, access_key_id, access_key_secret
    )
    if OpenApiUtilClient is not None:
        old = TeaRequest()
        old.method = method
        old.pathname = path
        old.query = dict(query)
        old.headers = dict(headers)
        assert (
            OpenApiUtilClient.get_authorization(
                old, signing.ALGORITHM, body_sha256, access_key_id, access_key_secret
            )
            == auth
        )
    return auth


# Text without surrogates (they cannot be UTF-8 encoded, so no request can carry them).
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
awkward = st.sampled_from(
    [
        "",
        " ",
        "a b",
        "*",
        "~",
        "+",
        "/",
        "%",
        "%2A",
        "=",
        "&",
        "a=b&c=d",
        "exp a*b~c",
        "2024-01-01 00:00:00",
        "实验-01",
        "🚀 rocket",
        "naïve café",
        "line\nbreak",
    ]
)
tag_param = st.lists(
    st.fixed_dictionaries({"Key": any_text, "Value": any_text}), min_size=1, max_size=3
).map(lambda tags: json.dumps(tags, separators=(",", ":"), ensure_ascii=False))
query_value = st.one_of(any_text, awkward, tag_param)
# The SDK encodes values but not names; real parameter names never need encoding.
param_name = st.from_regex(r"[A-Za-z][A-Za-z0-9_.~-]{0,15}", fullmatch=True)
header_value = st.one_of(
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=40),
    st.sampled_from([" padded ", "a,b", "", "CAIS…token==", "x" * 200]),
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    query = draw(st.dictionaries(param_name, query_value, max_size=8))
    if draw(st.booleans()):
        query["Tag"] = draw(tag_param)
    headers = {
        "host": draw(st.sampled_from(["paiautoml.cn-hangzhou.aliyuncs.com", "127.0.0.1:8780"])),
        "x-acs-action": "ListHpoExperiments",
        "x-acs-version": "2022-08-28",
        "x-acs-date": draw(header_value),
        "x-acs-signature-nonce": draw(header_value),
        "x-acs-content-sha256": signing.EMPTY_SHA256,
    }
    if draw(st.booleans()):
        headers["x-acs-security-token"] = draw(header_value)
    if draw(st.booleans()):
        headers["content-type"] = "application/json; charset=utf-8"
    extra = draw(
        st.dictionaries(st.from_regex(r"x-acs-[a-z-]{1,12}", fullmatch=True), header_value)
    )
    headers.update(extra)
    if draw(st.booleans()):  # names in any case: both sides lowercase them
        headers = {k.title(): v for k, v in headers.items()}
    body = draw(st.one_of(st.just(b""), st.binary(max_size=64)))
    return dict(
        method=draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"])),
        path=draw(st.sampled_from([EXPERIMENTS_PATH, "/", "/api/x/y~z"])),
        query=query,
        headers=headers,
        access_key_id=draw(
            st.from_regex(r"LTAI[A-Za-z0-9]{8,20}|STS\.[A-Za-z0-9]{10}", fullmatch=True)
        ),
        access_key_secret=draw(any_text.filter(bool)),
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


@settings(max_examples=200, deadline=None)
@given(requests())
def test_authorization_equals_the_official_sdk(request: dict[str, Any]) -> None:
    assert signing.sign(**request).authorization == sdk_authorization(**request)


@settings(max_examples=50, deadline=None)
@given(requests(), st.dictionaries(st.sampled_from(["User-Agent", "Accept", "X-Trace"]), any_text))
def test_unsigned_headers_do_not_change_the_signature(
    request: dict[str, Any], unsigned: dict[str, str]
) -> None:
    with_extra = dict(request, headers={**request["headers"], **unsigned})
    assert signing.sign(**with_extra).authorization == signing.sign(**request).authorization


def test_security_token_is_signed_like_the_sdk() -> None:
    headers = dict(VECTOR_2["headers"], **{"x-acs-security-token": "CAIS+token/with=chars"})
    vector = dict(VECTOR_2, headers=headers)
    signed = signing.sign(**vector)
    assert "x-acs-security-token" in signed.signed_headers.split(";")
    assert signed.authorization == sdk_authorization(**vector)


# --- verify and parse_authorization --------------------------------------------------------


def _verify(request: dict[str, Any], authorization: str, **changes: Any) -> bool:
    parsed = signing.parse_authorization(authorization)
    assert parsed is not None
    merged = {**request, **changes}
    return signing.verify(
        method=merged["method"],
        path=merged["path"],
        query=merged["query"],
        headers=merged["headers"],
        signed_header_names=parsed.signed_headers,
        access_key_secret=merged["access_key_secret"],
        claimed_signature=parsed.signature,
        body_sha256=merged.get("body_sha256", signing.EMPTY_SHA256),
    )


@settings(max_examples=60, deadline=None)
@given(requests())
def test_verify_accepts_what_sign_produces(request: dict[str, Any]) -> None:
    auth = signing.sign(**request).authorization
    assert _verify(request, auth)


@settings(max_examples=60, deadline=None)
@given(requests(), any_text)
def test_verify_rejects_a_changed_secret(request: dict[str, Any], other: str) -> None:
    auth = signing.sign(**request).authorization
    if other != request["access_key_secret"]:
        assert not _verify(request, auth, access_key_secret=other)


@settings(max_examples=60, deadline=None)
@given(requests(), param_name, query_value)
def test_verify_rejects_a_changed_query(request: dict[str, Any], name: str, value: str) -> None:
    auth = signing.sign(**request).authorization
    query = dict(request["query"])
    if query.get(name) == value:
        value += "x"
    query[name] = value
    assert not _verify(request, auth, query=query)


@settings(max_examples=60, deadline=None)
@given(requests(), header_value)
def test_verify_rejects_a_changed_signed_header(request: dict[str, Any], value: str) -> None:
    auth = signing.sign(**request).authorization
    headers = {k.lower(): v for k, v in request["headers"].items()}
    if headers["x-acs-signature-nonce"].strip() == value.strip():
        value += "x"
    headers["x-acs-signature-nonce"] = value
    assert not _verify(request, auth, headers=headers)


def test_verify_rejects_other_changes() -> None:
    auth = signing.sign(**VECTOR_2).authorization
    assert _verify(VECTOR_2, auth)
    assert not _verify(VECTOR_2, auth, method="POST")
    assert not _verify(VECTOR_2, auth, path="/api/automl/v1/hpo/experiments/")
    assert not _verify(VECTOR_2, auth, body_sha256=sha256_hex("x"))
    # an x-acs header sent but not signed could be changed in transit
    unsigned = {**VECTOR_2["headers"], "x-acs-security-token": "added"}
    assert not _verify(VECTOR_2, auth, headers=unsigned)
    # a header named as signed but not sent
    missing = {k: v for k, v in VECTOR_2["headers"].items() if k != "x-acs-date"}
    assert not _verify(VECTOR_2, auth, headers=missing)
    # headers the gateway does not sign may come and go (HTTP stacks add their own)
    extra = {**VECTOR_2["headers"], "User-Agent": "aiohttp", "Accept": "*/*"}
    assert _verify(VECTOR_2, auth, headers=extra)


def test_verify_survives_a_non_ascii_claimed_signature() -> None:
    assert not signing.verify(
        method="GET",
        path="/",
        query={},
        headers={"host": "h"},
        signed_header_names=("host",),
        access_key_secret="s",
        claimed_signature="é" * 64,
        body_sha256=signing.EMPTY_SHA256,
    )


@settings(max_examples=100, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9.]{1,30}", fullmatch=True),
    st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), min_size=1, max_size=8),
    st.binary(min_size=32, max_size=32).map(bytes.hex),
)
def test_parse_authorization_round_trips(ak: str, names: list[str], sig: str) -> None:
    header = f"ACS3-HMAC-SHA256 Credential={ak},SignedHeaders={';'.join(names)},Signature={sig}"
    parsed = signing.parse_authorization(header)
    assert parsed == signing.ParsedAuthorization(ak, tuple(names), sig)


@settings(max_examples=50, deadline=None)
@given(requests())
def test_parse_authorization_reads_what_sign_writes(request: dict[str, Any]) -> None:
    signed = signing.sign(**request)
    parsed = signing.parse_authorization(signed.authorization)
    assert parsed is not None
    assert parsed.access_key_id == request["access_key_id"]
    assert ";".join(parsed.signed_headers) == signed.signed_headers
    assert parsed.signature == signed.signature


GOOD_SIG = "a" * 64


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        "Bearer abc",
        "ACS3-HMAC-SHA256",
        "ACS3-HMAC-SHA256 ",
        "ACS3-HMAC-SM3 Credential=a,SignedHeaders=host,Signature=" + GOOD_SIG,
        "acs3-hmac-sha256 Credential=a,SignedHeaders=host,Signature=" + GOOD_SIG,
        "ACS3-HMAC-SHA256 Credential=a",
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host",
        "ACS3-HMAC-SHA256 SignedHeaders=host,Signature=" + GOOD_SIG,
        "ACS3-HMAC-SHA256 Credential=,SignedHeaders=host,Signature=" + GOOD_SIG,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=,Signature=" + GOOD_SIG,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host;;x-acs-date,Signature=" + GOOD_SIG,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=xyz",
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=" + "g" * 64,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=" + GOOD_SIG + "0",
        "ACS3-HMAC-SHA256 Credential=a,Credential=b,SignedHeaders=host,Signature=" + GOOD_SIG,
        "ACS3-HMAC-SHA256 Credential=a,garbage,Signature=" + GOOD_SIG,
    ],
)
def test_parse_authorization_rejects_garbage(header: str) -> None:
    assert signing.parse_authorization(header) is None


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_authorization_never_raises(text: str) -> None:
    signing.parse_authorization(text)
    signing.parse_authorization("ACS3-HMAC-SHA256 " + text)
