"""docs/schema.md is part of the product: it must name every table, column and index of the
mirror, and its example queries must run."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpo_sync.normalise import normalise
from hpo_sync.schema import SCHEMA_VERSION
from hpo_sync.store import Store

DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "mirror.db") as store:
        run = store.begin_run("ws1", "full", "2024-03-01T00:00:00Z")
        for at, status in [("2024-03-01T00:00:00Z", "RUNNING"), ("2024-03-01T01:00:00Z", "FAILED")]:
            exp = normalise(
                {
                    "ExperimentId": "hpo-abc123",
                    "WorkspaceId": "ws1",
                    "Status": status,
                    "TrialStatus": {"FAILED": 1 if status == "FAILED" else 0, "RUNNING": 1},
                    "Tags": [{"Key": "team", "Value": "nlp"}],
                    "GmtCreateTime": "2024-02-29T23:00:00Z",
                }
            )
            assert exp is not None
            store.apply("ws1", [exp], observed_at=at, run_id=run, complete=True, baseline=False)
        store.finish_run(
            run, finished_at="2024-03-01T01:00:01.5Z", status="failed", api_calls=1, pages=1,
            experiments_seen=1, error="Throttling",
        )  # fmt: skip
        yield store


def test_every_table_column_and_index_is_documented(mirror: Store) -> None:
    doc = DOC.read_text()
    assert f"schema version described here is **{SCHEMA_VERSION}**" in doc
    assert f"`PRAGMA user_version` (currently {SCHEMA_VERSION})" in doc
    with mirror.reader() as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            assert f"## `{table}`" in doc, table
            section = doc.split(f"## `{table}`", 1)[1].split("\n## ", 1)[0]
            # table_xinfo: generated columns (experiments.api_json) too
            for (column,) in conn.execute(f"SELECT name FROM pragma_table_xinfo('{table}')"):
                assert f"| `{column}` |" in section, f"{table}.{column}"
        for (index,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ):
            assert f"`{index}`" in doc, index


def test_example_queries_run(mirror: Store) -> None:
    queries = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(queries) >= 8
    params = {"last_id": 0, "last_created": "2024-03-01T00:00:00Z"}
    with mirror.reader() as conn:
        for sql in queries:
            try:
                conn.execute(sql, {k: v for k, v in params.items() if f":{k}" in sql}).fetchall()
            except sqlite3.Error as e:  # pragma: no cover - the message is the point
                pytest.fail(f"{e}\n{sql}")
