"""The set-up: `make test` and `make run` install the system packages they need, or name the command that does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


def fake_system(folder: Path, uid: int, passwordless_sudo: bool) -> dict[str, str]:
    """A PATH whose `id`, `sudo` and `apt-get` act as on a machine of this user; apt-get logs its arguments."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scripts = {"id": f"echo {uid}", "sudo": '[ "$1" = -n ] && shift; exec "$@"' if passwordless_sudo else "exit 1",
               "apt-get": f'echo "$@" >> {folder / "apt.log"}'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "ONECARD_AIO_HEADER": str(folder / "no-libaio.h")}


@pytest.mark.parametrize(("uid", "passwordless_sudo", "installs"), [(0, False, True), (1000, True, True),
                                                                     (1000, False, False)])
def test_missing_libaio_is_installed_when_the_user_may(tmp_path: Path, uid: int, passwordless_sudo: bool,
                                                       installs: bool) -> None:
    env = fake_system(tmp_path, uid, passwordless_sudo)
    result = subprocess.run(["sh", "launch/system_deps.sh", sys.executable], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    log = tmp_path / "apt.log"
    if installs:
        assert result.returncode == 0, result.stderr
        assert "install -y -q libaio-dev" in log.read_text()
    else:  # one clear message with the command, and nothing attempted
        assert result.returncode == 1 and not log.exists()
        assert "sudo apt-get install -y libaio-dev" in result.stderr


def test_a_libaio_outside_the_system_folders_is_found_where_the_compiler_looks(tmp_path: Path) -> None:
    """A libaio unpacked without root (the GPU host's): its header in a folder that CPATH names, as DeepSpeed's
    async_io build will find it. Nothing is installed; without CPATH it is missing."""
    env = fake_system(tmp_path, 0, False)
    env["ONECARD_AIO_HEADER"] = "onecard-test-libaio.h"
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "onecard-test-libaio.h").write_text("")
    command = ["sh", "launch/system_deps.sh", sys.executable]
    found = subprocess.run(command, cwd=REPO, env={**env, "CPATH": str(tmp_path / "include")}, capture_output=True,
                           text=True, timeout=60)
    assert found.returncode == 0 and not (tmp_path / "apt.log").exists(), found.stderr
    subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "install -y -q libaio-dev" in (tmp_path / "apt.log").read_text()


def test_nothing_is_installed_when_nothing_is_missing(tmp_path: Path) -> None:
    env = fake_system(tmp_path, 0, False)
    env["ONECARD_AIO_HEADER"] = str(tmp_path / "libaio.h")
    (tmp_path / "libaio.h").write_text("")
    result = subprocess.run(["sh", "launch/system_deps.sh", sys.executable], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and not (tmp_path / "apt.log").exists()


def test_make_test_and_ci_take_the_same_set_up_step() -> None:
    planned = subprocess.run(["make", "-n", "test", "VIRTUAL_ENV=" + sys.prefix], cwd=REPO, capture_output=True,
                             text=True, timeout=60).stdout
    assert "sh launch/system_deps.sh" in planned
    assert "apt-get" not in (REPO / ".ci" / "run").read_text()  # CI has no set-up of its own: `make test` is it


@pytest.mark.parametrize("uv_works", [True, False])
def test_the_packages_go_through_uv_and_through_pip_where_uv_fails(tmp_path: Path, uv_works: bool) -> None:
    """The Makefile's install recipe in an environment whose python and uv only log what they are asked."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    for name, status in (("python", 0), ("uv", 0 if uv_works else 1)):
        (venv / "bin" / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit {status}\n')
        (venv / "bin" / name).chmod(0o755)
    result = subprocess.run(["make", f"VIRTUAL_ENV={venv}", str(venv / ".onecard-packages")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    python = str(venv / "bin" / "python")
    assert "python -m pip install -q uv>=0.5,<1" in calls  # torch counts as installed: "import torch" answered 0
    assert f"uv pip install --python {python} --compile-bytecode -e ." in calls
    assert ("python -m pip install -e ." in calls) == (not uv_works)
    assert (venv / ".onecard-packages").exists()
