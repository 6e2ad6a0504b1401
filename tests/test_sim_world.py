"""The pure model behind the simulator: generation, evolution, and every list parameter."""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpo_sync.normalise import normalise, to_upstream
from hpo_sync.sim.world import (
    ACTIVE_STATUSES,
    EXPERIMENT_STATUSES,
    INVALID_INPUT_PARAMS,
    TERMINAL_STATUSES,
    TRIAL_STATUSES,
    InvalidInputError,
    World,
)

START = datetime(2025, 6, 1, 8, 0, 0, tzinfo=UTC)
ISO = "%Y-%m-%dT%H:%M:%SZ"


def ts(iso: str) -> datetime:
    return datetime.strptime(iso, ISO).replace(tzinfo=UTC)


@functools.cache
def shared_world() -> World:
    """A frozen world for read-only tests (never advance or mutate it)."""
    return World(seed=11, experiments=3000, workspaces=3, start_time=START)


@functools.cache
def shared_truth() -> tuple[dict[str, Any], ...]:
    return tuple(shared_world().truth())


def list_all(world: World, params: dict[str, str], page_size: int = 97) -> tuple[int, list[Any]]:
    out: list[Any] = []
    total = None
    page = 1
    while True:
        t, items = world.list({**params, "PageSize": str(page_size), "PageNumber": str(page)})
        total = t if total is None else total
        assert t == total
        if not items:
            break
        out.extend(items)
        page += 1
    return total, out


# ---------------------------------------------------------------------- generation


def test_generation_shape() -> None:
    w = World(seed=1, experiments=3000, workspaces=4, start_time=START)
    truth = w.truth()
    assert len(truth) == len(w) == 3000
    assert w.workspace_ids == ("100001", "100002", "100003", "100004")
    per_ws = Counter(e["WorkspaceId"] for e in truth)
    assert set(per_ws.values()) == {750}
    ids = [e["ExperimentId"] for e in truth]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9]{7,12}", i) for i in ids)
    created = [ts(e["GmtCreateTime"]) for e in truth]
    assert min(created) >= START - timedelta(days=90)
    assert max(created) <= START
    assert len(set(created)) < len(created), "some experiments must share a create second"
    active = [e for e in truth if e["Status"] in ACTIVE_STATUSES]
    assert len(active) == 150  # 5 %
    assert {e["Status"] for e in truth} <= set(EXPERIMENT_STATUSES)
    for e in truth:
        assert set(e["TrialStatus"]) <= set(TRIAL_STATUSES)
        assert e["TrialCount"] == sum(e["TrialStatus"].values())
        assert e["JobType"] == "1"
        assert e["Creator"].isdigit()
        assert e["Accessibility"] in ("PRIVATE", "PUBLIC")
        assert e["Deleted"] is False
        assert ts(e["GmtModifiedTime"]) >= ts(e["GmtCreateTime"])
        assert all(set(t) == {"Key", "Value"} for t in e["Tags"])
        assert json.loads(e["SearchSpace"])
        assert "maxTrialNumber" in e["ConfigYml"]
        assert "access_key_secret = ****" in e["ConfigIni"]
        if e["Status"] in TERMINAL_STATUSES:
            assert not (e["TrialStatus"].keys() & {"RUNNING", "WAITING"})
    names = [e["Name"] for e in truth]
    assert any(" " in n for n in names)
    assert any("*" in n for n in names)
    assert any("~" in n for n in names)
    assert any(not n.isascii() for n in names)
    assert any(" " in t["Value"] for e in truth for t in e["Tags"])


def test_truth_is_canonical_upstream_shape() -> None:
    for e in shared_truth()[:500]:
        exp = normalise(e)
        assert exp is not None
        assert to_upstream(exp) == e


def test_same_seed_same_world_other_seed_other_world() -> None:
    a = World(seed=7, experiments=500, start_time=START)
    b = World(seed=7, experiments=500, start_time=START)
    c = World(seed=8, experiments=500, start_time=START)
    assert a.truth() == b.truth()
    assert a.truth() != c.truth()


def test_start_time_must_be_aware() -> None:
    with pytest.raises(ValueError):
        World(start_time=datetime(2025, 1, 1))


# ---------------------------------------------------------------------- evolution


def test_advance_is_deterministic_and_independent_of_slicing() -> None:
    a = World(seed=3, experiments=2000, start_time=START)
    b = World(seed=3, experiments=2000, start_time=START)
    events_a = a.advance(3600)
    events_b: list[Any] = []
    for _ in range(60):
        events_b.extend(b.advance(60))
    assert events_a == events_b
    assert a.truth() == b.truth()
    assert a.deleted_ids() == b.deleted_ids()
    assert a.now == b.now == START + timedelta(hours=1)


def test_advance_changes_statuses_trials_creates_deletes_restarts() -> None:
    w = World(seed=5, experiments=2000, start_time=START)
    before = {e["ExperimentId"]: e for e in w.truth()}
    events = w.advance(6 * 3600)
    kinds = Counter(e.kind for e in events)
    assert kinds["status"] > 0 and kinds["trials"] > 0
    assert kinds["created"] > 0 and kinds["deleted"] > 0 and kinds["restarted"] > 0
    after = {e["ExperimentId"]: e for e in w.truth()}
    deleted = set(w.deleted_ids())
    assert deleted and not deleted & after.keys()
    assert all(d in before or any(ev.experiment_id == d for ev in events) for d in deleted)
    for ev in events:
        assert START <= ev.at <= w.now
    # every status change follows the lifecycle
    allowed = {
        "CREATED": {"WAITING"},
        "WAITING": {"RUNNING"},
        "RUNNING": {"NO_MORE_TRIAL", "UNKNOWN"} | TERMINAL_STATUSES,
        "NO_MORE_TRIAL": {"UNKNOWN"} | TERMINAL_STATUSES,
        "UNKNOWN": {"RUNNING", "NO_MORE_TRIAL"},
    }
    for ev in events:
        if ev.kind == "status":
            assert ev.new_status in allowed[ev.old_status or ""], ev
        if ev.kind == "restarted":
            assert ev.old_status in TERMINAL_STATUSES and ev.new_status == "RUNNING"
    # trial counts grow while running
    grown = [
        i for i, e in after.items() if i in before and e["TrialCount"] > before[i]["TrialCount"]
    ]
    assert grown
    for e in after.values():
        assert e["TrialCount"] == sum(e["TrialStatus"].values())
        if e["Status"] in TERMINAL_STATUSES:
            assert not (e["TrialStatus"].keys() & {"RUNNING", "WAITING", "UNKNOWN"})


def test_a_20k_world_changes_every_few_sim_seconds() -> None:
    w = World(seed=9, experiments=20_000, start_time=START)
    events = w.advance(60)
    assert len(events) >= 20
    gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(events)]
    assert max(gaps) < 30


def test_active_share_holds_while_the_world_evolves() -> None:
    w = World(seed=9, experiments=5000, start_time=START)
    for _ in range(4):
        w.advance(4 * 3600)
        counts = w.status_counts()
        share = sum(n for s, n in counts.items() if s in ACTIVE_STATUSES) / len(w)
        assert 0.03 < share < 0.08, counts


def test_modified_time_bumped_or_left_alone() -> None:
    for bump in (True, False):
        w = World(seed=4, experiments=1000, start_time=START, bump_modified=bump)
        before = {e["ExperimentId"]: e for e in w.truth()}
        events = w.advance(1800)
        changed = {ev.experiment_id: ev for ev in events if ev.kind in ("status", "trials")}
        assert changed
        after = {e["ExperimentId"]: e for e in w.truth()}
        for exp_id in changed:
            if exp_id not in after or exp_id not in before:
                continue
            last = max(ev.at for ev in events if ev.experiment_id == exp_id)
            if bump:
                assert ts(after[exp_id]["GmtModifiedTime"]) == last
            else:
                assert after[exp_id]["GmtModifiedTime"] == before[exp_id]["GmtModifiedTime"]


def test_mutate() -> None:
    w = World(seed=2, experiments=300, start_time=START)
    target = w.truth()[0]
    exp_id = target["ExperimentId"]
    w.advance(10)
    [ev] = w.mutate(exp_id, status="FAILED")
    assert (ev.kind, ev.old_status, ev.new_status) == ("status", target["Status"], "FAILED")
    assert w.get(exp_id)["Status"] == "FAILED"  # type: ignore[index]
    assert w.get(exp_id)["GmtModifiedTime"] == "2025-06-01T08:00:10Z"  # type: ignore[index]
    [ev] = w.mutate(exp_id, trial_status={"SUCCEEDED": 3, "FAILED": 2})
    assert ev.kind == "trials"
    got = w.get(exp_id)
    assert got is not None
    assert got["TrialStatus"] == {"FAILED": 2, "SUCCEEDED": 3} and got["TrialCount"] == 5
    total_before, _ = w.list({})
    [ev] = w.mutate(exp_id, delete=True)
    assert ev.kind == "deleted"
    assert w.get(exp_id) is None and exp_id in w.deleted_ids()
    assert w.list({})[0] == total_before - 1
    assert w.deleted()[exp_id]["Deleted"] is True
    [ev] = w.mutate(
        create={
            "WorkspaceId": "100002",
            "ExperimentId": "myExp0001",
            "Name": "made by hand",
            "Status": "RUNNING",
            "Tags": [{"Key": "team", "Value": "ml ops"}],
            "GmtCreateTime": "2025-05-31T00:00:00Z",
        }
    )
    assert ev.kind == "created"
    made = w.get("myExp0001")
    assert made is not None
    assert made["Name"] == "made by hand" and made["Status"] == "RUNNING"
    assert made["GmtCreateTime"] == "2025-05-31T00:00:00Z"
    with pytest.raises(KeyError):
        w.mutate("nope", status="RUNNING")
    with pytest.raises(ValueError):
        w.mutate("myExp0001", status="DANCING")
    with pytest.raises(ValueError):
        w.mutate("myExp0001", trial_status={"PARTYING": 1})
    with pytest.raises(ValueError):
        w.mutate(create={"ExperimentId": "myExp0001"})


# ---------------------------------------------------------------------- listing


def test_defaults_page_size_10_newest_first() -> None:
    w = shared_world()
    total, page = w.list({})
    assert total == len(w)
    assert len(page) == 10
    newest = sorted(shared_truth(), key=lambda e: (e["GmtCreateTime"], e["ExperimentId"]))[::-1]
    assert [e["ExperimentId"] for e in page] == [e["ExperimentId"] for e in newest[:10]]
    assert "SearchSpace" not in page[0] and "ConfigYml" not in page[0]


@pytest.mark.parametrize(
    ("sort_by", "key"),
    [
        ("GmtCreateTime", lambda e: (e["GmtCreateTime"], e["ExperimentId"])),
        ("create_time", lambda e: (e["GmtCreateTime"], e["ExperimentId"])),
        ("GmtModifiedTime", lambda e: (e["GmtModifiedTime"], e["ExperimentId"])),
        ("update_time", lambda e: (e["GmtModifiedTime"], e["ExperimentId"])),
        ("Name", lambda e: (e["Name"], e["ExperimentId"])),
        ("workspace_id", lambda e: (e["WorkspaceId"], e["ExperimentId"])),
        ("status", lambda e: (e["Status"], e["ExperimentId"])),
        ("accessibility", lambda e: (e["Accessibility"], e["ExperimentId"])),
    ],
)
@pytest.mark.parametrize("order", ["ASC", "DESC", "asc"])
def test_sort_by_both_vocabularies(sort_by: str, key: Any, order: str) -> None:
    w = shared_world()
    total, got = list_all(w, {"SortBy": sort_by, "Order": order}, page_size=1000)
    expected = sorted(shared_truth(), key=key, reverse=order.upper() == "DESC")
    assert total == len(expected)
    assert [e["ExperimentId"] for e in got] == [e["ExperimentId"] for e in expected]


def _brute(w: World, pred: Any) -> list[str]:
    truth = shared_truth() if w is shared_world() else w.truth()
    return sorted(e["ExperimentId"] for e in truth if pred(e))


@pytest.mark.parametrize(
    ("params", "pred"),
    [
        ({"WorkspaceId": "100002"}, lambda e: e["WorkspaceId"] == "100002"),
        ({"WorkspaceId": "nope"}, lambda e: False),
        ({"Status": "RUNNING"}, lambda e: e["Status"] == "RUNNING"),
        ({"Status": "FINISHED"}, lambda e: e["Status"] == "FINISHED"),
        ({"Accessibility": "PUBLIC"}, lambda e: e["Accessibility"] == "PUBLIC"),
        ({"Name": "BERT_lr"}, lambda e: "bert_lr" in e["Name"].lower()),
        ({"Name": "sweep 1"}, lambda e: "sweep 1" in e["Name"].lower()),
        ({"Name": "*"}, lambda e: "*" in e["Name"]),
        ({"Name": "模型"}, lambda e: "模型" in e["Name"]),
        (
            {"Tag": json.dumps([{"Key": "team", "Value": "ml ops"}])},
            lambda e: {"Key": "team", "Value": "ml ops"} in e["Tags"],
        ),
        (
            {
                "Tag": json.dumps(
                    [{"Key": "team", "Value": "nlp"}, {"Key": "env", "Value": "prod"}],
                    separators=(",", ":"),
                )
            },
            lambda e: (
                {"Key": "team", "Value": "nlp"} in e["Tags"]
                and {"Key": "env", "Value": "prod"} in e["Tags"]
            ),
        ),
        (
            {"Tag": json.dumps([{"Key": "owner"}])},
            lambda e: any(t["Key"] == "owner" for t in e["Tags"]),
        ),
        (
            {"WorkspaceId": "100001", "Status": "FAILED", "Accessibility": "PRIVATE"},
            lambda e: (
                (e["WorkspaceId"], e["Status"], e["Accessibility"])
                == ("100001", "FAILED", "PRIVATE")
            ),
        ),
        ({"Status": "", "Name": ""}, lambda e: True),  # empty values count as absent
    ],
)
def test_filters(params: dict[str, str], pred: Any) -> None:
    w = shared_world()
    total, got = list_all(w, params)
    ids = sorted(e["ExperimentId"] for e in got)
    assert ids == _brute(w, pred)
    assert total == len(ids)


def test_filter_creator() -> None:
    w = shared_world()
    creator = shared_truth()[42]["Creator"]
    total, got = list_all(w, {"Creator": creator})
    assert total > 0
    assert sorted(e["ExperimentId"] for e in got) == _brute(w, lambda e: e["Creator"] == creator)


def test_create_time_window_inclusive_both_formats_and_zone() -> None:
    w = shared_world()
    truth = shared_truth()
    pivot = truth[len(truth) // 2]
    pivot_dt = ts(pivot["GmtCreateTime"])
    text = pivot_dt.strftime("%Y-%m-%d %H:%M:%S")
    _, got = list_all(w, {"MinCreateTime": text, "MaxCreateTime": text})
    assert pivot["ExperimentId"] in {e["ExperimentId"] for e in got}
    assert all(e["GmtCreateTime"] == pivot["GmtCreateTime"] for e in got)
    day = pivot_dt.strftime("%Y-%m-%d")
    _, got = list_all(w, {"MinCreateTime": day})
    assert sorted(e["ExperimentId"] for e in got) == _brute(
        w, lambda e: e["GmtCreateTime"] >= f"{day}T00:00:00Z"
    )
    _, got = list_all(w, {"MaxCreateTime": day})
    assert sorted(e["ExperimentId"] for e in got) == _brute(
        w, lambda e: e["GmtCreateTime"] <= f"{day}T00:00:00Z"
    )
    shanghai = World(
        seed=11,
        experiments=3000,
        workspaces=3,
        start_time=START,
        time_zone=timezone(timedelta(hours=8)),
    )
    local = (pivot_dt + timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")
    _, got = list_all(shanghai, {"MinCreateTime": local, "MaxCreateTime": local})
    assert pivot["ExperimentId"] in {e["ExperimentId"] for e in got}


@pytest.mark.parametrize("value", ["True", "true", "TRUE"])
def test_include_config_data(value: str) -> None:
    w = shared_world()
    _, page = w.list({"IncludeConfigData": value, "PageSize": "3"})
    for e in page:
        assert e == w.get(e["ExperimentId"])
    _, page = w.list({"IncludeConfigData": "False", "PageSize": "3"})
    assert all("SearchSpace" not in e and "ConfigIni" not in e for e in page)


@pytest.mark.parametrize(
    "params",
    [
        {"PageNumber": "0"},
        {"PageNumber": "-1"},
        {"PageNumber": "one"},
        {"PageSize": "ten"},
        {"PageSize": "2.5"},
        {"PageSize": "0"},
        {"PageSize": "1001"},
        {"Order": "UP"},
        {"SortBy": "colour"},
        {"IncludeConfigData": "yes"},
        {"MinCreateTime": "2024/01/01"},
        {"MaxCreateTime": "2024-01-01T00:00:00Z"},
        {"MaxCreateTime": "2024-02-30"},
        {"Tag": "[{"},
        {"Tag": '{"Key": "a"}'},
        {"Tag": '[{"Value": "a"}]'},
        {"Tag": json.dumps([{"Key": f"k{i}", "Value": "v"} for i in range(21)])},
    ],
)
def test_invalid_input(params: dict[str, str]) -> None:
    with pytest.raises(InvalidInputError) as info:
        shared_world().list(params)
    assert info.value.code == INVALID_INPUT_PARAMS
    assert str(info.value)


def test_twenty_tags_are_fine() -> None:
    tags = [{"Key": "team", "Value": "nlp"}] * 20
    shared_world().list({"Tag": json.dumps(tags)})


def test_paging_is_stable_with_ties_and_past_the_end() -> None:
    w = shared_world()
    for order in ("ASC", "DESC"):
        total, got = list_all(w, {"Order": order, "WorkspaceId": "100003"}, page_size=7)
        ids = [e["ExperimentId"] for e in got]
        assert len(ids) == len(set(ids)) == total == 1000
    total, page = w.list({"PageNumber": "9999", "PageSize": "100"})
    assert total == len(w) and page == []


def test_cache_is_invalidated_by_changes() -> None:
    w = World(seed=6, experiments=600, workspaces=2, start_time=START)
    q_ws1 = {"WorkspaceId": "100001", "Status": "FAILED", "PageSize": "1000"}
    q_all = {"Status": "FAILED", "PageSize": "1000"}
    n1, _ = w.list(q_ws1)
    n_all, _ = w.list(q_all)
    victim = next(e for e in w.truth("100002") if e["Status"] != "FAILED")
    w.mutate(victim["ExperimentId"], status="FAILED")
    assert w.list(q_ws1)[0] == n1  # other workspace: unchanged
    assert w.list(q_all)[0] == n_all + 1
    mine = next(e for e in w.truth("100001") if e["Status"] != "FAILED")
    w.mutate(mine["ExperimentId"], status="FAILED")
    assert w.list(q_ws1)[0] == n1 + 1
    w.advance(3600)
    fresh = sorted(
        e["ExperimentId"]
        for e in w.truth()
        if e["Status"] == "FAILED" and e["WorkspaceId"] == "100001"
    )
    assert sorted(e["ExperimentId"] for e in w.list(q_ws1)[1]) == fresh


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    page_size=st.integers(13, 400),
    workspace=st.sampled_from([None, "100001", "100002", "100003"]),
    status=st.sampled_from([None, "RUNNING", "FINISHED", "FAILED"]),
    sort_by=st.sampled_from(["GmtCreateTime", "update_time", "Name", "status"]),
    order=st.sampled_from(["ASC", "DESC"]),
)
def test_paging_never_skips_or_repeats(
    page_size: int, workspace: str | None, status: str | None, sort_by: str, order: str
) -> None:
    w = shared_world()
    params = {"SortBy": sort_by, "Order": order}
    if workspace:
        params["WorkspaceId"] = workspace
    if status:
        params["Status"] = status
    total, got = list_all(w, params, page_size=page_size)
    ids = [e["ExperimentId"] for e in got]
    assert len(ids) == len(set(ids)) == total
    assert sorted(ids) == _brute(
        w,
        lambda e: (
            (workspace is None or e["WorkspaceId"] == workspace)
            and (status is None or e["Status"] == status)
        ),
    )


@pytest.mark.slow
def test_a_page_of_100k_is_fast() -> None:
    w = World(seed=1, experiments=100_000, workspaces=5, start_time=START)
    params = {"WorkspaceId": "100003", "SortBy": "create_time", "Order": "ASC", "PageSize": "100"}
    t0 = time.perf_counter()
    w.list({**params, "PageNumber": "1"})
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for page in range(2, 52):
        total, items = w.list({**params, "PageNumber": str(page)})
        assert len(items) == 100
    per_page_s = (time.perf_counter() - t0) / 50
    assert total == 20_000
    assert first_s < 1.0
    assert per_page_s < 0.02, per_page_s
