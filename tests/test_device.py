"""Where a site trains (--device / node config device): refused clearly when the GPU is not there, and the DP
mechanism the accountant sees is the same on any device."""
from __future__ import annotations

import pytest
import torch

from client.data import load_dataset
from client.patient import train_private_patients
from client.site import SiteConfig
from client.trainer import train_private
from fedsynth.config import DEFAULT_DATA, RunConfig, resolve_device
from models import build_generator

HAS_GPU = torch.cuda.is_available()


def test_device_names_are_checked_where_they_are_written():
    with pytest.raises(ValueError, match="run config: device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        RunConfig(device="gpu")
    with pytest.raises(ValueError, match="node config: device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"):
        resolve_device("cuda:x", "node config")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if HAS_GPU else "cpu")


def test_a_gpu_the_node_does_not_have_is_refused_before_anything_is_read(tmp_path):
    node = {"data-path": str(tmp_path / "absent.npz"), "device": f"cuda:{torch.cuda.device_count()}"}
    with pytest.raises(ValueError, match=r"node config: device is 'cuda:\d+', but torch .* sees .* CUDA device"):
        SiteConfig.from_node_config(node, RunConfig())
    assert SiteConfig.from_node_config({**node, "device": "cpu"}, RunConfig()).device == "cpu"
    assert SiteConfig.from_node_config({"data-path": node["data-path"]}, RunConfig(device="cpu")).device == "cpu"


@pytest.mark.parametrize("trainer", [train_private, train_private_patients])
@pytest.mark.parametrize("family", ["vae", "gan", "diffusion"])
def test_auto_device_trains_the_same_steps_and_hands_back_cpu_weights(family, trainer):
    data = load_dataset(DEFAULT_DATA, "train")
    data = type(data)(data.images[:64], data.labels[:64], data.classes, data.source,
                      None if trainer is train_private else torch.arange(64).numpy() // 2)
    results, weights = [], []
    for device in ("cpu", "auto"):
        torch.manual_seed(0)  # the same initial weights for both
        model = build_generator(family, **RunConfig(model=family, width=8).model_kwargs())
        results.append(trainer(model, data, sigma=1.0, clip=1.0, sample_rate=0.25, steps=3, lr=1e-3, seed=1,
                               device=device))
        assert model.device.type == "cpu"  # shared, hashed and checked on the CPU whatever trained it
        weights.append(model.shared_weights())
    assert results[0].history == results[1].history == [(1.0, 0.25, 3)]  # what is accounted: device-blind
    if not HAS_GPU:  # same device twice: the same seed must give the very same weights
        assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    else:  # Opacus draws its noise on the GPU from its own stream: equal steps, different noise
        assert weights[0].keys() == weights[1].keys()
