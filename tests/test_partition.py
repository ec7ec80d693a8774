"""Site partitioners: coverage, determinism, the skew each one promises, spec parsing and the table."""
from pathlib import Path

import numpy as np
import pytest

from simulations.partition import (
    PARTITIONERS, DirichletPartitioner, IidPartitioner, QuantityPartitioner,
    parse_partition, partition_sites, partition_table,
)

SPECS = ["iid", "dirichlet:0.1", "dirichlet:1.0", "quantity:0.3", "quantity:5"]
BUNDLED = Path(__file__).resolve().parents[1] / "simulations" / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="module")
def labels():
    # unbalanced 3-class labels, like a real cohort
    return np.random.default_rng(123).choice(3, size=3000, p=[0.5, 0.3, 0.2])


def mean_tv(labels, sites):
    """Mean total-variation distance between each site's label histogram and the global one."""
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[s], minlength=k) / len(s) - glob).sum() for s in sites])


@pytest.mark.parametrize("num_sites", [2, 7])
@pytest.mark.parametrize("spec", SPECS)
def test_sites_are_disjoint_complete_nonempty(labels, spec, num_sites):
    parts = partition_sites(labels, num_sites, spec, seed=0)
    assert len(parts) == num_sites
    every = np.concatenate([np.concatenate([p.train, p.holdout]) for p in parts])
    assert len(every) == len(labels)  # with the next line: disjoint and complete
    np.testing.assert_array_equal(np.sort(every), np.arange(len(labels)))
    for p in parts:
        assert p.train.dtype == np.int64 and p.holdout.dtype == np.int64
        assert np.all(np.diff(p.train) > 0) and np.all(np.diff(p.holdout) > 0)
        assert len(p.train) >= 1 and len(p.holdout) >= 1
        n = len(p.train) + len(p.holdout)
        assert n >= 10 and abs(len(p.holdout) - 0.2 * n) <= 1
        assert p.holdout.max() > p.train.min()  # a random holdout, not the lowest indices


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_in_seed(labels, spec):
    a, b, c = (partition_sites(labels, 5, spec, seed=s) for s in (7, 7, 8))
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.train, pb.train)
        np.testing.assert_array_equal(pa.holdout, pb.holdout)
    assert any(not np.array_equal(pa.train, pc.train) for pa, pc in zip(a, c))


@pytest.mark.parametrize("cls", [IidPartitioner, DirichletPartitioner, QuantityPartitioner])
def test_split_contract_per_class(labels, cls):
    part = cls() if cls is IidPartitioner else cls(0.5)
    sites = part.split(labels, 10, np.random.default_rng(1))
    assert len(sites) == 10 and min(map(len, sites)) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(sites)), np.arange(len(labels)))
    assert PARTITIONERS[cls.name] is cls


def test_dirichlet_skews_labels_iid_does_not(labels):
    tv = {spec: np.mean([mean_tv(labels, parse_partition(spec).split(labels, 10, np.random.default_rng(s)))
                         for s in range(5)]) for spec in ["iid", "dirichlet:0.1", "quantity:0.3"]}
    assert tv["dirichlet:0.1"] > 0.3 and tv["dirichlet:0.1"] > 4 * tv["iid"], tv
    assert tv["iid"] < 0.05 and tv["quantity:0.3"] < tv["dirichlet:0.1"] / 3, tv


def test_dirichlet_small_alpha_still_gives_every_site_the_minimum(labels):
    for seed in range(5):
        sites = DirichletPartitioner(0.05).split(labels, 20, np.random.default_rng(seed))
        assert min(map(len, sites)) >= 10


def test_tiny_data_one_image_per_site():
    parts = partition_sites(np.array([0, 1, 0]), 3, "dirichlet:0.1", seed=0)
    assert sorted(int(p.train[0]) for p in parts) == [0, 1, 2]
    assert all(len(p.train) == 1 and len(p.holdout) == 0 for p in parts)
    with pytest.raises(ValueError, match="num_sites"):
        partition_sites(np.array([0, 1]), 3, "iid", seed=0)


def test_quantity_skews_sizes_not_labels(labels):
    sizes = [len(s) for s in QuantityPartitioner(0.3).split(labels, 10, np.random.default_rng(0))]
    iid_sizes = [len(s) for s in IidPartitioner().split(labels, 10, np.random.default_rng(0))]
    assert max(sizes) > 3 * min(sizes) and max(iid_sizes) - min(iid_sizes) <= 1
    # labels stay iid inside the big sites (small ones are too noisy to judge)
    sites = QuantityPartitioner(1.0).split(labels, 5, np.random.default_rng(0))
    big = [s for s in sites if len(s) >= 300]
    assert big and mean_tv(labels, big) < 0.08


def test_parse_partition():
    assert parse_partition("iid") == IidPartitioner()
    assert parse_partition(" Dirichlet:0.5 ") == DirichletPartitioner(0.5)
    q = parse_partition("quantity:2")
    assert isinstance(q, QuantityPartitioner) and q.alpha == 2.0 and q.spec == "quantity:2"
    for bad in ["", "random", "dirichlet", "dirichlet:", "dirichlet:abc", "dirichlet:0",
                "quantity:-1", "quantity:nan", "quantity:inf", "iid:3"]:
        with pytest.raises(ValueError) as e:
            parse_partition(bad)
        assert repr(bad) in str(e.value) and "iid|dirichlet:ALPHA|quantity:ALPHA" in str(e.value)


def test_holdout_fraction_bounds(labels):
    # tiny sites still get one train and one holdout image; a huge fraction still leaves one train image
    assert all((len(p.train), len(p.holdout)) == (1, 1) for p in partition_sites(np.zeros(6, int), 3, "iid", 0))
    assert all((len(p.train), len(p.holdout)) == (1, 9)
               for p in partition_sites(np.zeros(30, int), 3, "iid", 0, holdout_fraction=0.99))
    assert all(len(p.holdout) == 0 for p in partition_sites(labels, 3, "iid", 0, holdout_fraction=0.0))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="holdout_fraction"):
            partition_sites(labels, 3, "iid", 0, holdout_fraction=bad)


def test_partition_table_on_pneumoniamnist():
    with np.load(BUNDLED) as z:
        y = z["train_labels"]  # (N, 1) as stored
    parts = partition_sites(y, 4, "dirichlet:0.5", seed=3)
    table = partition_table(y, parts, ["normal", "pneumonia"])
    lines = table.splitlines()
    assert "normal" in lines[0] and "pneumonia" in lines[0]
    for i, p in enumerate(parts):
        row = next(line for line in lines if line.startswith(f"site-{i} "))
        assert row.split()[1:3] == [str(len(p.train)), str(len(p.holdout))]
        assert f"{int(np.sum(y[p.train] == 1))} (" in row
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[1:3] == [str(sum(len(p.train) for p in parts)), str(sum(len(p.holdout) for p in parts))]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "quantity:1.0"])
def test_patients_stay_whole_across_sites_and_train_holdout(spec):
    """With patient ids, every patient's images land at one site and on one side of its holdout split."""
    rng = np.random.default_rng(7)
    patients = np.repeat(np.arange(120), rng.integers(1, 6, 120))  # 1-5 images per patient
    labels = (patients % 2).astype(np.int64)  # one label per patient
    parts = partition_sites(labels, 3, spec, seed=1, holdout_fraction=0.25, groups=patients.astype(str))
    everything = np.concatenate([np.concatenate([p.train, p.holdout]) for p in parts])
    assert np.array_equal(np.sort(everything), np.arange(len(patients)))  # every image once
    owner = {}
    for k, p in enumerate(parts):
        for side, idx in (("train", p.train), ("holdout", p.holdout)):
            for pid in set(patients[idx]):
                assert owner.setdefault(pid, (k, side)) == (k, side), f"patient {pid} split"
    assert all(len(p.holdout) > 0 and len(p.train) > 0 for p in parts)
