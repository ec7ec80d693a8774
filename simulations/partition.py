"""Split one labelled data set across simulated hospital sites: iid, label skew (Dirichlet) or
quantity skew, then a local train/holdout split per site."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

SPEC_FORMS = "iid|dirichlet:ALPHA|quantity:ALPHA (ALPHA > 0)"


class Partitioner(ABC):
    name: ClassVar[str]

    @abstractmethod
    def split(self, labels: np.ndarray, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Disjoint index arrays, one per site, covering every index; no site is empty."""

    @classmethod
    def from_arg(cls, arg: str | None) -> Partitioner:
        if arg is not None:
            raise ValueError(f"'{cls.name}' takes no argument")
        return cls()

    @property
    def spec(self) -> str:
        return self.name


def _check_split_args(labels: np.ndarray, num_sites: int) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 1 <= num_sites <= len(labels):
        raise ValueError(f"num_sites={num_sites}: need 1 <= num_sites <= number of images ({len(labels)})")


@dataclass(frozen=True)
class IidPartitioner(Partitioner):
    name = "iid"

    def split(self, labels, num_sites, rng):
        _check_split_args(labels, num_sites)
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_sites)]


@dataclass(frozen=True)
class _AlphaPartitioner(Partitioner):
    alpha: float
    min_size: int = 10  # per site, lowered to n // num_sites when the data are too small

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"{self.name}: alpha must be a finite number > 0, got {self.alpha}")

    @classmethod
    def from_arg(cls, arg):
        if arg is None:
            raise ValueError(f"'{cls.name}' needs ALPHA, e.g. '{cls.name}:0.5'")
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"ALPHA {arg!r} is not a number") from None
        return cls(alpha)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.alpha:g}"

    def _floor(self, n: int, num_sites: int) -> int:
        return max(1, min(self.min_size, n // num_sites))


class DirichletPartitioner(_AlphaPartitioner):
    """Label skew: each class is spread over sites with proportions ~ Dir(alpha); small alpha = few classes per site."""

    name = "dirichlet"
    max_tries: ClassVar[int] = 20

    def split(self, labels, num_sites, rng):
        _check_split_args(labels, num_sites)
        floor = self._floor(len(labels), num_sites)
        for _ in range(self.max_tries):
            sites = self._draw(labels, num_sites, rng)
            if min(len(s) for s in sites) >= floor:
                break
        else:
            # small alpha with many sites rarely meets the floor by chance: top up the small sites
            # with random images from the largest one, which keeps most of the skew
            for i in range(num_sites):
                while len(sites[i]) < floor:
                    big = max(range(num_sites), key=lambda j: len(sites[j]))
                    take = min(floor - len(sites[i]), len(sites[big]) - floor)
                    moved = rng.permutation(len(sites[big]))
                    sites[i] += [sites[big][k] for k in moved[:take]]
                    sites[big] = [sites[big][k] for k in moved[take:]]
        return [np.sort(np.asarray(s, dtype=np.int64)) for s in sites]

    def _draw(self, labels, num_sites, rng) -> list[list[int]]:
        sites: list[list[int]] = [[] for _ in range(num_sites)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([self.alpha] * num_sites)) * len(idx)).astype(int)[:-1]
            for site, chunk in zip(sites, np.split(idx, cuts)):
                site.extend(chunk.tolist())
        return sites


class QuantityPartitioner(_AlphaPartitioner):
    """Quantity skew: site sizes ~ Dir(alpha) (above a floor), labels drawn iid within each site."""

    name = "quantity"

    def split(self, labels, num_sites, rng):
        _check_split_args(labels, num_sites)
        n = len(labels)
        floor = self._floor(n, num_sites)
        sizes = floor + rng.multinomial(n - floor * num_sites, rng.dirichlet([self.alpha] * num_sites))
        return [np.sort(p) for p in np.split(rng.permutation(n), np.cumsum(sizes)[:-1])]


PARTITIONERS: dict[str, type[Partitioner]] = {
    cls.name: cls for cls in (IidPartitioner, DirichletPartitioner, QuantityPartitioner)
}


def parse_partition(spec: str) -> Partitioner:
    name, sep, arg = str(spec).strip().lower().partition(":")
    try:
        if name not in PARTITIONERS:
            raise ValueError(f"unknown partitioner '{name}'")
        return PARTITIONERS[name].from_arg(arg if sep else None)
    except ValueError as e:
        raise ValueError(f"bad partition spec {spec!r}: {e}; expected {SPEC_FORMS}") from None


def _flat(labels) -> np.ndarray:
    labels = np.asarray(labels)
    return labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels  # MedMNIST stores (N, 1)


@dataclass
class SitePartition:
    train: np.ndarray  # sorted int64 indices into the data set
    holdout: np.ndarray  # sorted int64 indices, disjoint from train


def partition_sites(
    labels, num_sites: int, spec: str, seed: int, holdout_fraction: float = 0.2, groups=None
) -> list[SitePartition]:
    """``groups`` (one patient id per image): split patients, not images — each patient's images all go to
    one site and to one side of its train/holdout split (a patient at two sites would have their privacy loss
    split across two ledgers, and one in train and holdout would blur the membership tests). A patient
    counts with the label of their first image."""
    labels = _flat(labels)
    if groups is not None:
        ids, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        by_patient = partition_sites(labels[first], num_sites, spec, seed, holdout_fraction)
        order = np.argsort(inverse.ravel(), kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse.ravel(), minlength=len(ids)))[:-1])

        def images(patients: np.ndarray) -> np.ndarray:
            return np.sort(np.concatenate([members[p] for p in patients] or [np.zeros(0, np.int64)])).astype(np.int64)

        return [SitePartition(images(p.train), images(p.holdout)) for p in by_patient]
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction={holdout_fraction}: expected 0 <= holdout_fraction < 1")
    rng = np.random.default_rng(seed)
    sites = parse_partition(spec).split(labels, num_sites, rng)
    # cheap guard so a buggy partitioner can never leak an image into two sites
    covered = np.array_equal(np.sort(np.concatenate(sites)), np.arange(len(labels)))
    if len(sites) != num_sites or min(map(len, sites)) == 0 or not covered:
        raise RuntimeError(f"partitioner {spec!r} returned overlapping, incomplete or empty sites")
    parts = []
    for idx in sites:
        n = len(idx)
        n_hold = 0 if n < 2 or holdout_fraction == 0 else min(max(1, round(holdout_fraction * n)), n - 1)
        idx = rng.permutation(idx)
        parts.append(SitePartition(np.sort(idx[n_hold:]).astype(np.int64), np.sort(idx[:n_hold]).astype(np.int64)))
    return parts


def partition_table(labels, parts: list[SitePartition], classes: list[str]) -> str:
    labels = _flat(labels)
    if len(labels) and labels.max() >= len(classes):
        raise ValueError(f"label {labels.max()} has no class name; classes={classes}")

    def row(name: str, train: np.ndarray, n_hold: int) -> list[str]:
        counts = np.bincount(labels[train], minlength=len(classes))
        pct = 100.0 * counts / max(len(train), 1)
        return [name, str(len(train)), str(n_hold)] + [f"{c} ({p:.1f}%)" for c, p in zip(counts, pct)]

    rows = [["site", "train", "holdout"] + list(classes)]
    rows += [row(f"site-{i}", p.train, len(p.holdout)) for i, p in enumerate(parts)]
    all_train = np.concatenate([p.train for p in parts]) if parts else np.zeros(0, np.int64)
    rows.append(row("total", all_train, sum(len(p.holdout) for p in parts)))
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
