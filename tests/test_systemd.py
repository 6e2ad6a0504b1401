"""The systemd unit: ``systemd-analyze verify`` accepts it and ``systemd-analyze security``
rates its sandbox "OK" or better. Skipped where systemd-analyze is not installed (Debian:
``apt-get install systemd``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "hpo-sync.service"
INSTALLED_BINARY = "/usr/local/bin/hpo-sync"
#: systemd's own scale: below 2.0 is "OK", below 1.0 "SAFE"/"PERFECT".
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def unit_text() -> str:
    return UNIT.read_text(encoding="utf-8")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it)."""
    binary = shutil.which("hpo-sync") or str(Path(sys.executable).with_name("hpo-sync"))
    if not Path(binary).exists():
        pytest.skip("no hpo-sync console script installed next to this Python")
    text = unit_text()
    assert INSTALLED_BINARY in text
    path = tmp_path / "hpo-sync.service"
    path.write_text(text.replace(INSTALLED_BINARY, binary), encoding="utf-8")
    return path


def test_unit_has_the_service_contract() -> None:
    d = directives(unit_text())
    assert d["Type"] == ["notify"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["2"]  # config errors: a restart cannot help
    # a failure that persists (a newer mirror, the lock held) ends in "failed", not a loop
    assert d["StartLimitIntervalSec"] == ["300"] and d["StartLimitBurst"] == ["5"]
    assert d["WatchdogSec"] and int(d["WatchdogSec"][0]) > 0
    assert d["StateDirectory"] == ["hpo-sync"] and d["ConfigurationDirectory"] == ["hpo-sync"]
    assert d["ExecStart"][0].startswith(INSTALLED_BINARY) and d["ExecStart"][0].endswith(" run")
    assert d["EnvironmentFile"] == ["-/etc/hpo-sync/env"]
    for key in (
        "DynamicUser",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateUsers",
        "NoNewPrivileges",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert d.get(key) == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["UMask"] == ["0077"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in d["SystemCallFilter"]
    assert d["SystemCallArchitectures"] == ["native"]


def test_default_paths_match_the_unit() -> None:
    from hpo_sync.config import DEFAULT_CONFIG_PATH, StoreConfig

    assert str(DEFAULT_CONFIG_PATH) == "/etc/hpo-sync/config.toml"  # ConfigurationDirectory
    assert str(StoreConfig().path).startswith("/var/lib/hpo-sync/")  # StateDirectory


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = local_copy(tmp_path)
    proc = subprocess.run(
        [str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    # Some versions exit 0 and still name problems (unknown keys, bad values) of the file.
    problems = [line for line in proc.stderr.splitlines() if str(unit) in line]
    assert not problems, proc.stderr


@needs_analyze
def test_systemd_analyze_security_rates_it_ok(tmp_path: Path) -> None:
    unit = local_copy(tmp_path)
    proc = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    exposure, rating = float(m.group(1)), m.group(2)
    assert exposure <= MAX_EXPOSURE and rating in ("PERFECT", "SAFE", "OK"), m.group(0)
