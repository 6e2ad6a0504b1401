"""The long-running commands' event loop: uvloop when installed, asyncio's on request."""

from __future__ import annotations

import asyncio

import pytest

from hpo_sync import eventloop


def test_uvloop_is_chosen_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV_VAR, raising=False)
    assert eventloop.loop_factory() is uvloop.new_event_loop

    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_type()).startswith("uvloop")


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_the_environment_can_choose_asyncios_loop(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(eventloop.ENV_VAR, value)
    assert eventloop.loop_factory() is None

    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_type()) == "asyncio.unix_events"


def test_run_returns_the_result_and_raises_the_error() -> None:
    async def ok() -> int:
        await asyncio.sleep(0)
        return 42

    async def boom() -> None:
        raise ValueError("no")

    assert eventloop.run(ok()) == 42
    with pytest.raises(ValueError, match="no"):
        eventloop.run(boom())
