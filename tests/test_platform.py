"""What a newcomer and CI run first: the README's set-up commands, scripts/make_venv.sh, and the
platform they promise (Python >= 3.12, jax >= 0.11.2)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines()]


def test_ci_runs_the_readme_test_command_verbatim():
    test_commands = [c for c in _readme_commands() if "pytest -n auto" in c]
    assert test_commands, "README has no test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in ci


def test_readme_set_up_commands_make_the_venv_first():
    for needle in ("python train.py configs/quickstart.yaml", "pytest -n auto"):
        command = next(c for c in _readme_commands() if needle in c)
        assert command.startswith("bash scripts/make_venv.sh && . .venv/bin/activate && ")


def test_this_python_and_jax_are_the_supported_ones():
    assert sys.version_info >= (3, 12)
    major, minor, patch = (int(x) for x in jax.__version__.split(".")[:3])
    assert (major, minor, patch) >= (0, 11, 2)


@pytest.mark.slow
def test_make_venv_finds_a_new_python_keeps_a_good_venv_and_refuses_an_old_one(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "make_venv.sh", tmp_path / "scripts")
    run = lambda: subprocess.run(["bash", "scripts/make_venv.sh"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
    first = run()
    assert first.returncode == 0, first.stderr
    version = subprocess.run([str(tmp_path / ".venv/bin/python"), "-c",
                              "import sys; print(sys.version_info[:2] >= (3, 12))"],
                             capture_output=True, text=True).stdout
    assert version.strip() == "True"
    again = run()
    assert again.returncode == 0 and "using the existing .venv" in again.stdout

    # A .venv on an older Python is the user's: left in place, with an error saying what to do.
    old = tmp_path / "old"
    (old / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "make_venv.sh", old / "scripts")
    (old / ".venv/bin").mkdir(parents=True)
    fake = old / ".venv/bin/python"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.11.7'; exit 1\n")
    fake.chmod(0o755)
    refused = subprocess.run(["bash", "scripts/make_venv.sh"], cwd=old, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2
    assert "Python 3.11.7" in refused.stderr and "needs Python >= 3.12" in refused.stderr
    assert fake.exists()
