"""Benchmark: private vs non-private training step time per family, and sampling throughput.

``python -m simulations.bench_step_time [--batch 376] [--reps 20] [--threads 1] [--device auto]`` trains two copies of each
family side by side in one process on the same real batch of the bundled data (376 ≈ the demo's expected
batch: q = 0.3 of a 1,255-image site): one through the site's DP parts (Opacus GradSampleModule +
DPOptimizer, σ = 1, C = 1, accountant attached, exactly as ``client.trainer``), one through the same
``train_step`` with a plain module and optimizer. Steps alternate between the two and the medians are
compared. Then the released model's sampling throughput (images/s; for diffusion ms/image at its default
DDIM steps). One thread by default: what a simulated site gets. ``--device auto`` runs on a GPU where torch
sees one (the same code path as a site's ``device``), else on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.data import load_dataset
from client.trainer import dp_parts
from fedsynth.config import DEFAULT_DATA, RunConfig, resolve_device
from models import FAMILIES, build_generator

TARGETS = {"vae": 1.5, "gan": 3.0, "diffusion": 2.0}  # private / non-private step time


def _timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU work is asynchronous
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def step_times(family: str, x, y, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = build_generator(family, **RunConfig(model=family).model_kwargs()).to(x.device)
    lr = FAMILIES[family].default_lr[0]
    dp_model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
    private, dp_opt, acc = dp_parts(dp_model, sigma=1.0, clip=1.0, sample_rate=0.3, expected_batch_size=len(x),
                                    lr=lr)
    dp_pub = dp_model.public_optimizer(lr)
    plain = plain_model.private_module()
    plain_opt, plain_pub = plain_model.optimizer(plain.parameters(), lr), plain_model.public_optimizer(lr)
    ref_model, ref_private, ref_opt = stock_opacus(base, x, y, lr)
    ref_pub = ref_model.public_optimizer(lr)
    runs = {"private": lambda: dp_model.train_step(private, dp_opt, x, y, public=dp_pub),
            "plain": lambda: plain_model.train_step(plain, plain_opt, x, y, public=plain_pub),
            "stock opacus": lambda: ref_model.train_step(ref_private, ref_opt, x, y, public=ref_pub)}
    if family == "gan":  # the D step alone: the only part Opacus touches
        runs["private D"] = lambda: dp_model.d_step(private, dp_opt, x, y)
        runs["plain D"] = lambda: plain_model.d_step(plain, plain_opt, x, y)
    dp_model.train(), plain_model.train()
    times = {k: [] for k in runs}
    for i in range(reps + 2):
        for name, fn in runs.items():
            t = _timed(fn)
            if i >= 2:  # warm-up
                times[name].append(t)
    assert sum(n for _, _, n in acc.history) == (reps + 2) * (2 if family == "gan" else 1)
    return {k: statistics.median(v) for k, v in times.items()}


def stock_opacus(base, x, y, lr):
    """The loop a user would write with stock Opacus: ``PrivacyEngine.make_private`` on the same module
    (σ = 1, C = 1, Poisson sampling at q = 0.3), stepping on the same batch — the reference for fedsynth's
    own overhead."""
    model = copy.deepcopy(base)
    module = model.private_module()
    data = TensorDataset(x.repeat(4, 1, 1, 1)[: round(len(x) / 0.3)], y.repeat(4)[: round(len(x) / 0.3)])
    private, optimizer, _ = PrivacyEngine(accountant="prv").make_private(
        module=module, optimizer=model.optimizer(module.parameters(), lr), data_loader=DataLoader(data, len(x)),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    return model, private, optimizer


def sampling(family: str, n: int, device: str) -> dict[str, float]:
    """Seconds for n samples (best of 3); for the GAN also the unfused generator (Upsample, then Conv: the
    sampler before 2026-12-04), the two timed alternately."""
    torch.manual_seed(0)
    model = build_generator(family, **RunConfig(model=family).model_kwargs()).to(device).eval()
    g = torch.Generator().manual_seed(0)
    variants = {"sample": lambda: model.sample(n, generator=g)}
    if family == "gan":
        def unfused():
            z, y = model.randn(n, model.noise_dim, generator=g), model.uniform_labels(n, g)
            out = torch.cat([model.generator(zc, yc) for zc, yc in zip(z.split(256), y.split(256))])
            return F.interpolate(out, scale_factor=model.coarse, mode="bilinear", align_corners=False).clamp(0, 1)
        variants["unfused"] = unfused
    model.sample(min(n, 64), generator=g)  # warm-up
    times = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(3):
            for k, f in variants.items():
                times[k].append(_timed(f))
    return {k: min(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=376, help="real images per step")
    p.add_argument("--reps", type=int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, "--device")
    data = load_dataset(DEFAULT_DATA, "train")
    x, y = (torch.from_numpy(data.images[:args.batch]).to(device),
            torch.from_numpy(data.labels[:args.batch]).to(device))
    print(f"batch {args.batch} real images (bundled PneumoniaMNIST), {device}, {args.threads} thread(s), "
          f"median of {args.reps} steps, torch {torch.__version__}")
    for fam in args.families:
        model = build_generator(fam, **RunConfig(model=fam).model_kwargs())
        n_priv = sum(p.numel() for p in model.private_module().parameters())
        t = step_times(fam, x, y, args.reps)
        ratio = t["private"] / t["plain"]
        line = (f"{fam:<10} private params {n_priv:>7,}  step private {t['private'] * 1e3:7.1f} ms  "
                f"non-private {t['plain'] * 1e3:7.1f} ms  ratio {ratio:4.2f}x (target ≤ {TARGETS[fam]}x)"
                f"\n{'':<10} stock Opacus loop {t['stock opacus'] * 1e3:7.1f} ms: fedsynth / stock "
                f"{t['private'] / t['stock opacus']:4.2f}x (target ≤ 1.1x)")
        if "private D" in t:
            line += (f"\n{'':<10} D step alone: private {t['private D'] * 1e3:7.1f} ms  non-private "
                     f"{t['plain D'] * 1e3:7.1f} ms  ratio {t['private D'] / t['plain D']:4.2f}x")
        print(line, flush=True)
    for fam in args.families:
        n = 200 if fam == "diffusion" else 5000
        t = sampling(fam, n, device)
        s = t["sample"]
        extra = f", {getattr(build_generator(fam), 'sampler_steps', '')} DDIM steps" if fam == "diffusion" else ""
        if "unfused" in t:
            extra += f"; unfused Upsample + Conv {n / t['unfused']:,.0f} img/s: fused {t['unfused'] / s:.2f}x faster"
        print(f"{fam:<10} sampling {n / s:9,.0f} img/s  ({s / n * 1e3:.3f} ms/img{extra})", flush=True)


if __name__ == "__main__":
    main()
