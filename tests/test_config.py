from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from recsys.config import (
    Config,
    ConfigError,
    ServeConfig,
    StorageConfig,
    config_from_dict,
    load_config,
    to_dict,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_launch_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("python -m" in first or "ray job submit" in first), first
    cfg = load_config(path)
    assert cfg.model.name_or_path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_to_dict_is_plain_and_round_trips(path: Path) -> None:
    """Ray workers get the config as a dict: it must be plain data and come back equal."""
    cfg = load_config(path, ["data.events_uri=[a/x.parquet, s3://b/*.jsonl]"])
    d = to_dict(cfg)
    assert json.loads(json.dumps(d)) == d and yaml.safe_load(to_yaml(cfg)) == d
    back = config_from_dict(d)
    assert back == cfg and to_dict(back) == d
    assert isinstance(back.data.events_uri, list) and back.data.events_uri[1] == "s3://b/*.jsonl"


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.lr=1e-5", "train.zero_stage=3", "model.pooling=cls", "eval.ks=[1,5]",
                             "train.worker_resources={train: 1}", "train.use_gpu=true"])
    assert cfg.train.lr == 1e-5 and cfg.train.zero_stage == 3 and cfg.model.pooling == "cls"
    assert cfg.eval.ks == [1, 5] and cfg.train.worker_resources == {"train": 1.0} and cfg.train.use_gpu is True
    assert "zero_stage: 3" in to_yaml(cfg)


def test_text_overrides_are_taken_verbatim() -> None:
    """`model.query_prefix=query: ` used to be YAML-parsed into a mapping and rejected."""
    cfg = load_config(None, ["model.query_prefix=query: ", "model.item_prefix=passage: ", "train.run_name=1e-5",
                             "storage.s3_region=null", "train.worker_resources.train=2"])
    assert cfg.model.query_prefix == "query: " and cfg.model.item_prefix == "passage: "
    assert cfg.train.run_name == "1e-5" and cfg.storage.s3_region == "null"
    assert cfg.train.worker_resources == {"train": 2.0}


ENUM_TYPOS = [
    "train.precision=bf-16", "model.pooling=avg", "train.task=nextitem", "train.zero_stage=4",
    "train.tokenize_in=workers", "data.source=file", "data.format=json", "data.sequence_split=loo",
    "eval.index=hnsw", "eval.split=validation", "eval.systems=[bm25, zeroshot]", "data.synthetic_locale=fr",
]


@pytest.mark.parametrize("override", ENUM_TYPOS)
def test_enumerated_value_typo_is_rejected_naming_the_key(override: str, tmp_path: Path) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"override {key}=.*{key}(\[\d\])?: Input should be"):
        load_config(None, [override])
    section, name = key.split(".")
    p = tmp_path / "shop.yaml"
    p.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"shop\.yaml: {key}(\[\d\])?: Input should be"):
        load_config(p)


def test_unknown_key_names_the_nearest_valid_one(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.lrr: unknown key; did you mean train\.lr\?"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key; did you mean train\.lr\?"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"trian: unknown section; did you mean train\?"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"data\.event_weights\.purchse: unknown key; did you mean data\.event_weights\.purchase\?"):
        load_config(None, ["data.event_weights={purchse: 1}"])


@pytest.mark.parametrize(
    "override,key",
    [("train.num_workers=0", "train.num_workers"), ("train.batch_size=0", "train.batch_size"),
     ("data.valid_fraction=1.5", "data.valid_fraction"), ("eval.ks=[0, 10]", r"eval.ks\[0\]"),
     ("train.zero_stage=two", "train.zero_stage"), ("serve.port=0", "serve.port"),
     ("train.hard_negatives=20", "train: hard_negatives"), ("train.contrastive_batch=20", "train: contrastive_batch .20. .* multiple of batch_size"),
     ("train.contrastive_batch=-1", "train.contrastive_batch")],
)
def test_out_of_range_values_are_rejected(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_sections_validate_construction_and_assignment() -> None:
    cfg = Config(storage=StorageConfig(s3_endpoint="http://127.0.0.1:9000"))
    cfg.storage.s3_endpoint = "http://127.0.0.1:9001"  # what jobs.demo does
    assert cfg.storage.s3_endpoint.endswith("9001")
    with pytest.raises(ValueError, match="precision"):
        cfg.train.precision = "bf-16"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="s3_endpiont"):
        StorageConfig(s3_endpiont="x")  # type: ignore[call-arg]


def test_app_args_share_the_serve_section_and_reject_bad_values() -> None:
    from pydantic import ValidationError

    from recsys.config import ServeArgs
    from serve.app import AppArgs

    shared = set(ServeArgs.model_fields)
    assert shared <= set(AppArgs.model_fields) and shared <= set(ServeConfig.model_fields)
    for name in shared:  # one definition: same default and bounds in both
        assert repr(AppArgs.model_fields[name]) == repr(ServeConfig.model_fields[name]), name
    for bad in ({"max_batch_size": 0}, {"batch_wait_timeout_s": 5}, {"replica_cpus": 0},
                {"max_batch_sise": 8}, {"min_replicas": 3, "max_replicas": 2}):
        with pytest.raises(ValidationError):
            AppArgs(**bad)
    with pytest.raises(ConfigError, match=r"serve\.max_batch_size"):
        load_config(None, ["serve.max_batch_size=0"])


def test_saved_and_logged_configs_carry_no_credentials() -> None:
    """Issue 18: to_yaml / to_json (checkpoints, exports, the jobs' log line) redact every
    credential; to_dict (what Ray workers receive) keeps them."""
    from recsys.config import config_from_dict, redacted, to_dict, to_json, to_yaml

    cfg = load_config(None, ["storage.s3_access_key=AKID-123", "storage.s3_secret_key=very-secret-456", "serve.auth_token=tok-789"])
    for text in (to_yaml(cfg), to_json(cfg)):
        assert not any(x in text for x in ("AKID-123", "very-secret-456", "tok-789")), text
    assert redacted(cfg)["storage"]["s3_secret_key"] == "***" and redacted(cfg)["storage"]["s3_endpoint"] == ""
    assert config_from_dict(to_dict(cfg)).storage.s3_secret_key == "very-secret-456"
    assert "s3_secret_key: ''" in to_yaml(load_config(None, [])), "unset credentials stay empty, not ***"


def test_a_saved_config_with_a_removed_key_still_loads(tmp_path, caplog) -> None:
    """Checkpoints and exports written before train.crash_at_step was removed carry it (as 0)."""
    import logging

    from recsys.config import load_config

    f = tmp_path / "config.yaml"
    f.write_text("train:\n  crash_at_step: 0\n  max_steps: 7\n")
    with caplog.at_level(logging.WARNING, logger="recsys.config"):
        cfg = load_config(f)
    assert cfg.train.max_steps == 7 and "crash_at_step is no longer a setting" in caplog.text
    f.write_text("train:\n  crash_at_stepp: 0\n")
    with pytest.raises(Exception, match="crash_at_stepp"):
        load_config(f)  # any other unknown key is still an error


def test_dropout_off_with_gradient_checkpointing_is_refused() -> None:
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(None, ["train.dropout=false", "model.gradient_checkpointing=true"])
