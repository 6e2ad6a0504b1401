"""The upstream-compatible route: the official SDK, configured with ``bearer_token`` and
pointed at the API, gets for the same parameters the same experiments — same ids, same
order, same Status and TrialStatus — as the simulator itself returns."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from simfixtures import list_ok
from test_api_rig import START, TOKENS, WS1, WS2, ApiRig, api_rig, golden_mirror, rig, synced

from hpo_sync.normalise import normalise
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import SimOptions, Simulator
from hpo_sync.store import Store

__all__ = ["golden_mirror", "rig"]  # fixtures, imported for pytest

COMPAT = "/api/automl/v1/hpo/experiments"


def sdk(endpoint: str, **credentials: str) -> Any:
    from alibabacloud_paiautoml20220828.client import Client
    from alibabacloud_tea_openapi import models as open_api_models

    return Client(open_api_models.Config(endpoint=endpoint, protocol="http", **credentials))


def sdk_list(client: Any, **params: Any) -> dict[str, Any]:
    from alibabacloud_paiautoml20220828 import models

    response = client.list_hpo_experiments(models.ListHpoExperimentsRequest(**params))
    assert response.status_code == 200
    body: dict[str, Any] = response.body.to_map()
    return body


def comparable(experiments: list[dict[str, Any]], *, config: bool = False) -> list[Any]:
    """What must agree, normalised (the simulator drifts types on purpose)."""
    out = []
    for raw in experiments:
        e = normalise(raw)
        assert e is not None
        row = [
            e.experiment_id,
            e.status,
            e.trial_status,
            e.name,
            e.creator,
            e.workspace_id,
            e.gmt_create_time,
            e.gmt_modified_time,
            e.trial_count,
            e.accessibility,
        ]
        if config:
            row += [e.search_space, e.config_ini, e.config_yml]
        out.append(row)
    return out


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Simulator, ApiRig, list[dict[str, str]]]]:
    """The simulator and the API over a mirror that equals it (full sweeps after the world
    moved on: some experiments changed, some were created, some deleted)."""
    db = tmp_path / "mirror.db"
    options = SimOptions(
        experiments=900,
        workspaces=2,
        seed=3,
        start_time=START,
        restart_per_min=0.0,
        delete_per_min=2.0,
    )
    async with synced(db, options) as (sim, store, engine):
        for ws in sim.world.workspace_ids:
            assert (await engine.sweep(ws)).status == "ok"
        sim.world.advance(600)
        assert sim.world.deleted_ids()
        for ws in sim.world.workspace_ids:
            assert (await engine.sweep(ws, "full")).status == "ok"
        seen: list[dict[str, str]] = []

        async def record(request: web.Request, _response: web.StreamResponse) -> None:
            seen.append(dict(request.headers))

        def prepare(app: web.Application) -> None:
            app.on_response_prepare.append(record)

        async with api_rig(db, store=store, prepare=prepare) as r:
            yield sim, r, seen


async def test_the_official_sdk_gets_what_the_simulator_returns(
    pair: tuple[Simulator, ApiRig, list[dict[str, str]]],
) -> None:
    sim, rig, seen = pair
    upstream = sdk(
        f"127.0.0.1:{sim.port}",
        access_key_id=DEFAULT_ACCESS_KEY_ID,
        access_key_secret=DEFAULT_ACCESS_KEY_SECRET,
    )
    mirror = sdk(f"127.0.0.1:{rig.server.port}", bearer_token=TOKENS["all"][0])
    truth = sim.world.truth(WS1)
    creator = truth[len(truth) // 2]["Creator"]
    mid = truth[len(truth) // 2]["GmtCreateTime"].replace("T", " ").rstrip("Z")
    late = truth[-50]["GmtCreateTime"].replace("T", " ").rstrip("Z")
    cases: list[dict[str, Any]] = [
        {},
        {"workspace_id": WS1, "page_size": 100},
        {"status": "RUNNING", "page_size": 50},
        {
            "status": "finished",
            "sort_by": "GmtModifiedTime",
            "order": "ASC",
            "page_size": 40,
            "page_number": 2,
        },
        {"name": "Bert", "page_size": 100},
        {"creator": creator, "page_size": 100},
        {"page_number": 3, "page_size": 7, "order": "asc"},
        {"min_create_time": mid, "max_create_time": late, "page_size": 100, "workspace_id": WS1},
        {"max_create_time": mid[:10], "page_size": 20},
        {"accessibility": "public", "sort_by": "update_time", "page_size": 30},
        {"sort_by": "Name", "order": "ASC", "page_size": 25, "page_number": 4},
        {"sort_by": "status", "page_size": 60},
        {"sort_by": "workspace_id", "order": "DESC", "page_size": 50, "page_number": 10},
        {"sort_by": "create_time", "page_size": 1000},
        {"page_number": 1000, "page_size": 100},
    ]
    for params in cases:
        want = await asyncio.to_thread(sdk_list, upstream, **params)
        got = await asyncio.to_thread(sdk_list, mirror, **params)
        assert got["TotalCount"] == want["TotalCount"], params
        assert comparable(got["Experiments"]) == comparable(want["Experiments"]), params
        assert got["RequestId"]
    with_config = {"include_config_data": "True", "page_size": 5, "workspace_id": WS2}
    want = await asyncio.to_thread(sdk_list, upstream, **with_config)
    got = await asyncio.to_thread(sdk_list, mirror, **with_config)
    assert comparable(got["Experiments"], config=True) == comparable(
        want["Experiments"], config=True
    )
    assert all(e.get("ConfigYml") for e in got["Experiments"])
    # What the SDK sent: its bearer token in x-acs-bearer-token, no signature.
    assert seen and all(h.get("x-acs-bearer-token") == TOKENS["all"][0] for h in seen)
    assert all(h.get("x-acs-signature-type") == "BEARERTOKEN" for h in seen)


async def test_fields_upstream_added_later_pass_through(tmp_path: Path) -> None:
    """A field hpo-sync does not know is in ``raw``: the compatible route passes it on as
    upstream sent it; config texts only with IncludeConfigData, as upstream."""
    db = tmp_path / "mirror.db"
    store = Store.open(db)
    try:
        exp = normalise(
            {
                "ExperimentId": "exp-new-field",
                "WorkspaceId": WS1,
                "Status": "RUNNING",
                "TrialStatus": {"RUNNING": 1},
                "ConfigYml": "a: 1",
                "Priority": {"Level": 3, "Labels": ["x"]},
            }
        )
        assert exp is not None
        store.ensure_workspace(WS1)
        run = store.begin_run(WS1, "full", "2025-06-01T08:00:00Z")
        store.apply(WS1, [exp], observed_at="2025-06-01T08:00:01Z", run_id=run, baseline=True)
        async with api_rig(db, store=store) as r:
            plain = await r.ok(COMPAT, {"WorkspaceId": WS1})
            full = await r.ok(COMPAT, {"WorkspaceId": WS1, "IncludeConfigData": "True"})
    finally:
        store.close()
    (got,) = plain["Experiments"]
    assert got["Priority"] == {"Level": 3, "Labels": ["x"]} and got["Status"] == "RUNNING"
    assert "ConfigYml" not in got
    (got,) = full["Experiments"]
    assert got["Priority"] == {"Level": 3, "Labels": ["x"]} and got["ConfigYml"] == "a: 1"


async def test_errors_come_in_the_upstream_shape_the_sdk_understands(
    pair: tuple[Simulator, ApiRig, list[dict[str, str]]],
) -> None:
    from alibabacloud_tea_openapi.exceptions import ClientException

    sim, rig, _ = pair
    upstream = sdk(
        f"127.0.0.1:{sim.port}",
        access_key_id=DEFAULT_ACCESS_KEY_ID,
        access_key_secret=DEFAULT_ACCESS_KEY_SECRET,
    )
    mirror = sdk(f"127.0.0.1:{rig.server.port}", bearer_token=TOKENS["all"][0])
    for params in (
        {"page_size": 0},
        {"order": "sideways"},
        {"sort_by": "colour"},
        {"min_create_time": "01/02/2025"},
        {"include_config_data": "maybe"},
    ):
        codes = []
        for client in (upstream, mirror):
            with pytest.raises(ClientException) as info:
                await asyncio.to_thread(sdk_list, client, **params)
            codes.append((info.value.code, info.value.status_code))
        assert codes[0] == codes[1] == ("INVALID_INPUT_PARAMS", 400), params
    stranger = sdk(f"127.0.0.1:{rig.server.port}", bearer_token="not-a-token")
    with pytest.raises(ClientException) as info:
        await asyncio.to_thread(sdk_list, stranger)
    assert (info.value.code, info.value.status_code) == ("InvalidBearerToken", 401)
    limited = sdk(f"127.0.0.1:{rig.server.port}", bearer_token=TOKENS["ws1"][0])
    with pytest.raises(ClientException) as info:
        await asyncio.to_thread(sdk_list, limited, workspace_id=WS2)
    assert (info.value.code, info.value.status_code) == ("Forbidden.Workspace", 403)


async def test_tag_filters_and_tags_match_the_simulator(
    pair: tuple[Simulator, ApiRig, list[dict[str, str]]],
) -> None:
    """The SDK's request model has no Tag: raw requests, signed for the simulator."""
    sim, rig, _ = pair
    headers = {"Authorization": f"Bearer {TOKENS['all'][0]}"}
    async with aiohttp.ClientSession() as session:
        for tags in (
            [{"Key": "team", "Value": "nlp"}],
            [{"Key": "env"}],
            [{"Key": "team", "Value": "ml ops"}, {"Key": "priority", "Value": "p0"}],
        ):
            query = {"Tag": json.dumps(tags, separators=(",", ":")), "PageSize": "200"}
            want = await list_ok(session, sim.base_url, query)
            async with session.get(rig.base_url + COMPAT, params=query, headers=headers) as resp:
                assert resp.status == 200
                got = await resp.json()
            assert got["TotalCount"] == want["TotalCount"] > 0, tags
            assert comparable(got["Experiments"]) == comparable(want["Experiments"]), tags
            assert [e["Tags"] for e in got["Experiments"]] == [
                e["Tags"] for e in want["Experiments"]
            ]
        freshness = resp.headers["X-Last-Sync"]
        assert freshness != "never" and resp.headers["x-acs-request-id"] == got["RequestId"]


@pytest.mark.parametrize(
    "tag",
    [
        '[{"Key":"\\ud800"}]',  # JSON escapes of lone surrogates: no UTF-8 text carries them
        '[{"Key":"team","Value":"nlp\\udfff"}]',
        "[" * 2500,  # deeper than any JSON decoder recurses
        "[" * 1250 + "]" * 1250,
        '[{"Key":' * 300,
    ],
)
async def test_a_tag_no_decoder_or_utf8_can_carry_is_a_400_in_the_upstream_shape(
    rig: ApiRig, tag: str
) -> None:
    reply = await rig.get(COMPAT, {"Tag": tag})
    assert reply.status == 400, reply.text[:300]
    assert set(reply.body) == {"RequestId", "Code", "Message"}
    assert reply.body["Code"] == "INVALID_INPUT_PARAMS" and "Tag" in reply.body["Message"]
    assert len(reply.body["Message"]) < 300  # the value is quoted, not echoed whole


@pytest.mark.parametrize("order", [" asc", "asc ", " ASC ", "\tdesc"])
async def test_order_with_surrounding_blanks_is_read_as_the_document_says(
    rig: ApiRig, order: str
) -> None:
    """/openapi.json allows blanks around Order (upstream trims values, as it does for
    SortBy, PageSize and the rest); the route must accept what the document accepts."""
    want = await rig.ok(COMPAT, {"Order": order.strip(), "PageSize": "30"})
    got = await rig.ok(COMPAT, {"Order": order, "PageSize": "30"})
    assert [e["ExperimentId"] for e in got["Experiments"]] == [
        e["ExperimentId"] for e in want["Experiments"]
    ]
    assert got["TotalCount"] == want["TotalCount"] > 0


async def test_a_wrong_path_or_method_under_the_upstream_prefix_answers_as_the_gateway_does(
    pair: tuple[Simulator, ApiRig, list[dict[str, str]]],
) -> None:
    """What PAI's gateway (and the simulator) answer for an API that is not there: the code
    ``InvalidAction.NotFound``, in the upstream shape, not the /v1 routes' snake_case."""
    sim, rig, _ = pair
    auth = {"Authorization": f"Bearer {TOKENS['all'][0]}"}
    async with aiohttp.ClientSession() as session:
        for method, path in (
            ("POST", "/api/automl/v1/hpo/experiments"),
            ("GET", "/api/automl/v1/hpo/experiment"),
        ):
            codes = []
            for base in (sim.base_url, f"http://127.0.0.1:{rig.server.port}"):
                async with session.request(method, base + path, headers=auth) as resp:
                    body = await resp.json()
                    codes.append(body["Code"])
                    assert {"RequestId", "Code", "Message"} <= set(body)
                    assert resp.headers["x-acs-request-id"] == body["RequestId"]
            assert codes == ["InvalidAction.NotFound"] * 2, (method, path)
