"""ExampleTable built from a synthetic Source: exact noise / outlier / canary ground truth."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from fedmem import config
from fedmem.data.sources import Source
from fedmem.data.table import AUDIT_CANARY, AUDIT_POOL, ExampleTable, build_table
from fedmem.errors import ConfigError
from tests.conftest import REPO

N, NUM_CLASSES, SHAPE = 1000, 10, (40,)


def make_source(n: int = N, num_classes: int = NUM_CLASSES, shape=SHAPE, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n, dtype=torch.int64) % num_classes  # balanced
    y = y[torch.randperm(n, generator=g)]
    n_test = 200
    return Source(
        name="synthetic",
        x_train=torch.randn((n, *shape), generator=g),
        y_train=y,
        x_test=torch.randn((n_test, *shape), generator=g),
        y_test=torch.arange(n_test, dtype=torch.int64) % num_classes,
        num_classes=num_classes,
        input_shape=tuple(shape),
    )


SRC = make_source()


def make_cfg(*overrides: str) -> config.ExperimentConfig:
    base = [
        "federation.num_clients=5",
        "data.canaries.num_clients=2",
        "data.canaries.count=10",
        "data.canaries.repeats=4",
        "data.canaries.reference=50",
    ]
    return config.load(REPO / "configs" / "default.yaml", [*base, *overrides])


def table(*overrides: str, src: Source = SRC) -> ExampleTable:
    return build_table(make_cfg(*overrides), source=src)


def regular(t: ExampleTable) -> torch.Tensor:
    return ~t.is_canary


# ---------------------------------------------------------------------------------------------
# label noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.2, 0.37, 0.5])
@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_noise_count_exact_and_flags_match_labels(rate, kind):
    t = table(f"data.noise.rate={rate}", f"data.noise.kind={kind}")
    assert int(t.is_noisy.sum()) == round(rate * N)
    noisy = t.is_noisy
    assert torch.all(t.y_obs[noisy] != t.y_true[noisy])
    assert torch.all(t.y_obs[~noisy] == t.y_true[~noisy])
    assert t.y_obs.dtype == torch.int64 and t.y_true.dtype == torch.int64
    assert int(t.y_obs.min()) >= 0 and int(t.y_obs.max()) < NUM_CLASSES


def test_symmetric_noise_spreads_over_classes():
    t = table("data.noise.rate=0.4", "data.noise.kind=symmetric")
    noisy = t.is_noisy
    shift = (t.y_obs[noisy] - t.y_true[noisy]) % NUM_CLASSES
    counts = torch.bincount(shift, minlength=NUM_CLASSES)
    assert counts[0] == 0
    # 400 flips over 9 shifts: ~44 each; all shifts are used, none dominates
    assert int(counts[1:].min()) > 15 and int(counts[1:].max()) < 80


def test_pair_noise_maps_to_next_class():
    t = table("data.noise.rate=0.3", "data.noise.kind=pair")
    noisy = t.is_noisy
    assert int(noisy.sum()) == 300
    assert torch.equal(t.y_obs[noisy], (t.y_true[noisy] + 1) % NUM_CLASSES)


def test_noise_never_on_outliers_or_canaries():
    t = table("data.noise.rate=0.3", "data.outliers.share=0.2")
    assert int(t.is_noisy.sum()) == 300
    assert int(t.is_outlier.sum()) == 200
    assert not torch.any(t.is_noisy & t.is_outlier)
    assert not torch.any(t.is_noisy & t.is_canary)
    assert not torch.any(t.is_outlier & t.is_canary)
    # the clean mask is exactly the rest
    assert int(t.is_clean.sum()) == N - 300 - 200


def test_noise_rate_is_exact_with_outliers_at_the_limit():
    # 0.6 + 0.35 < 1: 600 noisy of the 650 non-outliers
    t = table("data.noise.rate=0.6", "data.outliers.share=0.35")
    assert int(t.is_noisy.sum()) == 600
    assert int(t.is_outlier.sum()) == 350
    assert not torch.any(t.is_noisy & t.is_outlier)


# ---------------------------------------------------------------------------------------------
# outliers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["noise", "invert", "shuffle"])
@pytest.mark.parametrize("share", [0.05, 0.123])
def test_outliers_count_labels_kept_inputs_changed(kind, share):
    t = table(f"data.outliers.share={share}", f"data.outliers.kind={kind}", "data.noise.rate=0.2")
    out = t.is_outlier[:N]
    assert int(out.sum()) == round(share * N)
    assert not torch.any(t.is_outlier[N:])
    # labels kept: observed == true == source label
    assert torch.equal(t.y_true[:N][out], SRC.y_train[out])
    assert torch.equal(t.y_obs[:N][out], SRC.y_train[out])
    # every outlier input differs from its source input, every other one is untouched
    x = t.x[:N]
    changed = (x != SRC.x_train).flatten(1).any(dim=1)
    assert torch.equal(changed, out)
    if kind == "noise":
        dist = (x[out] - SRC.x_train[out]).flatten(1).pow(2).mean(dim=1).sqrt()
        # strength 2 x std (~1): RMS distance around 2
        assert 1.5 < float(dist.mean()) < 2.5


def test_outlier_strength_scales_distance():
    d = []
    for strength in (1.0, 4.0):
        t = table("data.outliers.share=0.1", f"data.outliers.strength={strength}")
        out = t.is_outlier[:N]
        d.append(float((t.x[:N][out] - SRC.x_train[out]).norm()))
    assert d[1] == pytest.approx(4 * d[0], rel=0.1)


def test_shuffle_outlier_kind_with_no_outliers_builds():
    t = table("data.outliers.kind=shuffle", "data.outliers.share=0.0")
    assert int(t.is_outlier.sum()) == 0


# ---------------------------------------------------------------------------------------------
# per-client noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outliers", [0.0, 0.1])
@pytest.mark.parametrize("partition", ["dirichlet", "iid", "shards"])
def test_client_rates_exact_per_client(outliers, partition):
    t = table(
        "data.noise.client_rates={0: 0.5, 2: 0.3}",
        f"data.outliers.share={outliers}",
        f"partition.kind={partition}",
    )
    rates = {0: 0.5, 2: 0.3}
    reg = regular(t)
    for k in range(5):
        rows = reg & (t.client == k)
        n_k = int(rows.sum())
        assert n_k > 0
        noisy_k = int((t.is_noisy & rows).sum())
        assert noisy_k == round(rates.get(k, 0.0) * n_k), (k, n_k, noisy_k)
    assert not torch.any(t.is_noisy & t.is_outlier)
    assert torch.all(t.y_obs[t.is_noisy] != t.y_true[t.is_noisy])
    assert torch.all(t.y_obs[~t.is_noisy] == t.y_true[~t.is_noisy])


def test_client_rates_replace_global_rate():
    # the default config has rate=0.2; with client_rates={1: 0.0} nothing is noisy
    t = table("data.noise.client_rates={1: 0.0}")
    assert int(t.is_noisy.sum()) == 0


def test_unreachable_noise_rate_raises_config_error():
    # client 0: ~half its rows are outliers, 0.9 of its rows cannot be noisy
    with pytest.raises(ConfigError) as exc:
        table(
            "data.noise.rate=0.0",
            "data.noise.client_rates={0: 0.9}",
            "data.outliers.share=0.5",
            "partition.kind=iid",
        )
    msg = str(exc.value)
    assert msg.startswith("data.noise:"), msg
    assert "client 0" in msg


# ---------------------------------------------------------------------------------------------
# canaries
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "repeats", "num_clients", "per_canary"),
    [(10, 4, 2, 1), (10, 4, 2, 2), (20, 6, 3, 2), (7, 3, 5, 3), (5, 1, 1, 1)],
)
def test_canaries_rows_and_placement(count, repeats, num_clients, per_canary):
    t = table(
        f"data.canaries.count={count}",
        f"data.canaries.repeats={repeats}",
        f"data.canaries.num_clients={num_clients}",
        f"data.canaries.clients_per_canary={per_canary}",
    )
    assert len(t) == N + count * repeats
    can = t.is_canary
    assert int(can.sum()) == count * repeats
    assert not torch.any(can[:N]) and torch.all(can[N:])
    assert torch.all(t.canary_id[:N] == -1)
    ids = t.canary_id[can]
    assert torch.equal(torch.bincount(ids, minlength=count), torch.full((count,), repeats))
    used_clients = set()
    for c in range(count):
        rows = t.canary_id == c
        xs, ys = t.x[rows], t.y_obs[rows]
        assert torch.equal(xs, xs[:1].expand_as(xs))
        assert torch.all(ys == ys[0])
        assert torch.all(t.y_true[rows] == ys[0])
        holders = torch.unique(t.client[rows])
        assert len(holders) == per_canary
        used_clients |= set(holders.tolist())
    assert len(used_clients) <= num_clients
    # with these settings every canary client gets used
    assert len(used_clients) == num_clients
    assert all(0 <= k < 5 for k in used_clients)
    assert not torch.any(t.is_noisy[can] | t.is_outlier[can])
    assert int(t.y_obs[can].min()) >= 0 and int(t.y_obs[can].max()) < NUM_CLASSES
    # distinct canaries have distinct inputs
    firsts = torch.stack([t.x[t.canary_id == c][0] for c in range(count)])
    assert len(torch.unique(firsts, dim=0)) == count


def test_canary_lists_cycle_copies_and_holders():
    t = table(
        "data.canaries.count=12",
        "data.canaries.repeats=[1, 4]",
        "data.canaries.clients_per_canary=[1, 2]",
    )
    # kinds: (1 copy, 1 client), (4, 1), (4, 2); (1, 2) is impossible and skipped
    copies = torch.bincount(t.canary_id[t.is_canary], minlength=12)
    assert copies.tolist() == [1, 4, 4] * 4
    holders = [len(torch.unique(t.client[t.canary_id == c])) for c in range(12)]
    assert holders == [1, 1, 2] * 4
    with pytest.raises(ConfigError, match="clients_per_canary"):
        make_cfg("data.canaries.repeats=[1]", "data.canaries.clients_per_canary=[2]")
    with pytest.raises(ConfigError, match="repeats"):
        make_cfg("data.canaries.repeats=[0, 2]")


def test_reference_canaries():
    t = table("data.canaries.reference=30", "data.canaries.count=10")
    assert t.canary_ref_x.shape == (30, *SHAPE)
    assert t.canary_ref_y.shape == (30,)
    assert t.canary_ref_y.dtype == torch.int64
    assert int(t.canary_ref_y.min()) >= 0 and int(t.canary_ref_y.max()) < NUM_CLASSES
    inserted = t.x[t.is_canary]
    for ref in t.canary_ref_x:
        assert not torch.any((inserted == ref).all(dim=1))
    # reference inputs are also not any training row
    assert not torch.any((t.x.unsqueeze(0) == t.canary_ref_x.unsqueeze(1)).all(dim=2))


def test_no_canaries_and_no_reference():
    t = table("data.canaries.count=0", "data.canaries.reference=0")
    assert len(t) == N
    assert not torch.any(t.is_canary)
    assert t.canary_ref_x.shape == (0, *SHAPE)


# ---------------------------------------------------------------------------------------------
# ids, clients, determinism, persistence
# ---------------------------------------------------------------------------------------------


def test_ids_are_source_order():
    t = table("data.noise.rate=0.2", "data.outliers.share=0.0")
    assert torch.equal(t.ids, torch.arange(len(t)))
    assert torch.equal(t.x[:N], SRC.x_train)
    assert torch.equal(t.y_true[:N], SRC.y_train)
    assert torch.equal(t.x_test, SRC.x_test)
    assert torch.equal(t.y_test, SRC.y_test)
    assert t.num_classes == NUM_CLASSES
    assert t.num_clients == 5
    assert t.input_shape == SHAPE


def test_build_does_not_modify_source():
    src = make_source(seed=5)
    before = src.x_train.clone()
    build_table(make_cfg("data.outliers.share=0.3", "data.outliers.kind=invert"), source=src)
    assert torch.equal(src.x_train, before)


@pytest.mark.parametrize("image", [False, True])
def test_client_rows_partition_all_rows(image):
    src = make_source(shape=(1, 8, 8)) if image else SRC
    t = table("data.noise.rate=0.2", "data.outliers.share=0.1", src=src)
    rows = [t.client_rows(k) for k in range(t.num_clients)]
    allr = torch.cat(rows)
    assert len(allr) == len(t)
    assert torch.equal(torch.sort(allr).values, torch.arange(len(t)))
    for k, r in enumerate(rows):
        assert torch.all(r[1:] > r[:-1])
        assert torch.all(t.client[r] == k)
    assert int(t.client.min()) >= 0 and int(t.client.max()) < 5


def test_iid_partition_sizes():
    t = table("partition.kind=iid", "data.canaries.count=0")
    sizes = torch.bincount(t.client, minlength=5)
    assert sizes.tolist() == [200] * 5


def test_min_size_respected_per_client():
    t = table("partition.alpha=0.1", "partition.min_size=50")
    sizes = torch.bincount(t.client[~t.is_canary], minlength=5)
    assert int(sizes.min()) >= 50


def _assert_tables_equal(a: ExampleTable, b: ExampleTable) -> None:
    for f in fields(ExampleTable):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype, f.name
            assert torch.equal(va, vb), f.name
        else:
            assert va == vb, f.name


FULL = (
    "data.noise.rate=0.25",
    "data.outliers.share=0.1",
    "data.canaries.count=8",
    "data.canaries.repeats=3",
    "data.canaries.num_clients=3",
    "data.canaries.clients_per_canary=2",
)


def test_same_config_same_table():
    _assert_tables_equal(table(*FULL), table(*FULL))


def test_different_seed_different_table():
    a, b = table(*FULL, "seed=0"), table(*FULL, "seed=1")
    assert int(a.is_noisy.sum()) == int(b.is_noisy.sum()) == 250
    assert not torch.equal(a.is_noisy, b.is_noisy)
    assert not torch.equal(a.is_outlier, b.is_outlier)
    assert not torch.equal(a.client, b.client)
    assert not torch.equal(a.canary_ref_x, b.canary_ref_x)
    # the overlap of two random 25% noise sets is ~ 25% of 250, far from all
    overlap = int((a.is_noisy & b.is_noisy).sum())
    assert overlap < 150


@pytest.mark.parametrize("client_rates", [False, True])
def test_seed_changes_noise_without_outliers(client_rates):
    extra = ["data.noise.client_rates={0: 0.4, 3: 0.2}"] if client_rates else []
    a = table("data.noise.rate=0.2", "partition.kind=iid", "seed=0", *extra)
    b = table("data.noise.rate=0.2", "partition.kind=iid", "seed=1", *extra)
    assert int(a.is_noisy.sum()) == int(b.is_noisy.sum())
    assert not torch.equal(a.is_noisy, b.is_noisy)


def test_noise_stream_independent_of_canaries():
    # changing the canaries must not reshuffle the noise set (named rng streams)
    a = table("data.noise.rate=0.2", "data.canaries.count=3")
    b = table("data.noise.rate=0.2", "data.canaries.count=20")
    assert torch.equal(a.is_noisy[:N], b.is_noisy[:N])
    assert torch.equal(a.y_obs[:N], b.y_obs[:N])


def test_save_load_roundtrip(tmp_path):
    t = table(*FULL)
    path = tmp_path / "table.npz"
    t.save(path)
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["table.npz"], "no temporary left"
    loaded = ExampleTable.load(path)
    _assert_tables_equal(t, loaded)
    assert isinstance(loaded.num_classes, int) and isinstance(loaded.num_clients, int)
    assert torch.equal(loaded.is_clean, t.is_clean)


# ---------------------------------------------------------------------------------------------
# audit split: membership candidates and held-out clients
# ---------------------------------------------------------------------------------------------
AUDIT = ("audit.pool=300", "audit.canaries=80", "audit.heldout_clients=2", "data.noise.rate=0.2")


def test_audit_candidates_link_rows_and_members():
    t = table(*AUDIT)
    m = t.audit_member
    assert len(t.audit_x) == 380 and int((t.audit_kind == AUDIT_POOL).sum()) == 300
    # each candidate in w.p. 1/2: the member share is binomial, 380 draws
    assert 0.4 < float(m.float().mean()) < 0.6
    rows = t.audit_row[m]
    assert torch.equal(t.x[rows], t.audit_x[m]) and torch.equal(t.y_obs[rows], t.audit_y[m])
    assert torch.equal(t.client[rows], t.audit_client[m])
    assert (t.audit_row[~m] == -1).all()
    assert torch.equal(t.audit_id[rows], torch.nonzero(m).flatten())
    assert int((t.audit_id >= 0).sum()) == int(m.sum())
    # non-members are nowhere in the training rows
    for xi in t.audit_x[~m][:20]:
        assert not (t.x == xi).all(1).any()
    # audit canaries: random label kept, never counted as clean
    ac = t.is_audit_canary
    assert int(ac.sum()) == int((m & (t.audit_kind == AUDIT_CANARY)).sum())
    assert not (t.is_clean & ac).any()
    pool = t.audit_kind == AUDIT_POOL
    assert bool(((t.audit_y != t.audit_y_true) & pool).any()), "pool holds mislabeled rows"
    assert (t.audit_y[~pool] == t.audit_y_true[~pool]).all()


def test_heldout_clients_never_train_and_cover_the_rest():
    t = table(*AUDIT)
    assert t.num_clients == 5 and t.num_heldout_clients == 2
    assert set(torch.unique(t.heldout_client).tolist()) == {5, 6}
    assert int(t.client.max()) == 4
    pool_out = int(((t.audit_kind == AUDIT_POOL) & ~t.audit_member).sum())
    source_rows = int((t.canary_id < 0).sum()) - int(t.is_audit_canary.sum())
    assert source_rows + pool_out + len(t.heldout_y) == N  # every source row accounted for
    assert (t.audit_client < 5).all()


def test_audit_split_is_seeded_and_leaves_default_tables_alone():
    a, b = table(*AUDIT), table(*AUDIT)
    assert torch.equal(a.audit_member, b.audit_member) and torch.equal(a.x, b.x)
    c = table(*AUDIT, "seed=1")
    assert not torch.equal(a.audit_member, c.audit_member)
    plain = table()
    assert len(plain.audit_x) == 0 and len(plain.heldout_x) == 0 and len(plain) == N + 40
    assert (plain.audit_id == -1).all()


def test_audit_pool_too_large_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^audit\.pool: .*lower audit\.pool"):
        table("audit.pool=5000")


def test_audit_attack_settings_do_not_change_the_run_hash():
    base = make_cfg(*AUDIT)
    other = make_cfg(*AUDIT, "audit.attack.shadows=64", "audit.attack.epsilon_attack=loss")
    assert config.config_hash(base) == config.config_hash(other)
    assert config.config_hash(base) != config.config_hash(make_cfg())
    with pytest.raises(ConfigError, match=r"^audit\.attack\.shadows: 7; must be even"):
        make_cfg("audit.attack.shadows=7")
