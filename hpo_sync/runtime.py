"""What a running daemon shares with the parts it hosts (the read API, the alert worker).

One small, typed object, built by :mod:`hpo_sync.daemon` and handed to
:func:`hpo_sync.api.build_app`. Read ``runtime.config`` afresh on every use: a SIGHUP reload
replaces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .store import Store
    from .sweeper import SweepProcess
    from .sync import SweepResult, SyncEngine

SweepMode = Literal["auto", "hot", "full"]


class SyncRequester(Protocol):
    def __call__(self, workspace_id: str, mode: SweepMode = "auto") -> asyncio.Future[SweepResult]:
        """Start a sweep of a configured workspace now, whatever its backoff; the future
        resolves to its result (await it, or not). Raises KeyError for an unknown workspace,
        :class:`~hpo_sync.errors.ShuttingDownError` once the daemon is stopping."""
        ...


@dataclass
class WorkspaceHealth:
    """The scheduler's view of one workspace (what the mirror alone cannot tell)."""

    workspace_id: str
    consecutive_failures: int = 0
    #: Backing off: no scheduled sweep before this time.
    retry_at: datetime | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_sweep_at: datetime | None = None
    sweeping: bool = False


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Runtime:
    """The daemon's moving parts, as the API and other hosted services see them."""

    config: Config
    store: Store
    engine: SyncEngine | SweepProcess
    metrics: Metrics
    started_at: datetime
    request_sync: SyncRequester
    health: dict[str, WorkspaceHealth] = field(default_factory=dict)
    clock: Callable[[], datetime] = _utcnow
    #: ``http://host:port`` once the API listens.
    api_url: str | None = None
