"""Patient-level DP: whole patients are Poisson-sampled, and a patient's images are clipped together to C."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.client_app import SiteClient
from client.data import DataError, ImageDataset, load_dataset, load_npz, save_npz
from client.patient import PatientDPOptimizer, PatientSampler
from client.site import RoundRefused
from fedsynth.config import DEFAULT_DATA
from models import build_generator
from privacy.audit import audit, format_audit
from privacy.ledger import Ledger
from simulations.runner import prepare_sites

C = 1.0


def with_patients(ds: ImageDataset, sizes: list[int]) -> ImageDataset:
    """The first sum(sizes) images, patient k owning the next sizes[k] of them (ids as strings, like a manifest)."""
    n = sum(sizes)
    ids = np.repeat([f"P{k:04d}" for k in range(len(sizes))], sizes)
    return ImageDataset(ds.images[:n], ds.labels[:n], list(ds.classes), ds.source, ids)


def test_patient_ids_survive_subset_save_and_load(tmp_path):
    ds = with_patients(load_dataset(DEFAULT_DATA, "val"), [3, 1, 5])
    part = ds.subset(np.array([0, 4, 8]))
    assert part.patient_ids.tolist() == ["P0000", "P0002", "P0002"]
    save_npz(tmp_path / "site.npz", ds, part)
    back, val = load_npz(tmp_path / "site.npz", "train", num_classes=2), load_npz(tmp_path / "site.npz", "val", num_classes=2)
    assert back.patient_ids.tolist() == ds.patient_ids.tolist() and val.patient_ids.tolist() == part.patient_ids.tolist()
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.zeros(3, np.uint8),
             train_patient_ids=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"bad.npz \[train_patient_ids\].*\(3,\)"):
        load_npz(tmp_path / "bad.npz", "train")


def test_sampler_takes_whole_patients_at_rate_q():
    sizes = [1, 7, 2, 30, 4, 1, 12, 3]
    ids = np.repeat(np.arange(len(sizes)) * 10, sizes)[np.random.default_rng(0).permutation(sum(sizes))]
    q, draws = 0.3, 400
    a = PatientSampler(ids, q, torch.Generator().manual_seed(5))
    b = PatientSampler(ids, q, torch.Generator().manual_seed(5))
    seen = np.zeros(len(sizes))
    for _, (idx, index, count), (idx2, _, _) in zip(range(draws), a, b):
        assert np.array_equal(idx, idx2)  # deterministic for a seed
        patients = np.unique(ids[idx])
        assert count == len(patients) and len(np.unique(index)) == count
        for p in patients:  # every image of a sampled patient, and only of sampled patients
            assert np.array_equal(np.sort(idx[ids[idx] == p]), np.flatnonzero(ids == p))
            assert len(np.unique(index[ids[idx] == p])) == 1
        seen[patients // 10] += 1
    # each patient included at rate q, whatever its number of images (binomial: sd ≈ 0.023 here)
    assert np.all(np.abs(seen / draws - q) < 0.08), seen / draws


def summed_grad_norm(optimizer) -> float:
    return float(torch.sqrt(sum((p.summed_grad.double() ** 2).sum() for p in optimizer.params)))


def one_step(patients: bool, x, y, index, count) -> float:
    """One real VAE step at σ = 0 on chest X-rays; returns the norm of the clipped sum before any noise."""
    torch.manual_seed(0)
    model = build_generator("vae", num_classes=2)
    module = model.private_module()
    private = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    cls = PatientDPOptimizer if patients else DPOptimizer
    optimizer = cls(torch.optim.SGD(module.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                    expected_batch_size=len(x), loss_reduction="mean")
    if patients:
        optimizer.set_patients(torch.as_tensor(index), count)
    model.train()
    model.train_step(private, optimizer, x, y)
    norm = summed_grad_norm(optimizer)
    private.to_standard_module()
    return norm


def test_a_patient_with_many_images_contributes_at_most_c_per_step():
    ds = load_dataset(DEFAULT_DATA, "val")
    x, y = torch.from_numpy(ds.images[:40]), torch.from_numpy(ds.labels[:40])
    one_patient = np.zeros(40, np.int64)
    per_image = one_step(False, x, y, None, None)
    per_patient = one_step(True, x, y, one_patient, 1)
    # image-level clipping lets 40 images of one patient add up to far more than C ...
    assert per_image > 5 * C, per_image
    # ... patient-level clipping bounds the whole patient by C
    assert per_patient <= C * (1 + 1e-5), per_patient
    # two patients (39 images + 1): the sum of two clipped contributions, each ≤ C
    two = np.r_[np.zeros(39, np.int64), 1]
    assert one_step(True, x, y, two, 2) <= 2 * C * (1 + 1e-5)
    with pytest.raises(RuntimeError, match="40 gradient rows for a batch of 39"):
        one_step(True, x, y, one_patient[:39], 1)


def test_site_with_patient_ids_trains_and_reports_the_patient_unit(make_run, tmp_path):
    run = make_run("patients", state_dir=tmp_path / "state", rounds=2)
    prepare_sites(run)
    folder = tmp_path / "state" / "site-0"
    train = load_npz(folder / "data.npz", "train", num_classes=2)
    n = len(train) // 4 * 4
    save_npz(folder / "data.npz", with_patients(train, [4] * (n // 4)))  # 4 images per patient
    node = {"data-path": str(folder / "data.npz"), "site-name": "h1"}
    # δ is checked against 1/(number of patients) = 4/n: 5/n is refused, 2/n (too large per image) is fine
    request = {**run.to_flower(), "server-round": 1, "delta": 2 / n}
    with pytest.raises(RoundRefused, match=rf"1/N={4 / n:.2g} \(unit: patient\)"):
        SiteClient(node).fit([], {**request, "delta": 5 / n})
    weights = list(build_generator(run.model, **run.model_kwargs()).shared_weights().values())
    SiteClient(node).fit(weights, request)
    ledger = Ledger(folder / "ledger.jsonl")
    assert ledger.plan(run.run_id)["unit"] == "patient"
    (charge,) = ledger.charges()
    assert charge["unit"] == "patient" and charge["released"] == "weights" and charge["steps"] == 2
    report = audit(folder / "ledger.jsonl")
    assert report["ok"] and report["sites"][0]["totals"]["unit"] == "patient"
    assert "unit patient" in format_audit(report)
