"""Patient-level DP-SGD: when a site's images carry patient ids, the unit of privacy is one patient.

- Sampling: every patient is included in a step independently with probability q (Poisson, as DP-SGD
  requires), and with them *all* their images — never a part of a patient.
- Clipping: Opacus computes one gradient row per image (``p.grad_sample``); ``PatientDPOptimizer`` sums the
  rows of each patient before clipping, so each patient's whole contribution to a step has norm ≤ C however
  many images they have. Noise σ·C and the accountant's (σ, q, steps) are then exactly those of image-level
  DP-SGD with the patient as the unit (add/remove one patient), and δ must be below 1/(number of patients).

The same trick as the diffusion model's K noise draws per image (mean over copies), one level up: it runs
inside the optimizer step, after any per-image regrouping a model does in its ``train_step``.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from models import Generator
from privacy.grad_samplers import PerSampleGradModule

from .data import ImageDataset
from .trainer import TrainResult, on_device


class PatientDPOptimizer(DPOptimizer):
    """A DPOptimizer whose "samples" are patients: per-image gradient rows are summed per patient, then clipped.

    Call ``set_patients(index, count)`` before each step: ``index[i]`` is the patient (0..count-1) of row i of
    the batch. Without it the optimizer refuses to step (it would silently fall back to image-level clipping).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._patients: tuple[torch.Tensor, int] | None = None

    def set_patients(self, index: torch.Tensor, count: int) -> None:
        self._patients = (index.long(), int(count))

    def clip_and_accumulate(self):
        if self._patients is None:
            raise RuntimeError("PatientDPOptimizer: set_patients() was not called before this step")
        index, count = self._patients
        for p in self.params:
            _check_processed_flag(p.grad_sample)  # keep Opacus' guard against reusing a gradient
            rows = self._get_flat_grad_sample(p)
            if rows.shape[0] != index.shape[0]:
                raise RuntimeError(f"PatientDPOptimizer: {rows.shape[0]} gradient rows for a batch of "
                                   f"{index.shape[0]} images; the model must leave one row per image")
            _mark_as_processed(p.grad_sample)
            p.grad_sample = rows.new_zeros((count, *rows.shape[1:])).index_add_(0, index.to(rows.device), rows)
        self._patients = None  # one step, one batch
        super().clip_and_accumulate()


class PatientSampler:
    """Poisson sampling of patients: each step includes each patient with probability q, with all their images."""

    def __init__(self, patient_ids: np.ndarray, sample_rate: float, generator: torch.Generator):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"patient sampler: sample rate must be in (0, 1], got {sample_rate}")
        _, inverse = np.unique(np.asarray(patient_ids), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        self.members = np.split(order, bounds)  # image indices of each patient, in a fixed order
        self.sample_rate, self.generator = sample_rate, generator

    @property
    def num_patients(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Endless (image indices, patient index per image within the batch, number of patients) per step."""
        while True:
            chosen = torch.nonzero(torch.rand(self.num_patients, generator=self.generator) < self.sample_rate)
            chosen = chosen.flatten().tolist()
            parts = [self.members[k] for k in chosen]
            images = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            index = np.repeat(np.arange(len(parts)), [len(m) for m in parts]) if parts else np.zeros(0, np.int64)
            yield images, index, len(parts)


def count_patients(data: ImageDataset) -> int:
    if data.patient_ids is None:
        raise ValueError(f"{data.source}: no patient ids; the unit is one image")
    return int(len(np.unique(data.patient_ids)))


def train_private_patients(model: Generator, data: ImageDataset, *, sigma: float, clip: float,
                           sample_rate: float, steps: int, lr: float | Callable[[int], float], seed: int,
                           accountant: str = "prv", device: str = "cpu") -> TrainResult:
    """``client.trainer.train_private`` with the patient as the unit: same steps, σ, C, q and accountant."""
    lr_at = lr if callable(lr) else (lambda _: lr)
    torch.manual_seed(seed)
    sampler = PatientSampler(data.patient_ids, sample_rate, torch.Generator().manual_seed(seed))
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    with on_device(model, device) as dev:
        return _train_patients(model, sampler, images, labels, dev, sigma=sigma, clip=clip,
                               sample_rate=sample_rate, steps=steps, lr_at=lr_at, accountant=accountant)


def _train_patients(model, sampler, images, labels, dev, *, sigma, clip, sample_rate, steps, lr_at,
                    accountant) -> TrainResult:
    module = model.private_module()
    private = PerSampleGradModule(module, batch_first=True, loss_reduction="mean")
    optimizer = PatientDPOptimizer(model.optimizer(module.parameters(), lr_at(0)), noise_multiplier=sigma,
                                   max_grad_norm=clip, loss_reduction="mean",
                                   expected_batch_size=max(1, round(sample_rate * sampler.num_patients)))
    acc = create_accountant(mechanism=accountant)
    optimizer.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=sample_rate))
    public = model.public_optimizer(lr_at(0))
    groups = optimizer.param_groups + (public.param_groups if public is not None else [])
    losses, done = [], 0
    model.train()
    try:
        for idx, index, count in sampler:
            if done == steps:
                break
            for group in groups:
                group["lr"] = lr_at(done)
            optimizer.set_patients(torch.from_numpy(index).to(dev), count)
            t = torch.from_numpy(idx)
            losses.append(model.train_step(private, optimizer, images[t].to(dev), labels[t].to(dev),
                                           public=public)["loss"])
            done += 1
    finally:
        private.to_standard_module()
    model.eval()
    if done != sum(n for _, _, n in acc.history):
        raise RuntimeError(f"DP trainer: took {done} steps but the accountant recorded {acc.history}")
    return TrainResult(steps=done, history=[tuple(h) for h in acc.history],
                       metrics={"train_loss": float(np.mean(losses[-max(1, len(losses) // 4):]))})
