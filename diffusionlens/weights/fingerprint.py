"""A model's fingerprint: which config, weights and dtype produced a trace, so a replay on another
model is refused instead of returning other logits without a word.

The fingerprint is a digest of the architecture config plus a cheap digest of the weights: every
checkpoint tensor's name, dtype and shape, and `SAMPLE` of its values spread evenly over it (read
exactly, so the same weights give the same digest on any device). It is computed once per model and
remembered beside it; the cache is keyed by the identity, storage and version counter of every weight, so an
in-place edit (`copy_`, `load_state_dict`, `W[...] = 0`) or a replaced tensor recomputes it. Weights
that differ only at values the sample skips give the same digest (see docs/guarantees.md).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

#: values read from each weight tensor (all of them when it has fewer)
SAMPLE = 4096
# Per model, kept beside it rather than on it (a model must stay picklable, weak references are not):
# its weight names, and its config and weight digests with what they were computed from.
_MEMO: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
# config fields kept only to write transformers' config.json back; they do not change what the model computes
_NOT_ARCHITECTURE = ("extra_hf_config", "extra_hf_text_config")


def model_fingerprint(model: HookedDiffusionGemma) -> dict[str, str]:
    """`{"config": …, "weights": …, "dtype": …}` of `model`: hex digests of its config and weights and
    its dtype. Equal fingerprints mean the same config and (up to the sampled values) the same weights."""
    config_digest = _config_digest(model)
    tensors = _weights(model)
    key = _version_key(tensors)
    memo = _MEMO.setdefault(model, {})
    cached = memo.get("weights")
    if key is not None and cached is not None and _same_key(cached[0], key):
        weights_digest = cached[1]
    else:
        weights_digest = _weights_digest(tensors)
        if key is not None:
            memo["weights"] = (key, weights_digest)
    return {"config": config_digest, "weights": weights_digest, "dtype": str(model.dtype).removeprefix("torch.")}


def _config_digest(model: HookedDiffusionGemma) -> str:
    memo = _MEMO.setdefault(model, {})
    cached = memo.get("config")
    if cached is not None and cached[0] is model.cfg:  # a config is frozen: the same object, the same digest
        return cached[1]
    config = {k: v for k, v in asdict(model.cfg).items() if k not in _NOT_ARCHITECTURE}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    memo["config"] = (model.cfg, digest)
    return digest


def fingerprint_mismatch(recorded: dict[str, str], model: HookedDiffusionGemma) -> str | None:
    """What differs between a recorded fingerprint and `model`'s ("its weights", …), or None."""
    current = model_fingerprint(model)
    if recorded == current:
        return None
    if recorded.get("config") != current["config"]:
        return "its config differs (another architecture or size)"
    if recorded.get("dtype") != current["dtype"]:
        return f"its dtype differs (the trace was made in {recorded.get('dtype')}, this model is {current['dtype']})"
    return "its weights differ (same config, other weights)"


def _weights(model: HookedDiffusionGemma) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors, looked up afresh (a replaced module or tensor is seen); their names are
    fixed by the architecture, so they are listed once per model."""
    memo = _MEMO.setdefault(model, {})
    names = memo.get("names")
    if names is None:
        from diffusionlens.weights.checkpoint import owned_names

        names = [(name, name.split(".")) for name in owned_names(model)]
        memo["names"] = names
    tensors = []
    for name, (*path, attr) in names:
        owner = model
        for part in path:
            owner = owner._modules[part]  # Module.get_submodule's checks cost ~10x this walk
        tensor = owner._parameters.get(attr)
        tensors.append((name, owner._buffers[attr] if tensor is None else tensor))
    return tensors


def _version_key(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[Any, int, int]] | None:
    """Each weight's identity (weakly held), storage address and version counter; None when a weight is
    an inference tensor, which keeps no version counter (its digest is then never cached)."""
    try:
        return [(weakref.ref(t), t.data_ptr(), t._version) for _, t in tensors]
    except RuntimeError:
        return None


def _same_key(old: list[tuple[Any, int, int]], new: list[tuple[Any, int, int]]) -> bool:
    return len(old) == len(new) and all(a[0]() is b[0]() and a[1:] == b[1:] for a, b in zip(old, new, strict=True))


def _weights_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // SAMPLE)
            values = flat[::stride][:SAMPLE].cpu().contiguous()  # a strided view: no gather kernel
            digest.update(f"{name}|{values.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
