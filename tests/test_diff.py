"""The pure diffing rules: tracked fields, first sightings, replay, run times."""

from __future__ import annotations

from typing import Any

from hpo_sync.diff import (
    DELETED,
    STATUS,
    TRIAL_STATUS,
    FieldChange,
    ReplayState,
    changed_columns,
    diff,
    diff_rows,
    finished_runs,
    replay,
)
from hpo_sync.normalise import Experiment, normalise
from hpo_sync.schema import experiment_content


def exp(**fields: Any) -> Experiment:
    raw = {
        "ExperimentId": "e1",
        "WorkspaceId": "ws",
        "Name": "sweep",
        "Status": "RUNNING",
        "TrialStatus": {"RUNNING": 2},
        "GmtCreateTime": "2024-01-01T00:00:00Z",
    }
    raw.update(fields)
    out = normalise(raw)
    assert out is not None
    return out


def stored(e: Experiment) -> dict[str, Any]:
    return experiment_content(e, "ws")


def test_first_sighting_is_a_status_row_with_null_old_value() -> None:
    assert diff(None, exp()) == [
        FieldChange(STATUS, None, "RUNNING"),
        FieldChange(TRIAL_STATUS, None, '{"RUNNING":2}'),
    ]


def test_first_sighting_without_trials_or_already_deleted() -> None:
    assert diff(None, exp(TrialStatus={})) == [FieldChange(STATUS, None, "RUNNING")]
    assert diff(None, exp(TrialStatus={}, Deleted=True)) == [
        FieldChange(STATUS, None, "RUNNING"),
        FieldChange(DELETED, None, "true"),
    ]


def test_identical_data_is_no_change() -> None:
    e = exp()
    assert diff(stored(e), e) == []
    assert changed_columns(stored(e), stored(e)) == []


def test_status_trial_status_and_deleted_changes() -> None:
    old = stored(exp())
    new = exp(Status="FAILED", TrialStatus={"FAILED": 2, "SUCCEEDED": 0}, Deleted="true")
    assert diff(old, new) == [
        FieldChange(STATUS, "RUNNING", "FAILED"),
        FieldChange(TRIAL_STATUS, '{"RUNNING":2}', '{"FAILED":2}'),
        FieldChange(DELETED, "false", "true"),
    ]


def test_trial_status_compared_as_json_not_text() -> None:
    old = {"status": "RUNNING", "trial_status": '{ "RUNNING" : 2, "FAILED": 0 }', "deleted": 0}
    assert diff(old, exp()) == []
    # a mapping works as well as stored text
    assert diff({**old, "trial_status": {"RUNNING": 2}}, exp()) == []


def test_diff_rows_canonicalises_both_sides() -> None:
    old = {"status": "X", "trial_status": '{"B":1,"A":1}', "deleted": 0}
    new = {"status": "X", "trial_status": '{"A":2}', "deleted": False}
    assert diff_rows(old, new) == [FieldChange(TRIAL_STATUS, '{"A":1,"B":1}', '{"A":2}')]


def test_other_columns_change_without_change_rows() -> None:
    old = stored(exp())
    new = exp(Description="now with notes", GmtModifiedTime="2024-01-02T00:00:00Z")
    assert diff(old, new) == []
    assert changed_columns(old, stored(new)) == ["description", "gmt_modified_time", "raw"]


def test_replay_folds_history_in_order() -> None:
    rows = [
        {"experiment_id": "a", "field": STATUS, "new_value": "CREATED"},
        {"experiment_id": "b", "field": STATUS, "new_value": "RUNNING"},
        {"experiment_id": "a", "field": TRIAL_STATUS, "new_value": '{"RUNNING":1}'},
        {"experiment_id": "a", "field": STATUS, "new_value": "RUNNING"},
        {"experiment_id": "b", "field": DELETED, "new_value": "true"},
        {"experiment_id": "b", "field": "SomethingNew", "new_value": "x"},
        {"experiment_id": "b", "field": DELETED, "new_value": "false"},
        {"experiment_id": "b", "field": DELETED, "new_value": "true"},
    ]
    assert replay(rows) == {
        "a": ReplayState("RUNNING", {"RUNNING": 1}, False),
        "b": ReplayState("RUNNING", {}, True),
    }


def _status(value: str, at: str, baseline: int = 0) -> dict[str, Any]:
    return {"new_value": value, "observed_at": at, "baseline": baseline}


def test_finished_runs_from_first_running_observation() -> None:
    history = [
        _status("CREATED", "2024-01-01T00:00:00Z"),
        _status("RUNNING", "2024-01-01T00:10:00Z"),
        _status("WAITING", "2024-01-01T00:20:00Z"),
        _status("RUNNING", "2024-01-01T00:30:00Z"),
        _status("FAILED", "2024-01-01T01:10:00Z"),
        # restarted: a second run, timed from its own RUNNING
        _status("RUNNING", "2024-01-02T00:00:00Z"),
        _status("FINISHED", "2024-01-02T00:00:30Z"),
        # terminal to another terminal status: restarted and ended again between two syncs,
        # which saw no RUNNING: a finish of unknown start
        _status("FAILED", "2024-01-03T00:00:00Z"),
    ]
    runs = finished_runs(history, create_time="2023-12-31T00:00:00Z")
    assert [(r.status, r.run_time_s) for r in runs] == [
        ("FAILED", 3600.0), ("FINISHED", 30.0), ("FAILED", None),
    ]  # fmt: skip
    # a baseline's terminal status, then another one: the same
    history = [
        _status("FINISHED", "2024-01-01T00:00:00Z", 1),
        _status("FAILED", "2024-01-02T00:00:00Z"),
    ]
    assert [(r.status, r.run_time_s) for r in finished_runs(history, create_time=None)] == [
        ("FAILED", None)
    ]


def test_finished_runs_fall_back_to_create_time_and_skip_baseline() -> None:
    # first seen by the baseline already RUNNING: start unknown, use create time
    history = [
        _status("RUNNING", "2024-01-01T05:00:00Z", baseline=1),
        _status("FINISHED", "2024-01-01T06:00:00Z"),
    ]
    [run] = finished_runs(history, create_time="2024-01-01T04:00:00Z")
    assert run.run_time_s == 7200.0
    # first seen by the baseline already finished: not a finish we observed
    assert finished_runs([_status("FAILED", "2024-01-01T06:00:00Z", 1)], create_time=None) == []
    # no start known at all
    [run] = finished_runs([_status("FAILED", "2024-01-01T06:00:00Z")], create_time=None)
    assert run.run_time_s is None
