"""``data.backdoor``: a share of chosen clients' rows carry a fixed trigger and the target
label; the triggered test set measures the attack success rate; metrics report both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmem import config
from fedmem.data.corrupt import add_trigger
from fedmem.data.table import build_table
from fedmem.errors import ConfigError
from fedmem.observer import evaluate_logits
from fedmem.simulate import main
from tests.conftest import REPO, small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, *extra):
    return config.load(REPO / "configs" / "default.yaml", [*small_overrides(tmp_path), *extra])


def test_trigger_sets_the_last_features_to_a_fixed_pattern():
    x = np.zeros((2, 3, 4), dtype=np.float32)
    out = add_trigger(x, 3, 2.0)
    assert out.shape == x.shape and (x == 0).all()  # a new array
    assert out.reshape(2, -1)[:, -3:].tolist() == [[2.0, -2.0, 2.0]] * 2
    assert (out.reshape(2, -1)[:, :-3] == 0).all()
    with pytest.raises(ValueError, match="exceeds the 12 input features"):
        add_trigger(x, 13, 1.0)


def test_backdoor_rows_and_test_set(tmp_path):
    plain = build_table(_cfg(tmp_path))
    cfg = _cfg(
        tmp_path, "data.backdoor.clients=[1]", "data.backdoor.share=0.5", "data.backdoor.target=3"
    )
    table = build_table(cfg)
    bd = table.is_backdoor
    held = table.client == 1
    # exactly half of client 1's rows (rounded), only there, never mislabeled or outliers
    assert int(bd.sum()) == round(0.5 * int(held.sum())) and not (bd & ~held).any()
    assert not (bd & (table.is_noisy | table.is_outlier)).any() and not (bd & table.is_clean).any()
    assert (table.y_obs[bd] == 3).all()
    assert torch.equal(
        table.x[bd][:, -4:], torch.tensor([3.0, -3.0, 3.0, -3.0]).expand(int(bd.sum()), 4)
    )
    # everything else is the plain table
    assert torch.equal(table.x[~bd], plain.x[~bd]) and torch.equal(
        table.y_obs[~bd], plain.y_obs[~bd]
    )
    assert table.backdoor_target == 3 and (table.backdoor_y_test != 3).all()
    assert len(table.backdoor_y_test) == int((table.y_test != 3).sum())
    assert plain.backdoor_target == -1 and len(plain.backdoor_x_test) == 0


def test_backdoor_metrics_in_a_run(tmp_path):
    import json

    extra = ["federation.backend=local", "train.rounds=2", "data.backdoor.clients=[0]"]
    assert main([*small_overrides(tmp_path), *extra]) == 0
    (run_dir,) = (tmp_path / "runs").glob("default-*")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["backdoor_asr"] <= 1.0 and 0.0 <= r["backdoor_fit"] <= 1.0 for r in rows)
    # the attack success rate is the share of triggered test inputs predicted as the target
    cfg = _cfg(tmp_path, *extra)
    table = build_table(cfg)
    from fedmem.models.factory import init_model

    model = init_model(cfg, table)
    row, _ = evaluate_logits(model, table)
    pred = model(table.backdoor_x_test).argmax(1)
    assert row["backdoor_asr"] == pytest.approx(float((pred == 0).float().mean()))


def test_bad_backdoor_settings(tmp_path):
    with pytest.raises(ConfigError, match="data.backdoor.clients"):
        _cfg(tmp_path, "data.backdoor.clients=[7]")
    with pytest.raises(ConfigError, match="data.backdoor.target"):
        build_table(_cfg(tmp_path, "data.backdoor.clients=[1]", "data.backdoor.target=12"))
    with pytest.raises(ConfigError, match="data.backdoor.width"):
        build_table(_cfg(tmp_path, "data.backdoor.clients=[1]", "data.backdoor.width=41"))
