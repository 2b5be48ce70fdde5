"""The systemd units: ``systemd-analyze verify`` finds nothing to say, and ``systemd-analyze
security --offline=true`` rates each at 2.0 ("OK") or better.

``verify`` checks that ExecStart's binary exists. The units name the installed
``/usr/local/bin/tocsin``, so each is verified as a copy in tmp_path whose ExecStart is the
``tocsin`` of this venv (the only line that differs). ``make test`` installs Debian's
systemd package when ``systemd-analyze`` is missing; without it these tests fail, they do
not skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tocsin.config import DaemonConfig
from tocsin.fields import parse_duration

ROOT = Path(__file__).resolve().parents[2]
UNITS = ["tocsin.service", "tocsin@.service"]
INSTALLED = "/usr/local/bin/tocsin"
MAX_EXPOSURE = 2.0


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze is missing: `make test` installs it (Debian's systemd package),"
            " or run: apt-get install systemd"
        )
    return path


def directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def copy_for_verify(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's real ``tocsin``."""
    text = (ROOT / "systemd" / unit).read_text()
    venv_tocsin = Path(sys.executable).parent / "tocsin"
    assert venv_tocsin.exists()
    assert text.count(f"ExecStart={INSTALLED} ") == 1
    copy = tmp_path / unit
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={venv_tocsin} "))
    return copy


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze(), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("unit", UNITS)
def test_verify_has_nothing_to_say(unit: str, tmp_path: Path) -> None:
    result = run("verify", str(copy_for_verify(unit, tmp_path)))
    # verify exits 0 on many problems ("Unknown key ..., ignoring"): it must print nothing.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    copy = copy_for_verify("tocsin.service", tmp_path)
    copy.write_text(copy.read_text().replace("Restart=on-failure", "Restart=on-failur"))
    result = run("verify", str(copy))
    assert "Failed to parse service restart specifier" in result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_2(unit: str, tmp_path: Path) -> None:
    result = run("security", "--offline=true", "--no-pager", str(copy_for_verify(unit, tmp_path)))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    score = float(match.group(1))
    print(f"{unit}: exposure {score}")
    assert score <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_is_what_the_daemon_expects(unit: str) -> None:
    d = directives(unit)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["DynamicUser"] == ["yes"] and d["UMask"] == ["0077"]
    assert d["StateDirectoryMode"] == ["0700"] and d["ConfigurationDirectory"] == ["tocsin"]
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert d["ProtectSystem"] == ["strict"] and d["NoNewPrivileges"] == ["yes"]
    assert "@system-service" in d["SystemCallFilter"]
    # SIGTERM lets deliveries drain for [daemon] drain_timeout: systemd must wait longer.
    drain = DaemonConfig.model_fields["drain_timeout"].default
    assert parse_duration(d["TimeoutStopSec"][0]) >= drain + 5
    # The watchdog is pinged at half of WatchdogSec; a store probe may take busy_timeout (5s).
    assert parse_duration(d["WatchdogSec"][0]) >= 20
    instance = unit == "tocsin@.service"
    assert d["StateDirectory"] == (["tocsin/%i"] if instance else ["tocsin"])
    config = "/etc/tocsin/%i.toml" if instance else "/etc/tocsin/tocsin.toml"
    assert d["ExecStart"] == [f"{INSTALLED} run -c {config}"]
    text = (ROOT / "systemd" / unit).read_text()
    assert "#   LoadCredential=" in text and "#   LoadCredentialEncrypted=" in text
