"""The `recsys` console script: every job in jobs/ is a stage with its own --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "recsys"
# The jobs that exist, read from the folder itself: a stage list that drifts from it fails here.
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("_"))
COMMANDS = {"script": [str(SCRIPT)], "module": [sys.executable, "-m", "recsys.cli"]}


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_jobs_folder_has_the_documented_stages() -> None:
    assert set(JOBS) >= {"prepare", "train", "evaluate", "index", "deploy", "pipeline", "demo"}
    assert SCRIPT.exists(), f"console script not installed at {SCRIPT} (pip install -e .)"


@pytest.mark.parametrize("how", COMMANDS)
@pytest.mark.parametrize("stage", JOBS)
def test_every_stage_has_help(stage: str, how: str) -> None:
    r = _run([*COMMANDS[how], stage, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: recsys {stage} "), r.stdout[:200]
    assert "--config" in r.stdout and "section.key=value" in r.stdout
    assert f"jobs.{stage}" in r.stdout, "the help shows how the job is launched"


@pytest.mark.parametrize("how", COMMANDS)
@pytest.mark.parametrize("args", [[], ["build_index"], ["no-such-stage"]], ids=["bare", "build_index", "unknown"])
def test_bare_or_unknown_stage_prints_the_real_stages(args: list[str], how: str) -> None:
    r = _run([*COMMANDS[how], *args])
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert "usage: recsys" in out
    listed = out.split("{", 1)[1].split("}", 1)[0].split(",")
    assert sorted(listed) == JOBS, listed
    if args:
        assert f"unknown stage {args[0]!r}" in out


def test_top_level_help_exits_zero() -> None:
    r = _run([str(SCRIPT), "--help"])
    assert r.returncode == 0 and "usage: recsys" in r.stdout and "index" in r.stdout


def test_config_error_exits_2_naming_the_key() -> None:
    r = _run([str(SCRIPT), "train", "--config", "jobs/configs/train_tiny.yaml", "train.precision=bf-16"])
    assert r.returncode == 2
    assert "recsys train: error:" in r.stderr and "train.precision" in r.stderr and "Traceback" not in r.stderr
