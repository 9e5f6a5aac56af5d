"""Config loading, overrides, validation errors and hashing."""

from __future__ import annotations

import pytest

from fedmem import config
from fedmem.config import ConfigError, config_hash, load, parse_overrides
from tests.conftest import REPO


def test_presets_load():
    for name in ("default", "noise", "cifar10"):
        cfg = load(REPO / "configs" / f"{name}.yaml")
        assert cfg.output.name == name
    cfg = load(REPO / "configs" / "default.yaml")
    assert cfg.data.name == "mnist1d"
    assert cfg.federation.num_clients == 10
    assert cfg.partition.kind == "dirichlet" and cfg.partition.alpha == 0.5
    assert cfg.data.noise.rate == 0.2 and cfg.data.noise.kind == "symmetric"
    assert cfg.model.name == "mlp"


def test_overrides_are_typed_and_nested():
    cfg = load(
        REPO / "configs" / "default.yaml",
        ["train.lr=0.1", "data.noise.rate=0.4", "data.noise.client_rates={0: 0.5, 2: 0.3}"],
    )
    assert cfg.train.lr == 0.1
    assert cfg.data.noise.rate == 0.4
    assert cfg.data.noise.client_rates == {0: 0.5, 2: 0.3}
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("train.lrr=0.1", "train.lrr", "allowed here"),
        ("bogus=1", "bogus", "allowed here"),
        ("data.noise.rate=1.0", "data.noise.rate", "less than 1"),
        ("data.noise.rate=-0.1", "data.noise.rate", "greater than or equal to 0"),
        ("train.lr=-0.01", "train.lr", "greater than 0"),
        ("train.batch_size=abc", "train.batch_size", "integer"),
        ("data.canaries.count=5", "data.canaries.num_clients", "allowed: 1..10"),
        ("model.name=transformer", "model.name", "mlp"),
        ("data.noise.client_rates={12: 0.3}", "data.noise.client_rates", "0..9"),
        ("federation.min_train_clients=11", "federation.min_train_clients", "num_clients"),
        ("data.name=cifar10", "data", "data.data_dir"),
    ],
)
def test_bad_values_name_the_key(override, key, hint):
    extra = ["data.canaries.num_clients=11"] if "canaries.count" in override else []
    with pytest.raises(ConfigError) as exc:
        load(REPO / "configs" / "default.yaml", [override, *extra])
    msg = str(exc.value)
    assert msg.startswith(key + ":"), msg
    assert hint in msg, msg
    assert "\n" not in msg


def test_hash_ignores_output_but_not_seed():
    a = load(REPO / "configs" / "default.yaml")
    b = load(REPO / "configs" / "default.yaml", ["output.dir=/elsewhere", "output.name=x"])
    c = load(REPO / "configs" / "default.yaml", ["seed=1"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)


def test_help_lists_sections():
    text = config.describe_sections()
    for section in (
        "data.noise.rate",
        "partition.kind",
        "model.name",
        "train.lr",
        "federation.num_clients",
        "output.dir",
        "seed",
    ):
        assert section in text


def test_hash_covers_only_non_default_fields():
    """A new field with a default (here: a whole new section) renames no run directory."""
    from pydantic import create_model

    from fedmem.config import ExperimentConfig, PluginsConfig, non_default

    cfg = load(REPO / "configs" / "default.yaml")
    assert non_default(cfg) == {
        "data": {"noise": {"rate": 0.2}, "canaries": {"count": 10, "repeats": 4, "num_clients": 2}}
    }
    explicit = load(
        REPO / "configs" / "default.yaml", ["checkpoints.every=0", "train.lr=0.05", "seed=0"]
    )
    assert config_hash(explicit) == config_hash(cfg)  # defaults written out: same run
    assert config_hash(load(REPO / "configs" / "default.yaml", ["checkpoints.every=2"])) != (
        config_hash(cfg)
    )
    Extended = create_model(  # noqa: N806 - a config class with one more section
        "Extended", __base__=ExperimentConfig, newsection=(PluginsConfig, PluginsConfig())
    )
    extended = Extended.model_validate(cfg.model_dump())
    assert config_hash(extended) == config_hash(cfg)
