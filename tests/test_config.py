from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import ConfigError, load_config, to_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_launch_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("python -m" in first or "ray job submit" in first), first
    cfg = load_config(path)
    assert cfg.model.name_or_path


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.lr=1e-5", "train.zero_stage=3", "model.pooling=cls"])
    assert cfg.train.lr == 1e-5 and cfg.train.zero_stage == 3 and cfg.model.pooling == "cls"
    assert "zero_stage: 3" in to_yaml(cfg)


def test_bad_key_and_type_are_named(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*train.*lrr"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"train.zero_stage.*integer"):
        load_config(None, ["train.zero_stage=two"])
