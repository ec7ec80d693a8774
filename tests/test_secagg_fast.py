"""client/secagg_fast.py and server/secagg_unmask.py against Flower's own SecAgg+ code run with fedsynth's
mask generator: the same masked values and aggregate, bit for bit; the generator itself (the whole seed
counts, unlike Flower's 32-bit fold); and a real simulation whose secure aggregate is the plain FedAvg mean."""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _collect_masked_vectors,
    _setup,
    _share_keys,
)
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from client.secagg_fast import collect_masked_vectors
from fedsynth.secagg_masks import prg_uint32
from server.secagg_unmask import unmasked_average

SHAPES = [(64, 33), (33,), (2, 3, 5, 7), (), (1,)]


def fedsynth_prg_as_flowers(seed: bytes, num_range: int, shapes) -> list[np.ndarray]:
    """fedsynth's mask generator in the shape of Flower's ``pseudo_rand_gen`` (int64 arrays, one per shape, drawn
    back to back): Flower's reference arithmetic below runs with it in place of its own generator."""
    flat = prg_uint32(seed, num_range, sum(int(np.prod(s)) for s in shapes)).astype(np.int64)
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[at:at + size].reshape(shape))
        at += size
    return out


@pytest.fixture
def flower_with_fedsynth_masks(monkeypatch):
    # the module, not the function of the same name that flwr.client.mod.secure_aggregation re-exports
    monkeypatch.setattr(sys.modules[_collect_masked_vectors.__module__], "pseudo_rand_gen", fedsynth_prg_as_flowers)


def keyed_nodes(n: int, mod_range: int, max_weight: float = 1.0) -> dict[int, SecAggPlusState]:
    """n nodes through Flower's real setup and share-keys stages (real key pairs, real Shamir shares)."""
    states = {nid: SecAggPlusState() for nid in range(1, n + 1)}
    for nid, state in states.items():
        state.nid = nid
        _setup(state, ConfigRecord({Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: n, Key.THRESHOLD: 2,
                                    Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2 ** 22,
                                    Key.MOD_RANGE: mod_range, Key.MAX_WEIGHT: max_weight}))
    keys = ConfigRecord({str(nid): [s.pk1, s.pk2] for nid, s in states.items()})
    outbox = {nid: _share_keys(s, copy.deepcopy(keys)) for nid, s in states.items()}
    for nid, state in states.items():  # what the server forwards to each node in the next stage
        state.inbox = ConfigRecord({
            Key.CIPHERTEXT_LIST: [c for src, out in outbox.items() for dst, c in
                                  zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST]) if dst == nid],
            Key.SOURCE_LIST: [src for src, out in outbox.items() for dst in out[Key.DESTINATION_LIST] if dst == nid]})
    return states


def update(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(rng.standard_normal(s) * 3, dtype=np.float32) for s in SHAPES]
    arrays[0][0, :4] = [9.5, -9.5, 8.0, -8.0]  # outside and on the clipping range
    return arrays


@pytest.mark.parametrize("mod_range,weight,max_weight", [(2 ** 32, 1, 1.0), (2 ** 24, 3, 10.0)])
def test_masked_vectors_are_flowers_bit_for_bit(mod_range, weight, max_weight, flower_with_fedsynth_masks):
    states = keyed_nodes(3, mod_range, max_weight)
    for nid, state in states.items():
        params = ndarrays_to_parameters(update(nid))
        np.random.seed(100 + nid)  # the stochastic rounding draws from numpy's global RNG, as in Flower
        their_state, mine_state = copy.deepcopy(state), copy.deepcopy(state)
        theirs = _collect_masked_vectors(their_state, copy.deepcopy(state.inbox), weight, params)
        np.random.seed(100 + nid)
        mine = collect_masked_vectors(mine_state, copy.deepcopy(state.inbox), weight, params)
        a = [bytes_to_ndarray(b) for b in theirs[Key.MASKED_PARAMETERS]]
        b = [bytes_to_ndarray(b) for b in mine[Key.MASKED_PARAMETERS]]
        assert [x.shape for x in b] == [x.shape for x in a] == [(1,), *SHAPES]
        assert all(x.dtype == np.int64 for x in a) and all(x.dtype == np.uint32 for x in b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y.astype(np.int64))
        assert max(int(x.max()) for x in b) > 2 ** 20  # masked: not the small quantized values themselves
        # the neighbours' decrypted key shares are kept for the unmask stage, exactly as Flower keeps them
        assert mine_state.rd_seed_share_dict == their_state.rd_seed_share_dict and len(mine_state.rd_seed_share_dict) == 3
        assert mine_state.sk1_share_dict == their_state.sk1_share_dict


@pytest.mark.parametrize("mod_range", [2 ** 32, 2 ** 24])
def test_unmasked_average_is_flowers_unmasking_cast_to_float32(mod_range, flower_with_fedsynth_masks):
    """Sites 1 and 2 send masked vectors (Flower's own client code), site 3 drops out after the key exchange:
    the server removes 1's and 2's private masks and rebuilds 3's pairwise masks. Flower's unmask arithmetic
    (its own functions, in the order of SecAggPlusWorkflow.unmask_stage) cast to float32 must equal ours."""
    states = keyed_nodes(3, mod_range)
    sent = {}
    for nid in (1, 2):
        np.random.seed(nid)
        out = _collect_masked_vectors(copy.deepcopy(states[nid]), copy.deepcopy(states[nid].inbox), 1,
                                      ndarrays_to_parameters(update(nid)))
        sent[nid] = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]
    masked = parameters_mod(parameters_addition(sent[1], sent[2]), mod_range)
    dead = states[3]
    pairwise = [(generate_shared_key(bytes_to_private_key(dead.sk1), bytes_to_public_key(states[o].pk1)), 3 > o)
                for o in (1, 2)]
    # Flower 1.42's unmask_stage, step by step
    theirs = masked
    for nid in (1, 2):
        theirs = parameters_subtraction(theirs, fedsynth_prg_as_flowers(states[nid].rd_seed, mod_range,
                                                                        [a.shape for a in theirs]))
    for key, add in pairwise:
        mask = fedsynth_prg_as_flowers(key, mod_range, [a.shape for a in theirs])
        theirs = parameters_addition(theirs, mask) if add else parameters_subtraction(theirs, mask)
    factor, recon = factor_extract(parameters_mod(theirs, mod_range))
    theirs = dequantize(recon, 8.0, 2 ** 22)
    for vec in theirs:
        vec += -(2 - 1) * 8.0
        vec *= 2 ** 22 / factor
    mine = unmasked_average([np.asarray(a, dtype=np.uint32) for a in masked],
                            [states[1].rd_seed, states[2].rd_seed], pairwise, mod_range, 8.0, 2 ** 22, 2)
    for t, m in zip(theirs, mine):
        assert m.dtype == np.float32 and m.shape == np.shape(t)
        if np.ndim(t):  # Flower leaves a 0-d array un-offset and unscaled (``vec += offset`` rebinds a scalar)
            np.testing.assert_array_equal(t.astype(np.float32), m)
    exact = [(np.clip(a, -8, 8).astype(np.float64) + np.clip(b, -8, 8)) / 2 for a, b in zip(update(1), update(2))]
    assert max(float(np.abs(m - e).max()) for m, e in zip(mine, exact)) < 16 / 2 ** 22  # one quantization step


def test_masks_depend_on_the_whole_seed_where_flowers_depend_on_32_bits():
    """Two seeds with the same XOR of their 4-byte words: Flower's generator gives both the same mask (a
    server can search its 2**32 seeds); fedsynth's gives unrelated ones, and is deterministic per seed."""
    seed = os.urandom(32)
    swapped = seed[4:8] + seed[:4] + seed[8:]  # same words, another order: same 32-bit fold
    assert swapped != seed
    np.testing.assert_array_equal(pseudo_rand_gen(seed, 2 ** 32, [(1000,)])[0],
                                  pseudo_rand_gen(swapped, 2 ** 32, [(1000,)])[0])
    ours, again, other = (prg_uint32(s, 2 ** 32, 1000) for s in (seed, seed, swapped))
    np.testing.assert_array_equal(ours, again)
    assert np.mean(ours == other) < 0.01


@pytest.mark.parametrize("mod_range", [2 ** 32, 2 ** 16, 2 ** 8])
def test_masks_are_uniform_residues(mod_range):
    mask = prg_uint32(bytes(range(44)), mod_range, 200_000)  # 44 bytes: like a Fernet-encoded shared key
    assert mask.dtype == np.uint32 and mask.flags.writeable and int(mask.max()) < mod_range
    assert abs(float(mask.mean()) / (mod_range - 1) - 0.5) < 0.01
    if mod_range == 2 ** 8:  # every residue, the top one included (Flower's randint never draws mod − 1)
        assert len(np.unique(mask)) == mod_range
    with pytest.raises(ValueError, match="power of two"):
        prg_uint32(b"x" * 32, 3 * 2 ** 20, 4)


def test_real_simulation_secure_aggregate_matches_plain_mean(tmp_path):
    """Flower's Simulation Engine, 3 sites: plain FedAvg, stock SecAgg+, fedsynth's SecAgg+ and its deltas wire
    format side by side (simulations/bench_secagg.py). Every mode's aggregate is within SecAgg+'s quantization step (16/2**22 ≈
    3.8e-6) of the exact float64 mean; fedsynth's keeps the model float32 and sends half the bytes of stock."""
    from simulations.bench_secagg import main
    import json
    out = tmp_path / "out.json"
    main(["--sites", "3", "--params", "20000", "--rounds", "2", "--json", str(out)])
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert rows["plain"]["max-abs-error"] < 1e-7
    for mode in ("stock", "fedsynth"):
        assert 0 < rows[mode]["max-abs-error"] < 16 / 2 ** 22, mode
    assert rows["fedsynth"]["aggregate-dtype"] == "float32" and rows["stock"]["aggregate-dtype"] == "float64"
    n = rows["plain"]["parameters"]
    assert rows["stock"]["bytes-sent-per-site-round"] > 8 * n  # int64 masked vectors
    assert 4 * n < rows["fedsynth"]["bytes-sent-per-site-round"] < 4 * n * 1.05  # uint32: as small as float32
    # deltas: ±2 in 16384 levels for 3 sites (server/server_app.py), uint16 on the wire
    assert 0 < rows["fedsynth-deltas"]["max-abs-error"] < 4 / 16384
    assert 2 * n < rows["fedsynth-deltas"]["bytes-sent-per-site-round"] < 2 * n * 1.1
    assert rows["fedsynth-deltas"]["aggregate-dtype"] == "float32"


def test_secagg_deltas_run_config_reaches_the_workflow_and_the_sites():
    """The run config's key is the one the site's mod reads; the server's workflow then uses a 16-bit modulus
    whose sum over the sampled sites can't wrap."""
    from client.secagg_fast import DELTAS_KEY
    from fedsynth.config import RunConfig
    from server.server_app import secure_fit_workflow

    assert RunConfig(secagg_deltas=True).to_flower()[DELTAS_KEY] is True
    assert RunConfig().to_flower()[DELTAS_KEY] is False
    for sampled, levels in ((2, 2 ** 14), (5, 2 ** 13), (100, 2 ** 9)):
        workflow, _ = secure_fit_workflow(sampled, deltas=True)
        assert workflow.deltas and workflow.modulus_range == 2 ** 16 and workflow.clipping_range == 2.0
        assert workflow.quantization_range == levels and sampled * levels < 2 ** 16 <= sampled * 2 * levels
    plain, _ = secure_fit_workflow(5)
    assert not plain.deltas and plain.modulus_range == 2 ** 32 and plain.quantization_range == 2 ** 22


def test_a_delta_outside_the_clipping_range_is_refused():
    from client.secagg_fast import update_minus_reference
    ref = [np.zeros(3, np.float32)]
    np.testing.assert_array_equal(update_minus_reference([np.array([1.0, -1.5, 0], np.float32)], ref, 2.0)[0],
                                  [1.0, -1.5, 0])
    with pytest.raises(ValueError, match=r"reaches 2.*clipping range ±2; nothing sent"):
        update_minus_reference([np.array([0, 2.0, 0], np.float32)], ref, 2.0)


def test_cli_flag_sets_the_run_config_option():
    from fedsynth.cli import build_parser
    assert build_parser().parse_args(["simulate", "--secagg-deltas"]).secagg_deltas is True
    assert build_parser().parse_args(["simulate"]).secagg_deltas is False
