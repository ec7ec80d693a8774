"""Benchmark: private vs non-private training step time per family, and sampling throughput.

``python -m simulations.bench_step_time [--batch 376] [--reps 20] [--threads 1] [--device auto]`` trains two copies of each
family side by side in one process on the same real batch of the bundled data (376 ≈ the demo's expected
batch: q = 0.3 of a 1,255-image site): one through the site's DP parts (Opacus GradSampleModule +
DPOptimizer, σ = 1, C = 1, accountant attached, exactly as ``client.trainer``), one through the same
``train_step`` with a plain module and optimizer. Steps alternate between the two (in a shuffled order each
round) and the medians are compared. Then the released model's sampling throughput (images/s; for diffusion ms/image at its default
DDIM steps). One thread by default: what a simulated site gets. ``--device auto`` runs on a GPU where torch
sees one (the same code path as a site's ``device``), else on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from client.data import load_dataset
from client.trainer import dp_parts
from fedsynth.config import DEFAULT_DATA, RunConfig, resolve_device
from models import FAMILIES, build_generator
from privacy.input_grads import _CONV_ARGS, _CONV_DEFAULTS, _bound, conv2d_input_grad

TARGETS = {"vae": 1.5, "gan": 3.0, "diffusion": 2.0}  # private / non-private step time


class _Conv2dFlippedInputGrad(torch.autograd.Function):
    """conv2d with the private path's input gradient (``privacy.input_grads.conv2d_input_grad``) and the usual
    weight and bias gradients: the non-private step given the same faster convolution, so the ratio printed
    beside it shows what skipping the discarded weight gradients buys on its own."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.has_bias = (_pair(stride), _pair(padding), _pair(dilation), groups), bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = conv2d_input_grad(g, x, weight, *ctx.conf) if ctx.needs_input_grad[0] else None
        _, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, [False, True, ctx.has_bias])
        return gx, gw, gb, None, None, None, None


class _flipped_input_grads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            return _Conv2dFlippedInputGrad.apply(*_bound(_CONV_ARGS, args, kwargs or {}, _CONV_DEFAULTS))
        return func(*args, **(kwargs or {}))


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
    dp_model, plain_model, kept_model = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    private, dp_opt, acc = dp_parts(dp_model, sigma=1.0, clip=1.0, sample_rate=0.3, expected_batch_size=len(x),
                                    lr=lr)
    # the same DP step with autograd also computing the weight gradients DP-SGD discards (before 2026-12-04)
    kept, kept_opt, _ = dp_parts(kept_model, sigma=1.0, clip=1.0, sample_rate=0.3, expected_batch_size=len(x), lr=lr)
    skips, kept.skip_discarded_grads = private.skip_discarded_grads, False
    kept_pub = kept_model.public_optimizer(lr)
    dp_pub = dp_model.public_optimizer(lr)
    plain = plain_model.private_module()
    plain_opt, plain_pub = plain_model.optimizer(plain.parameters(), lr), plain_model.public_optimizer(lr)
    ref_model, ref_private, ref_opt = stock_opacus(base, x, y, lr)
    ref_pub = ref_model.public_optimizer(lr)
    runs = {"private": lambda: dp_model.train_step(private, dp_opt, x, y, public=dp_pub),
            "plain": lambda: plain_model.train_step(plain, plain_opt, x, y, public=plain_pub),
            "stock opacus": lambda: ref_model.train_step(ref_private, ref_opt, x, y, public=ref_pub)}
    if skips:  # (not for a net without convolutions: nothing is skipped there)
        runs["private, weight grads kept"] = lambda: kept_model.train_step(kept, kept_opt, x, y, public=kept_pub)
        flip_model = copy.deepcopy(base)
        flip = flip_model.private_module()
        flip_opt, flip_pub = flip_model.optimizer(flip.parameters(), lr), flip_model.public_optimizer(lr)
        flip_model.train()

        def flipped():
            with _flipped_input_grads():
                flip_model.train_step(flip, flip_opt, x, y, public=flip_pub)
        runs["plain, flipped-conv input grads"] = flipped
    if family == "gan":  # the D step alone: the only part Opacus touches
        runs["private D"] = lambda: dp_model.d_step(private, dp_opt, x, y)
        runs["plain D"] = lambda: plain_model.d_step(plain, plain_opt, x, y)
        runs["private D, weight grads kept"] = lambda: kept_model.d_step(kept, kept_opt, x, y)
    dp_model.train(), plain_model.train(), kept_model.train()
    times = {k: [] for k in runs}
    order, rng = list(runs), random.Random(0)
    for i in range(reps + 2):
        rng.shuffle(order)  # a fixed order favoured some positions by ~5% (two identical steps: 0.94x)
        for name in order:
            t = _timed(runs[name])
            if i >= 2:  # warm-up
                times[name].append(t)
    assert sum(n for _, _, n in acc.history) == (reps + 2) * (2 if family == "gan" else 1)  # train_step + d_step
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
        if "private, weight grads kept" in t:
            kept = t["private, weight grads kept"]
            flip = t["plain, flipped-conv input grads"]
            line += (f"\n{'':<10} with the discarded weight gradients computed {kept * 1e3:7.1f} ms "
                     f"({kept / t['plain']:4.2f}x): skipping them {kept / t['private']:4.2f}x faster"
                     f"\n{'':<10} non-private with the same input-gradient conv {flip * 1e3:7.1f} ms: "
                     f"private / it {t['private'] / flip:4.2f}x")
        if "private D" in t:
            line += (f"\n{'':<10} D step alone: private {t['private D'] * 1e3:7.1f} ms  non-private "
                     f"{t['plain D'] * 1e3:7.1f} ms  ratio {t['private D'] / t['plain D']:4.2f}x; with the discarded "
                     f"weight gradients computed {t['private D, weight grads kept'] / t['plain D']:4.2f}x")
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
