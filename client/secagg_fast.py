"""Flower's ``secaggplus_mod`` with a faster, smaller, safer 'collect masked vectors' stage (same protocol).

What Flower 1.42 does in that stage (``flwr.client.mod.secure_aggregation.secaggplus_mod._collect_masked_vectors``):
decrypt the key shares, scale the update by the weight, clip and stochastically round it to integers
(``quantize``), prepend the weight factor, add the private mask and one pairwise mask per neighbour (numpy
MT19937 seeded with a 32-bit fold of each seed, ``randint(0, mod_range - 1, shape, dtype=int64)`` per array),
reduce mod ``mod_range``, and send every array as **int64** — 8 bytes per parameter, twice a float32 model —
after ~10 passes of int64 arithmetic over each array, and the rounding step does a boolean-mask scatter.

What this does instead (``mod_range`` must be a power of two ≤ 2**32; Flower's default is 2**32): the same
steps on one flat **uint32** vector. uint32 arithmetic wraps mod 2**32, a multiple of ``mod_range``, so after the
final ``& (mod_range - 1)`` every value is what Flower's arithmetic gives with the same masks. The masks come
from ``fedsynth.secagg_masks.prg_uint32`` — ChaCha20 keyed by the whole seed, not Flower's 32-bit fold, which
a curious server can search (see that module) — and the server's unmasking (``server/secagg_unmask.py``) draws
the same ones. The stochastic rounding draws the same ``np.random.rand`` numbers per array in the same order
and compares them with the same float64 differences, subtracting the comparison (0/1) instead of scattering.
The masked values go out as uint32 (4 bytes). ``tests/test_secagg_fast.py`` checks the masked values bit for
bit against Flower's own function run with the same mask generator, and end to end in a real simulation.

Nothing else about the protocol changes: same keys, key agreement, shares, threshold and modulus; the server
still sees only masked vectors. A modulus above 2**32 (not a Flower default) is refused.

With the fit config's ``secagg-deltas`` (run config ``secagg-deltas``; server/server_app.py picks a 16-bit
modulus for it) the site masks its update minus the global model it received, refusing to send if any value
would be clipped; the server adds the global model back after unmasking (server/secure_workflow.py). With a
modulus ≤ 2**16 the masked values travel as uint16.
"""
from __future__ import annotations

from logging import DEBUG, WARNING
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, check_configs, check_stage
from flwr.common import Parameters, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore import log
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedsynth.secagg_masks import UINT32_MODULUS, apply_pairwise_masks, prg_uint32, wire_dtype


def fast_secaggplus_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """``secaggplus_mod``, with :func:`masked_vectors` in the 'collect masked vectors' stage."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if (msg.metadata.message_type != MessageType.TRAIN or configs is None
            or configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS):
        return secaggplus_mod(msg, ctxt, call_next)
    # The same bookkeeping as secaggplus_mod for this stage (state in, stage checks, fit, state out).
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    reference = (parameters_to_ndarrays(fitins.parameters) if fitins.config.get(DELTAS_KEY, False) else None)
    state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
    check_stage(state.current_stage, configs)
    state.current_stage = cast(str, configs.pop(Key.STAGE))
    check_configs(state.current_stage, configs)
    out_content = call_next(msg, ctxt).content
    fitres = compat.recorddict_to_fitres(out_content, keep_input=True)
    res = collect_masked_vectors(state, configs, fitres.num_examples, fitres.parameters, reference)
    for arr_record in out_content.array_records.values():
        arr_record.clear()
    ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
    out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)
    return Message(out_content, reply_to=msg)


def collect_masked_vectors(state: SecAggPlusState, configs: ConfigRecord, num_examples: int,
                           updated_parameters: Parameters, reference: list[np.ndarray] | None = None) -> dict:
    """Flower's ``_collect_masked_vectors`` (same checks, same key shares kept), masking with
    :func:`masked_vectors`. With ``reference`` (the global model this round started from), the update minus
    the reference is masked instead (the server adds the reference back to the unmasked mean)."""
    log(DEBUG, "Node %d: starting stage 2...", state.nid)
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    srcs = cast(list[int], configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < state.threshold:
        raise ValueError("Not enough available neighbour clients.")
    available: list[int] = []
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        actual_src, dst, rd_seed_share, sk1_share = share_keys_plaintext_separate(
            decrypt(state.ss2_dict[src], ciphertext))
        available.append(src)
        if src != actual_src:
            raise ValueError(f"Node {state.nid}: received ciphertext from {actual_src} instead of {src}.")
        if dst != state.nid:
            raise ValueError(f"Node {state.nid}: received an encrypted messagefor Node {dst} from Node {src}.")
        state.rd_seed_share_dict[src] = rd_seed_share
        state.sk1_share_dict[src] = sk1_share
    ratio = num_examples / state.max_weight
    if ratio > 1:
        log(WARNING, "Potential overflow warning: the provided weight (%s) exceeds the specified max_weight (%s). "
            "This may lead to overflow issues.", num_examples, state.max_weight)
    pairwise = [(generate_shared_key(bytes_to_private_key(state.sk1),
                                     bytes_to_public_key(state.public_keys_dict[nid][0])), state.nid > nid)
                for nid in available]
    update = parameters_to_ndarrays(updated_parameters)
    if reference is not None:
        update = update_minus_reference(update, reference, state.clipping_range)
    arrays = masked_vectors(update, ratio, state.clipping_range,
                            state.target_range, state.mod_range, state.rd_seed, pairwise)
    log(DEBUG, "Node %d: stage 2 completed, uploading masked parameters...", state.nid)
    return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in arrays]}


def masked_vectors(parameters: list[np.ndarray], ratio: float, clipping_range: float, target_range: int,
                   mod_range: int, private_seed: bytes, pairwise: list[tuple[bytes, bool]]) -> list[np.ndarray]:
    """[weight factor, *masked quantized arrays] as uint32 (uint16 if ``mod_range`` ≤ 2**16), equal value for
    value to Flower's int64 ones.

    ``pairwise``: (shared key with a neighbour, True to add its mask / False to subtract it), in Flower's order.
    """
    if mod_range > UINT32_MODULUS or mod_range & (mod_range - 1):
        raise ValueError(f"SecAgg+ modulus_range must be a power of two ≤ 2**32, got {mod_range}")
    q_ratio = round(ratio * target_range)
    dq_ratio = q_ratio / target_range
    quantizer = target_range / (2 * clipping_range)
    shapes = [()] + [np.shape(a) for a in parameters]  # the factor goes first, as a 1-element array
    sizes = [1] + [int(np.prod(s)) for s in shapes[1:]]
    flat = np.empty(sum(sizes), dtype=np.uint32)
    flat[0] = q_ratio
    at = 1
    for arr, size in zip(parameters, sizes[1:]):
        # Flower's quantize(): the same float ops, the same random numbers, the same comparison.
        pre = (np.clip(np.asarray(arr) * dq_ratio, -clipping_range, clipping_range) + clipping_range) * quantizer
        pre = np.asarray(pre).reshape(-1)
        ceil = np.ceil(pre).astype(np.int32)
        rand = np.asarray(np.random.rand(*np.shape(arr))).reshape(-1)
        ceil -= rand < ceil - pre
        flat[at:at + size] = ceil
        at += size
    flat += prg_uint32(private_seed, mod_range, flat.size)
    apply_pairwise_masks(flat, pairwise, mod_range)
    flat = flat.astype(wire_dtype(mod_range), copy=False)  # uint16 when the modulus allows it
    out, at = [flat[:1].copy()], 1
    for shape, size in zip(shapes[1:], sizes[1:]):
        out.append(flat[at:at + size].reshape(shape))
        at += size
    return out



DELTAS_KEY = "secagg-deltas"  # fit config: mask (update − global model) instead of the update itself


def update_minus_reference(update: list[np.ndarray], reference: list[np.ndarray],
                           clipping_range: float) -> list[np.ndarray]:
    """The float32 difference, refused (nothing is sent) if any value would be clipped: a clipped delta would
    silently bias the average."""
    if [np.shape(a) for a in update] != [np.shape(r) for r in reference]:
        raise ValueError("SecAgg+ deltas: the update's array shapes differ from the global model's; nothing sent")
    deltas = [np.asarray(a, dtype=np.float32) - np.asarray(r, dtype=np.float32) for a, r in zip(update, reference)]
    worst = max((float(np.abs(d).max()) for d in deltas if d.size), default=0.0)
    if not worst < clipping_range:
        raise ValueError(f"SecAgg+ deltas: update − global model reaches {worst:.4g}, outside the clipping range "
                         f"±{clipping_range:g}; nothing sent")
    return deltas
