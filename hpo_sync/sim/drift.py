"""Type drift, as the real API shows it: the same field arrives as a string in one response
and as a number in the next, and times come in two formats (pure; the caller owns the RNG).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any

SPACE_FORMAT = "%Y-%m-%d %H:%M:%S"


@functools.lru_cache(maxsize=1 << 18)  # pure, and strptime is slow
def _space_time(iso: str, tz: tzinfo) -> str:
    """``2023-03-31T10:29:30Z`` -> ``2023-03-31 18:29:30`` in ``tz``."""
    if len(iso) == 20 and iso[10] == "T" and iso[19] == "Z":  # what the world renders
        dt = datetime.fromisoformat(iso[:19]).replace(tzinfo=UTC)
    else:  # strptime also reads unpadded fields
        dt = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    local = dt.astimezone(tz)
    if local.year < 1000:  # strftime's %Y does not pad
        return local.strftime(SPACE_FORMAT)
    return (
        f"{local.year}-{local.month:02d}-{local.day:02d} "
        f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
    )


def drift_experiment(
    exp: Mapping[str, Any], rng: random.Random, tz: tzinfo = UTC
) -> dict[str, Any]:
    """A copy of a canonical experiment with its types drifted the way upstream's do:
    ``Creator`` and ``JobType`` as number or string, ``TrialStatus`` counts as int or
    string, and both times either ISO-8601 UTC or ``yyyy-mm-dd hh:mm:ss`` in ``tz``."""
    out = dict(exp)
    creator = out.get("Creator")
    if isinstance(creator, str) and creator.isdigit() and rng.random() < 0.5:
        out["Creator"] = int(creator)
    job_type = out.get("JobType")
    if isinstance(job_type, str) and job_type.isdigit() and rng.random() < 0.5:
        out["JobType"] = int(job_type)
    trial_status = out.get("TrialStatus")
    if isinstance(trial_status, Mapping) and rng.random() < 0.4:
        out["TrialStatus"] = {
            k: str(v) if rng.random() < 0.7 else v for k, v in trial_status.items()
        }
    if rng.random() < 0.4:
        for key in ("GmtCreateTime", "GmtModifiedTime"):
            value = out.get(key)
            if isinstance(value, str) and value.endswith("Z"):
                out[key] = _space_time(value, tz)
    return out
