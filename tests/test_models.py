"""Every generator family behind the one interface: Opacus accepts its private part, weights round-trip,
sampling is seeded, and the registry / CLI / run config agree on the families and their knobs."""
from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fedsynth.cli import _lr, build_parser
from fedsynth.config import RunConfig
from models import FAMILIES, build_generator

FAMILY_NAMES = sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_opacus_validator_accepts_the_private_module(family):
    model = build_generator(family, **RunConfig(model=family).model_kwargs())
    ModuleValidator.validate(model.private_module(), strict=True)  # raises on BatchNorm, buffers, ...
    assert not list(model.private_module().buffers())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shared_weights_round_trip_and_sampling_is_seeded(family):
    torch.manual_seed(0)
    a = build_generator(family, **RunConfig(model=family).model_kwargs())
    torch.manual_seed(1)
    b = build_generator(family, **RunConfig(model=family).model_kwargs())
    b.load_shared_weights(a.shared_weights())
    labels = torch.tensor([0, 1, 0])
    xa = a.sample(3, labels, generator=torch.Generator().manual_seed(7))
    xb = b.sample(3, labels, generator=torch.Generator().manual_seed(7))
    assert xa.shape == (3, 1, 28, 28) and torch.equal(xa, xb) and 0 <= xa.min() and xa.max() <= 1
    assert all(v.dtype.name == "float32" for v in a.shared_weights().values())


def test_registry_passes_each_family_only_its_own_knobs():
    kwargs = RunConfig(n_critic=3, noise_multiplicity=2, sampler_steps=5, latent_dim=6).model_kwargs()
    assert build_generator("gan", **kwargs).n_critic == 3
    diffusion = build_generator("diffusion", **kwargs)
    assert (diffusion.k, diffusion.sampler_steps) == (2, 5)
    assert build_generator("vae", **kwargs).latent_dim == 6
    with pytest.raises(ValueError, match="unknown family 'flow'"):
        build_generator("flow")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cli_offers_every_family_with_its_own_learning_rate(family):
    args = build_parser().parse_args(["simulate", "--model", family])
    assert _lr(args) == dict(zip(("lr", "lr_final"), FAMILIES[family].default_lr))
    RunConfig(model=family, **_lr(args))  # a valid config
    args = build_parser().parse_args(["simulate", "--model", family, "--lr", "1e-5"])
    assert _lr(args) == {"lr": 1e-5, "lr_final": 1e-5}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_an_empty_poisson_batch_is_still_one_dp_step(family):
    """Poisson sampling can draw no image: the step still runs (noise only) and is charged once."""
    from client.trainer import dp_parts

    model = build_generator(family, **RunConfig(model=family).model_kwargs())
    private, optimizer, acc = dp_parts(model, sigma=1.0, clip=1.0, sample_rate=0.1, expected_batch_size=5, lr=1e-3)
    before = [p.detach().clone() for p in model.private_module().parameters()]
    model.train().train_step(private, optimizer, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long),
                             public=model.public_optimizer(1e-3))
    assert acc.history == [(1.0, 0.1, 1)]
    assert any(not torch.equal(a, p) for a, p in zip(before, model.private_module().parameters()))  # noise


def test_the_server_side_imports_leave_opacus_out():
    """Opacus calls logging.basicConfig when imported, which hides the ServerApp's own round lines in a
    deployment's log; the ServerApp builds models (samples, class priors), so neither may import Opacus."""
    import subprocess
    import sys
    code = "import sys, server.server_app, models; print(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
