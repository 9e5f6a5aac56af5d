"""Per-layer gradient geometry (Maini et al. 2023) and the federated update cosine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmem.analysis.gradients import (
    cosine,
    fold_gradients,
    gradient_geometry,
    layer_groups,
    mean_gradient_norms,
    split_clients,
    summed_gradients,
    update_cosine,
)
from fedmem.config import ModelConfig
from fedmem.models import MLP, build_model


def _mlp(seed: int = 0, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(6, 8, 2, 3)
    if dropout:
        model.net.insert(2, nn.Dropout(0.5))
    return model


def _data(n: int = 37, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_layer_groups_definition_order():
    assert layer_groups(_mlp()) == {
        "net.1": ["net.1.weight", "net.1.bias"],
        "net.3": ["net.3.weight", "net.3.bias"],
        "net.5": ["net.5.weight", "net.5.bias"],
    }
    torch.manual_seed(0)
    resnet = build_model(ModelConfig(name="resnet9", channels=4), (3, 8, 8), 10)
    groups = layer_groups(resnet)
    assert sum(len(v) for v in groups.values()) == len(list(resnet.parameters()))
    assert next(iter(groups)) == "net.0.0" and list(groups)[-1] == "net.8"
    assert groups["net.0.1"] == ["net.0.1.weight", "net.0.1.bias"]  # BatchNorm affine


def test_layer_groups_root_parameter():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(()))
            self.lin = nn.Linear(2, 2)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

    assert layer_groups(Scale()) == {"alpha": ["alpha"], "lin": ["lin.weight", "lin.bias"]}


@pytest.mark.parametrize("batch_size", [1, 5, 37, 1000])
def test_summed_gradients_match_brute_force(batch_size):
    model = _mlp(dropout=True)
    model.train()
    x, y = _data()
    # brute force: one autograd call per example, model in eval mode (dropout off)
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad
    model.zero_grad(set_to_none=True)
    model.train()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = summed_gradients(model, x, y, batch_size)
    assert list(got) == list(expected)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-5, rtol=1e-5), n
    # parameters, .grad and mode untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None
    assert model.training


def test_summed_gradients_keep_existing_grad():
    model = _mlp()
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    summed_gradients(model, x, y, 8)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


def _per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Brute force: ``{group: [n, P]}`` per-example gradients (one autograd call each)."""
    model.eval()
    groups = layer_groups(model)
    rows: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
    params = dict(model.named_parameters())
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1].long(), reduction="sum")
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        for g, names in groups.items():
            rows[g].append(torch.cat([grads[n].flatten() for n in names]).double())
    return {g: torch.stack(r) for g, r in rows.items()}


def _u_statistic(g: torch.Tensor) -> float:
    """mean over ordered pairs i != j of <g_i, g_j>: unbiased for |E g|^2."""
    n = len(g)
    return (float(g.sum(0).pow(2).sum()) - float(g.pow(2).sum())) / (n * (n - 1))


def test_geometry_identical_sets():
    model = _mlp()
    x, y = _data(20)
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    is_noisy = torch.arange(40) >= 20
    geo = gradient_geometry(model, xx, yy, is_noisy, batch_size=7)
    assert list(geo) == ["net.1", "net.3", "net.5"]
    for g in geo.values():
        assert g["cos"] == pytest.approx(1.0, abs=1e-6)
        assert g["norm_of_mean_clean"] == pytest.approx(g["norm_of_mean_noisy"], rel=1e-5)
        assert g["num_clean"] == 20 and g["num_noisy"] == 20
    assert geo["net.1"]["num_params"] == 6 * 8 + 8
    assert geo["net.5"]["num_params"] == 8 * 3 + 3
    # one example per fold: the norm is sqrt(U) / sqrt(#params), U over all pairs of examples
    geo = gradient_geometry(model, xx, yy, is_noisy, batch_size=7, folds=20)
    u = _u_statistic(_per_example(model, x, y)["net.5"])
    assert u > 0
    assert geo["net.5"]["norm_of_mean_clean"] == pytest.approx(math.sqrt(u / 27), rel=1e-5)


def test_fold_gradients_sum_and_fold_squares():
    model = _mlp()
    x, y = _data(23)
    total, fold_sq, sizes = fold_gradients(model, x, y, folds=4, batch_size=5)
    assert sorted(sizes) == [5, 6, 6, 6]
    ref = summed_gradients(model, x, y)
    for n in ref:
        assert torch.allclose(total[n].float(), ref[n], atol=1e-5)
    # with one example per fold, sum_k |S_k|^2 is sum_i |g_i|^2
    _, per_ex_sq, sizes = fold_gradients(model, x, y, folds=100)
    assert sizes == [1] * 23
    per = _per_example(model, x, y)
    got = sum(per_ex_sq[n] for n in layer_groups(model)["net.3"])
    assert got == pytest.approx(float(per["net.3"].pow(2).sum()), rel=1e-5)
    with pytest.raises(ValueError):
        fold_gradients(model, x, y, folds=1)


@pytest.mark.usefixtures("one_thread")
def test_mean_gradient_norm_is_unbiased_whatever_the_sample_size():
    """The expectation of the estimate over random subsamples is the population's |E g|^2, at
    any subsample size (the cap), while the plain |sample mean|^2 is biased by tr(Cov) / n."""
    torch.manual_seed(0)
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g) + 0.5
    # mostly class 0: a mean gradient comparable to the per-example spread, so a bias shows
    y = torch.where(torch.rand(300, generator=g) < 0.6, 0, torch.randint(0, 3, (300,), generator=g))
    groups = layer_groups(model)
    per = _per_example(model, x, y)
    # sampling without replacement from these 300: E[<g_i, g_j>], i != j, is exactly the
    # population's U-statistic
    target = {g: _u_statistic(per[g]) for g in groups}
    rng = torch.Generator().manual_seed(5)
    reps, n = 1000, 8
    est: dict[str, list[float]] = {g: [] for g in groups}
    plain: dict[str, list[float]] = {g: [] for g in groups}
    for _ in range(reps):
        idx = torch.randperm(300, generator=rng)[:n]
        total, fold_sq, sizes = fold_gradients(model, x[idx], y[idx], folds=4)
        for g, u in mean_gradient_norms(total, fold_sq, sizes, groups).items():
            est[g].append(u)
            plain[g].append(float(per[g][idx].mean(0).pow(2).sum()))
    for g in groups:
        e, p = torch.tensor(est[g]), torch.tensor(plain[g])
        # 4 standard errors of the mean over `reps` independent subsamples: a false failure
        # has probability < 1e-4 per group (CLT); the draws are seeded, so the test is fixed
        se = float(e.std()) / math.sqrt(reps)
        assert abs(float(e.mean()) - target[g]) < 4 * se, g
        # the old estimate (norm of a sum or of a plain mean) fails this bound
        assert float(p.mean()) - target[g] > 4 * float(p.std()) / math.sqrt(reps), g


def test_geometry_norms_do_not_depend_on_group_size():
    """Two groups of 40 and 2000 examples from the same distribution: comparable norms
    (under the old summed gradients the ratio was 40 / 2000)."""
    torch.manual_seed(0)
    model = _mlp()
    g = torch.Generator().manual_seed(7)
    x = 0.3 * torch.randn(2040, 6, generator=g) + 1.0
    y = torch.zeros(2040, dtype=torch.long)  # a shared label: a mean gradient well above noise
    is_noisy = torch.arange(2040) < 40
    geo = gradient_geometry(model, x, y, is_noisy)
    per = _per_example(model, x, y)
    for group, row in geo.items():
        # tolerance from the population: with r = tr(Cov) / |E g|^2, the estimate u of |E g|^2
        # from n examples has relative standard error <= sqrt(4 r / n + 2 r^2 / n^2), and its
        # square root half of that; 4 standard errors of the n = 40 side (the 2000 side adds
        # little), capped well below the old ratio's distance from 1
        mean = per[group].mean(0)
        r = float((per[group] - mean).pow(2).sum(1).mean()) / float(mean.pow(2).sum())
        tol = 4 * 0.5 * math.sqrt(4 * r / 40 + 2 * r * r / 40**2)
        assert tol < 0.5, (group, r)
        ratio = row["norm_of_mean_noisy"] / row["norm_of_mean_clean"]
        assert abs(ratio - 1) < tol, (group, ratio, tol)
        assert row["cos"] > 0.9  # same distribution: the same direction


def test_geometry_opposite_labels_cosine_minus_one():
    # Linear model at zero: softmax is uniform, dCE/dz = p - onehot(y) = [-.5, .5] for y=0 and
    # [.5, -.5] for y=1 on the same inputs: the two summed gradients are exactly opposite.
    model = nn.Sequential(nn.Linear(4, 2))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    xx = torch.cat([x, x])
    yy = torch.cat([torch.zeros(10), torch.ones(10)]).long()
    is_noisy = torch.arange(20) >= 10
    geo = gradient_geometry(model, xx, yy, is_noisy)
    assert geo["0"]["cos"] == pytest.approx(-1.0, abs=1e-6)
    assert geo["0"]["norm_of_mean_clean"] == pytest.approx(geo["0"]["norm_of_mean_noisy"], 1e-6)
    assert geo["0"]["norm_of_mean_clean"] > 0


def test_geometry_without_noisy_examples():
    model = _mlp()
    x, y = _data(10)
    geo = gradient_geometry(model, x, y, torch.zeros(10, dtype=torch.bool))
    for g in geo.values():
        assert g["cos"] is None and g["norm_of_mean_noisy"] is None
        assert g["norm_of_mean_clean"] is not None and g["num_noisy"] == 0
    # one example: no pair, no estimate of the mean's norm
    geo = gradient_geometry(model, x, y, torch.arange(10) == 3)
    assert all(g["norm_of_mean_noisy"] is None and g["cos"] is not None for g in geo.values())


def test_geometry_is_clean_mask():
    model = _mlp()
    x, y = _data(30)
    is_noisy = torch.arange(30) < 10
    is_clean = torch.arange(30) >= 20  # 10..19 are e.g. outliers: in neither set
    geo = gradient_geometry(model, x, y, is_noisy, is_clean=is_clean)
    ref = gradient_geometry(
        model, torch.cat([x[20:], x[:10]]), torch.cat([y[20:], y[:10]]), torch.arange(20) >= 10
    )
    for k in geo:
        assert geo[k]["cos"] == pytest.approx(ref[k]["cos"], abs=1e-6)
        assert geo[k]["num_clean"] == 10


def _update(seed: int) -> dict[str, torch.Tensor]:
    model = _mlp(seed)
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_update_cosine():
    groups = layer_groups(_mlp())
    u, v = _update(1), _update(2)
    same = update_cosine([u], [u], groups)
    assert all(c == pytest.approx(1.0, abs=1e-9) for c in same.values())
    neg = {n: -t for n, t in u.items()}
    opposite = update_cosine([u], [neg], groups)
    assert all(c == pytest.approx(-1.0, abs=1e-9) for c in opposite.values())
    # the mean of a and -a is zero: undefined cosine -> None
    assert all(c is None for c in update_cosine([u, neg], [v], groups).values())
    assert update_cosine([], [u], groups) == {g: None for g in groups}
    assert update_cosine([u], [], groups) == {g: None for g in groups}
    # mean over clients: mean(u, v) vs mean(u, v) scaled by 3 -> 1
    scaled = [{n: 3 * t for n, t in w.items()} for w in (u, v)]
    assert all(c == pytest.approx(1.0) for c in update_cosine([u, v], scaled, groups).values())
    # the mean update, not the mean cosine: a = [u, v], b = [u + v] -> cos 1
    both = {n: u[n] + v[n] for n in u}
    assert all(c == pytest.approx(1.0) for c in update_cosine([u, v], [both], groups).values())


def test_split_clients():
    # clean clients exist: mislabeled vs clean
    s = split_clients({0: 0.0, 1: 0.3, 2: 0.0, 3: 0.1})
    assert (s.split, s.threshold, s.noisier, s.cleaner) == (
        "mislabeled_vs_clean",
        0.0,
        [1, 3],
        [0, 2],
    )
    rec = s.record()
    assert rec["noisier_clients"] == 2 and rec["cleaner_clients"] == 2
    assert rec["noisier_mean_share"] == pytest.approx(0.2) and rec["cleaner_mean_share"] == 0.0
    # noise everywhere: above vs at or below the median share
    s = split_clients({5: 0.40, 1: 0.35, 2: 0.45, 7: 0.38})
    assert s.split == "noisy_share_above_median"
    assert s.threshold == pytest.approx(0.39)
    assert (s.noisier, s.cleaner) == ([2, 5], [1, 7])
    s = split_clients({0: 0.2, 1: 0.1, 2: 0.3})  # odd: the median client is in the cleaner half
    assert (s.threshold, s.noisier, s.cleaner) == (0.2, [2], [0, 1])
    # equal shares (or none): the noisier group is empty, the cosine undefined
    s = split_clients({0: 0.2, 1: 0.2})
    assert s.noisier == [] and s.cleaner == [0, 1] and s.record()["noisier_mean_share"] is None
    assert split_clients({}).record()["cleaner_clients"] == 0


def _mean_delta(delta: dict, clients: list[int], names: list[str]) -> torch.Tensor:
    """The mean over ``clients`` of their updates, flattened over ``names``."""
    return torch.stack([torch.cat([delta[c][n].flatten() for n in names]) for c in clients]).mean(0)


class _Updates:
    """Stands in for the server's UpdateLog: keeps every round's start weights and clients."""

    def __init__(self):
        self.rounds: dict[int, tuple[dict, dict]] = {}

    def save(self, round_: int, start: dict, clients: dict) -> None:
        self.rounds[round_] = ({k: v.clone() for k, v in start.items()}, clients)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "noise, split",
    [
        ([], "noisy_share_above_median"),  # 20% symmetric noise: every client holds some
        (["data.noise.client_rates={1: 0.4, 2: 0.2}"], "mislabeled_vs_clean"),
    ],
)
def test_federated_update_cosine_on_every_round(tmp_path, noise, split):
    from fedmem import config
    from fedmem.federation.engine import run_federated
    from strategies.sampling import sample_partitions
    from tests.conftest import REPO, federated_job, small_overrides

    cfg = config.load(
        REPO / "configs" / "default.yaml",
        [
            *small_overrides(tmp_path),
            "federation.backend=local",
            "federation.fraction_train=0.75",
            "train.rounds=2",
            "analysis.gradients.enabled=false",
            *noise,
        ],
    )
    job, _, _ = federated_job(cfg)
    grads: list[dict] = []
    job.gradient_sink = grads.append
    job.updates = _Updates()  # type: ignore[assignment]
    run_federated(job)

    table = job.table
    fed = cfg.federation
    for r in (1, 2):
        sampled = sample_partitions(cfg.seed, r, fed.num_clients, 0.75, fed.min_train_clients)
        assert len(sampled) == 3
        # the split, recomputed from the table: shares, threshold, groups
        share = {p: float(table.is_noisy[table.client_rows(p)].float().mean()) for p in sampled}
        if split == "mislabeled_vs_clean":
            assert min(share.values()) == 0.0 < max(share.values())
            noisier = [p for p in sampled if share[p] > 0]
        else:
            assert min(share.values()) > 0.0
            noisier = [max(sampled, key=share.get)]  # above the median of three
        cleaner = [p for p in sampled if p not in noisier]
        # the cosine of the mean updates, from the clients' models
        start, clients = job.updates.rounds[r]
        delta = {p: {k: clients[p][k].double() - start[k].double() for k in start} for p in sampled}
        rows = [g for g in grads if g["round"] == r]
        assert [g["layer"] for g in rows] == ["net.1", "net.3", "net.5"]
        for g in rows:
            assert g["split"] == split
            assert g["noisier_clients"] + g["cleaner_clients"] == len(sampled)
            assert g["noisier_clients"] == len(noisier)
            assert g["noisier_mean_share"] == pytest.approx(
                sum(share[p] for p in noisier) / len(noisier), abs=1e-6
            )
            assert g["cleaner_mean_share"] == pytest.approx(
                sum(share[p] for p in cleaner) / len(cleaner), abs=1e-6
            )
            names = [f"{g['layer']}.weight", f"{g['layer']}.bias"]
            a, b = (_mean_delta(delta, ps, names) for ps in (noisier, cleaner))
            expected = float(a @ b / (a.norm() * b.norm()))
            assert g["cos"] is not None
            assert g["cos"] == pytest.approx(expected, abs=1e-5)


def test_cosine_does_not_depend_on_torch_threads():
    """torch's float64 dot product groups its partial sums by thread count (the same vectors
    gave 1-ulp different results with one and two threads); the cosine must not."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(65792, generator=g, dtype=torch.float64) for _ in range(2))
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(cosine(a, b))
            assert torch.get_num_threads() == threads  # restored
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1]
    assert math.isclose(got[0], float(a @ b) / float(a.norm() * b.norm()), rel_tol=1e-12)
    assert cosine(a, torch.zeros_like(a)) is None
