"""Bad config input, as a new user would type it: booleans and non-finite numbers where numbers
are wanted, duplicate YAML keys, unreadable config files, GPUs this machine does not have.

Each must end in one line naming the key (or file) and the fix, exit code 2, no traceback and
no run directory (issue 11, "Bad input and failures").
"""

from __future__ import annotations

import pytest
import torch

from fedmem import config
from fedmem.config import ConfigError, load
from fedmem.models.factory import resolve_device
from fedmem.runs import devices
from fedmem.simulate import main
from tests.conftest import REPO, simulate_cli, small_overrides

DEFAULT = REPO / "configs" / "default.yaml"


def cli_error(capsys, args: list[str]) -> str:
    """Run the CLI in this process; assert exit 2 and one stderr line; return that line."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. booleans are not numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.rounds=true", "train.rounds"),
        ("train.lr=false", "train.lr"),
        ("seed=yes", "seed"),
        ("train.momentum=on", "train.momentum"),
        ("federation.client_resources.num_gpus=true", "federation.client_resources.num_gpus"),
        ("data.canaries.repeats=[2, true]", "data.canaries.repeats"),
        ("data.noise.client_rates={0: true}", "data.noise.client_rates"),
        ("checkpoints.rounds=[1, false]", "checkpoints.rounds"),
    ],
)
def test_booleans_are_not_numbers(override, key):
    with pytest.raises(ConfigError) as exc:
        load(DEFAULT, [override])
    msg = str(exc.value)
    assert msg.startswith(key + ":") and "boolean" in msg, msg


def test_booleans_in_a_yaml_file_are_not_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  rounds: true\n")
    with pytest.raises(ConfigError, match=r"^train\.rounds: .*boolean"):
        load(path)


def test_legitimate_coercions_are_kept():
    cfg = load(DEFAULT, ["train.lr=1", "federation.strategy_args={eta: 1, flag: true}"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.federation.strategy_args == {"eta": 1, "flag": True}
    assert load(DEFAULT, ["federation.enabled=false"]).federation.enabled is False
    assert load(DEFAULT, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)  # YAML: a string


def test_cli_train_rounds_true_exits_2_and_writes_nothing(tmp_path, capsys):
    line = cli_error(capsys, [*small_overrides(tmp_path), "train.rounds=true"])
    assert line.startswith("error: train.rounds:")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# 2. non-finite numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=.inf", "train.lr"),
        ("train.weight_decay=.nan", "train.weight_decay"),
        ("train.rounds=.inf", "train.rounds"),
        ("privacy.target_epsilon=.inf", "privacy.target_epsilon"),
        ("privacy.delta=.nan", "privacy.delta"),
        ("partition.alpha=-.inf", "partition.alpha"),
        ("data.noise.client_rates={0: .nan}", "data.noise.client_rates.0"),
        ("federation.strategy_args={eta: .inf}", "federation.strategy_args.eta"),
        ("train.lr=inf", "train.lr"),  # a string pydantic would read as infinity
    ],
)
def test_non_finite_numbers_are_refused(override, key):
    with pytest.raises(ConfigError) as exc:
        load(DEFAULT, [override])
    msg = str(exc.value)
    assert msg.startswith(key + ":") and "finite" in msg, msg


# ---------------------------------------------------------------------------------------------
# 3. duplicate keys
# ---------------------------------------------------------------------------------------------
def test_duplicate_key_in_a_file_names_file_key_and_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  rounds: 3\n  lr: 0.2\n")
    line = cli_error(capsys, ["--config", str(path), "--out", str(tmp_path / "runs")])
    assert str(path) in line and "duplicate key train.lr" in line, line
    assert "line 4" in line and "line 2" in line, line
    assert not (tmp_path / "runs").exists()


def test_duplicate_section_and_override_value(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train: {lr: 0.1}\nseed: 1\ntrain: {rounds: 3}\n")
    with pytest.raises(ConfigError, match="duplicate key train "):
        load(path)
    with pytest.raises(ConfigError, match=r"^data\.noise\.client_rates: .*client_rates\.0 twice"):
        load(DEFAULT, ["data.noise.client_rates={0: 0.1, 0: 0.2}"])


def test_yaml_merge_keys_may_override(tmp_path):
    """``<<:`` merges a mapping whose keys the section then overrides: not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {lr: 0.1, rounds: 3}\n  lr: 0.2\n")
    cfg = load(path)
    assert cfg.train.lr == 0.2 and cfg.train.rounds == 3


# ---------------------------------------------------------------------------------------------
# 4. config files that cannot be read as a config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (b"train:\n  lr: 0.1 \xff\xfe\n", "not UTF-8"),
        (b"- train\n- model\n", "must hold a mapping"),
        (b"just a sentence\n", "must hold a mapping"),
        (b"train: {lr: 0.1\n", "not valid YAML"),
        (b"train:\n  lr: 0.1\n rounds: 3\n", "line 3"),
        (b"train: \x00\n", "not valid YAML"),
    ],
)
def test_unreadable_config_files(tmp_path, capsys, content, hint):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    line = cli_error(capsys, ["--config", str(path), "--out", str(tmp_path / "runs")])
    assert line.startswith(f"error: --config: {path}") and hint in line, line
    assert not (tmp_path / "runs").exists()


def test_missing_file_and_directory_as_config(tmp_path, capsys):
    line = cli_error(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert "does not exist" in line
    line = cli_error(capsys, ["--config", str(tmp_path)])
    assert "is a directory" in line


def test_empty_config_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert config.to_dict(load(path)) == config.to_dict(load(None))


# ---------------------------------------------------------------------------------------------
# 5. devices this machine does not have
# ---------------------------------------------------------------------------------------------
def no_gpu(monkeypatch, count: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cuda_without_gpu_is_refused(monkeypatch):
    no_gpu(monkeypatch)
    with pytest.raises(ConfigError, match=r"^train\.device: .*train\.device=cpu"):
        devices.check_devices(load(DEFAULT, ["train.device=cuda"]))
    devices.check_devices(load(DEFAULT, ["train.device=auto"]))  # auto falls back to cpu
    with pytest.raises(ConfigError, match=r"^train\.device: "):  # other entry points (audit)
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    no_gpu(monkeypatch, 1)
    devices.check_devices(load(DEFAULT, ["train.device=cuda"]))


@pytest.mark.parametrize(
    ("gpus", "extra", "refused"),
    [
        (0, [], True),
        (0, ["federation.backend=local"], False),  # local clients fall back to train.device
        (0, ["federation.enabled=false"], False),
        (0, ["federation.ray_address=auto"], False),  # the cluster's GPUs may be elsewhere
        (1, [], False),
        (1, ["federation.client_resources.num_gpus=2"], True),
        (2, ["federation.client_resources.num_gpus=2"], False),
    ],
)
def test_client_gpus_checked_against_this_machine(monkeypatch, gpus, extra, refused):
    no_gpu(monkeypatch, gpus)
    cfg = load(DEFAULT, ["federation.client_resources.num_gpus=0.5", *extra])
    if refused:
        with pytest.raises(ConfigError, match=r"^federation\.client_resources\.num_gpus: "):
            devices.check_devices(cfg)
    else:
        devices.check_devices(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.device=cuda", "train.device"),
        ("federation.client_resources.num_gpus=1", "federation.client_resources.num_gpus"),
    ],
)
def test_cli_refuses_missing_gpus_before_any_work(tmp_path, capsys, monkeypatch, override, key):
    no_gpu(monkeypatch)
    line = cli_error(capsys, [*small_overrides(tmp_path), override])
    assert line.startswith(f"error: {key}:"), line
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no run directory


def test_subprocess_duplicate_key_exits_2(tmp_path):
    """The real CLI in a fresh interpreter: exit 2, one line, no traceback."""
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    proc = simulate_cli("--config", str(path), "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "duplicate key seed" in lines[0], proc.stderr
    assert not any(tmp_path.glob("*/"))
