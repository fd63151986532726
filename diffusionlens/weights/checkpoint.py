"""Loading and saving transformers-format DiffusionGemma checkpoints, and the weight plumbing that
`HookedGemma4CausalLM` (the autoregressive twin) shares: random init, reading safetensors shards,
assigning checkpoint tensors, config-derived buffers, the tokenizer, `generation_config.json`.

The one table below maps checkpoint names to ours. Weights are assigned shard by shard into a
model built on the meta device, so loading never holds a second full copy of the weights.
Only safetensors are read: pickled `.bin` checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from diffusionlens.config import DiffusionGemmaConfig
from diffusionlens.weights.device_map import (
    check_devices_exist,
    device_for_tensor,
    dispatch,
    plan_device_map,
    planning_dtype,
)

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

logger = logging.getLogger("diffusionlens")

# Our name → checkpoint name. The decoder owns every shared weight; the encoder owns only its
# `layer_scalar`s. Encoder copies of shared weights, when a checkpoint stores them, are aliases.
_TOP_LEVEL = {
    "decoder.embed.W_E": "model.decoder.embed_tokens.weight",
    "decoder.ln_final.weight": "model.decoder.norm.weight",
    "decoder.self_cond.pre_norm.weight": "model.decoder.self_conditioning.pre_norm.weight",
    "decoder.self_cond.mlp.": "model.decoder.self_conditioning.",
    "decoder.blocks.": "model.decoder.layers.",
    "encoder.blocks.": "model.encoder.language_model.layers.",
}
# Within a block, our name (or name prefix) → the checkpoint's; norms in the order the block applies them.
_BLOCK_NAMES = {
    "ln1.weight": "input_layernorm.weight",
    "ln1_post.weight": "post_attention_layernorm.weight",
    "ln2.weight": "pre_feedforward_layernorm.weight",
    "ln2_post_mlp.weight": "post_feedforward_layernorm_1.weight",
    "ln2_moe.weight": "pre_feedforward_layernorm_2.weight",
    "ln2_post_moe.weight": "post_feedforward_layernorm_2.weight",
    "ln2_post.weight": "post_feedforward_layernorm.weight",
    "attn.": "self_attn.",
    "mlp.": "mlp.",
    "moe.router_proj.": "router.proj.",
    "moe.router_scale": "router.scale",
    "moe.per_expert_scale": "router.per_expert_scale",
    "moe.gate_up_proj": "experts.gate_up_proj",
    "moe.down_proj": "experts.down_proj",
    "layer_scalar": "layer_scalar",
}
_ENCODER_ALIAS = re.compile(r"^model\.encoder\.language_model\.(?!layers\.\d+\.layer_scalar$)")
_TIED_HEAD = "lm_head.weight"
_SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def checkpoint_name(ours: str) -> str:
    """The transformers checkpoint name of one of our owned tensors."""
    for prefix, hf_prefix in _TOP_LEVEL.items():
        if ours == prefix or (prefix.endswith(".") and ours.startswith(prefix)):
            rest = ours[len(prefix) :]
            if not prefix.endswith("blocks."):
                return hf_prefix + rest
            layer, _, suffix = rest.partition(".")
            return f"{hf_prefix}{layer}.{block_checkpoint_name(suffix)}"
    raise KeyError(f"{ours} has no checkpoint name")


def block_checkpoint_name(suffix: str) -> str:
    """The checkpoint name, within one layer, of a block tensor (`"ln1.weight"` → `"input_layernorm.weight"`)."""
    for prefix, hf_prefix in _BLOCK_NAMES.items():
        if suffix.startswith(prefix):
            return hf_prefix + suffix[len(prefix) :]
    raise KeyError(f"block tensor {suffix} has no checkpoint name")


def owned_names(model: HookedDiffusionGemma) -> list[str]:
    """Our tensors a checkpoint stores: decoder parameters and every block's layer_scalar."""
    names = [n for n, _ in model.decoder.named_parameters(prefix="decoder")]
    names += [f"{stack}.blocks.{i}.layer_scalar" for stack in ("decoder", "encoder") for i in range(model.cfg.n_layers)]
    return sorted(set(names))


def checkpoint_names(model: HookedDiffusionGemma) -> dict[str, str]:
    """Checkpoint name → our name, for every tensor a checkpoint of this config must hold."""
    return {checkpoint_name(ours): ours for ours in owned_names(model)}


def canonical_name(name: str) -> str | None:
    """The decoder-owned checkpoint name a tensor stands for; None for the tied LM head."""
    if name == _TIED_HEAD:
        return None
    return _ENCODER_ALIAS.sub("model.decoder.", name)


class CheckpointError(ValueError):
    """A checkpoint does not match the config or cannot be read."""


# ---------------------------------------------------------------------- random weights
def init_random_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter of `model` in place, reproducibly from `seed`: norms and scales 1, every other
    weight normal(0, 0.02), drawn in `named_parameters` order on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln" in name or name.endswith("norm.weight") or "scale" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


# ---------------------------------------------------------------------- reading
def checkpoint_files(directory: Path, transformers_class: str = "DiffusionGemmaForBlockDiffusion") -> list[Path]:
    """The safetensors files of a checkpoint directory (its shards, or the one file); pickled weights are
    refused with the `transformers_class` call that converts them."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = _index_shards(index)
        for shard in shards:
            _check_inside(directory, shard, f"{index} names shard {shard!r}")
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(
                f"{index} names shard(s) that are not in {directory}: {', '.join(missing)}; "
                "download the complete checkpoint"
            )
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if single.exists():
        _check_inside(directory, single.name, f"{single}")
        return [single]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickled weights ({', '.join(pickles)}). diffusionlens never unpickles "
            "checkpoints; convert them once with transformers: "
            f"{transformers_class}.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"No model.safetensors or model.safetensors.index.json in {directory}")


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index's weight_map lists, each a string (checked before any is opened)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{index} is not a JSON object with a weight_map ({err}); download it again") from err
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard files, got {type(weight_map)}")
    bad = sorted({repr(v) for v in weight_map.values() if not isinstance(v, str) or not v})
    if bad:
        raise CheckpointError(f"{index} names shard(s) that are not file names: {', '.join(bad)}")
    return sorted(set(weight_map.values()))


def _check_inside(directory: Path, name: str, what: str) -> None:
    """Refuse a checkpoint file that lies outside `directory`: an absolute path, one that climbs out with
    `..`, or a symlink whose target is elsewhere (a Hugging Face cache snapshot's links into its own
    `blobs/` folder are allowed: that is how the hub cache stores every file)."""
    fix = (
        "a checkpoint reads only files inside its own directory; put the shard there and name it by its "
        "file name in model.safetensors.index.json"
    )
    relative = Path(name)
    if relative.is_absolute() or relative.drive or ".." in relative.parts:
        raise CheckpointError(f"{what}, a path outside the checkpoint directory {directory}; {fix}")
    root = directory.resolve()
    target = (directory / relative).resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        allowed.append(root.parent.parent / "blobs")
    if not any(target.is_relative_to(place) for place in allowed):
        raise CheckpointError(
            f"{what}, which resolves (through a symlink) to {target}, outside the checkpoint directory {root}; {fix}"
        )


def iter_safetensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `files`, one file open at a time (a bar from two files on)."""
    for path in tqdm(files, desc="loading shards", disable=not progress or len(files) < 2):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"Cannot read {path}: {err}. The file is truncated or corrupted.") from err


def _iter_module_state(source: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # Tied tensors appear once per name; aliasing (no copy) keeps a single copy in memory.
    yield from source.state_dict(keep_vars=False).items()


# Short names for checkpoints shipped inside the package.
SHIPPED_CHECKPOINTS = {
    "toy": Path(__file__).parents[1] / "toy" / "checkpoint",
    # the toy's autoregressive twin, a Gemma4ForCausalLM: load it with HookedGemma4CausalLM
    "toy-ar": Path(__file__).parents[1] / "toy" / "checkpoint_ar",
}


def _resolve_source(
    source: Any,
) -> tuple[DiffusionGemmaConfig, Iterator[tuple[str, torch.Tensor]] | None, Path | None]:
    """The config and either an in-memory model's tensors (no path) or a checkpoint directory (no tensors)."""
    if isinstance(source, nn.Module):
        return DiffusionGemmaConfig.from_hf(source.config), _iter_module_state(source), None
    if isinstance(source, str) and source in SHIPPED_CHECKPOINTS:
        source = SHIPPED_CHECKPOINTS[source]
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"The shipped checkpoint is missing from {source}; reinstall diffusionlens")
    path = Path(os.fspath(source))
    if not path.exists():
        _refuse_missing_local_path(source, path)
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model"]))
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    return DiffusionGemmaConfig.from_hf(path), None, path


def _refuse_missing_local_path(source: Any, path: Path) -> None:
    """Raise FileNotFoundError unless `source` (which names nothing on disk) can only be a hub id.

    A hub id is a str `org/name`. A Path, anything starting with `.`, `/` or `~`, with more than one
    separator, or whose first part is an existing local directory (`runs/my_ckpt` where `runs/` exists)
    is a local path with a typo: it must not be sent to the hub, where it would fail (or worse, match)."""
    text = str(source)
    looks_like_hub_id = isinstance(source, str) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text) is not None
    parent = path.parent
    if looks_like_hub_id and not parent.is_dir():
        return
    hint = ""
    if parent.is_dir():
        import difflib

        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=3)
        hint = f" Directories in {parent} with a similar name: {', '.join(near)}." if near else ""
        if looks_like_hub_id:
            hint += (
                f" (It is read as a local path because {parent}/ exists here; to load the hub repo {text!r}, "
                f"pass huggingface_hub.snapshot_download({text!r}).)"
            )
    raise FileNotFoundError(
        f"No checkpoint directory at {text!r} (resolved: {path.absolute()}); check the path.{hint} A hub id has "
        "the form 'org/name'."
    )


def load_pretrained(
    cls: type[HookedDiffusionGemma],
    source: str | Path | nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> HookedDiffusionGemma:
    """Load a checkpoint directory (single or sharded safetensors), a transformers model object, or a
    hub id (resolved with huggingface_hub when the string is not a local path; needs network).

    `device_map` ("auto" or {module: device}) and/or `max_memory` spread the blocks over several
    devices; see `diffusionlens.weights.device_map` (planned and checked before any tensor is read).

    A transformers model object is read where it sits: without `device`, ours is built on the device
    of its parameters and aliases them (no copy) when `dtype` matches too."""
    cfg, tensors, directory = _resolve_source(source)
    if device is None and device_map is None and isinstance(source, torch.nn.Module):
        device = next(source.parameters()).device
    placement = _plan_placement(cfg, source, directory, dtype, device, device_map, max_memory)
    if directory is not None:
        tensors = iter_safetensors(checkpoint_files(directory), progress)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = cls(cfg)
    assign_checkpoint(
        model,
        tensors,
        checkpoint_names(model),
        dtype=dtype,
        device_for=lambda ours: device if placement is None else device_for_tensor(placement, ours),
    )
    model.tie_weights()
    materialize_derived_buffers(model, device)
    if placement is not None:
        dispatch(model, placement)
    model.setup()
    attach_tokenizer(model, directory)
    return model.eval().requires_grad_(False)


def assign_checkpoint(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    by_checkpoint_name: dict[str, str],
    *,
    dtype: torch.dtype | None,
    device_for: Callable[[str], torch.device],
) -> None:
    """Assign each checkpoint tensor to the meta-built `model` where `by_checkpoint_name` (checkpoint
    name → ours) puts it, as `dtype` (None: as stored) on `device_for(our name)`.

    The tied LM head and vision-tower tensors are skipped, and so is an encoder copy of a weight the
    decoder already supplied. Every missing, unexpected or mis-shaped tensor is named in one
    CheckpointError, before the model is used."""
    targets = {n: t for n, t in _named_tensors(model) if n in set(by_checkpoint_name.values())}
    loaded: set[str] = set()
    unexpected, mismatched, skipped = [], [], 0
    for hf_name, tensor in tensors:
        if hf_name.startswith(_SKIPPED_PREFIXES):
            skipped += 1
            continue
        canonical = canonical_name(hf_name)
        if canonical is None:
            continue
        ours = by_checkpoint_name.get(canonical)
        if ours is None:
            unexpected.append(hf_name)
            continue
        if ours in loaded and canonical != hf_name:
            continue  # an encoder alias of a weight the decoder already supplied
        if tuple(tensor.shape) != tuple(targets[ours].shape):
            mismatched.append(f"{hf_name}: checkpoint {tuple(tensor.shape)} vs config {tuple(targets[ours].shape)}")
            continue
        assign_tensor(model, ours, tensor.to(device=device_for(ours), dtype=dtype or tensor.dtype))
        loaded.add(ours)
    if skipped:
        logger.info("Skipped %d vision-tower tensors: diffusionlens is text-only.", skipped)
    checkpoint_name_of = {ours: hf for hf, ours in by_checkpoint_name.items()}
    missing = [checkpoint_name_of[m] for m in sorted(set(targets) - loaded)]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_abbrev(unexpected)}")
    if mismatched:
        problems.append(f"tensors whose shape does not match config.json ({len(mismatched)}): {_abbrev(mismatched)}")
    if problems:
        raise CheckpointError(
            "Checkpoint and config do not match: " + "; ".join(problems) + ". Check that config.json belongs to "
            "these weights."
        )


def attach_tokenizer(model: nn.Module, directory: Path | None) -> None:
    """Give `model` the tokenizer saved in `directory` (if it holds a tokenizer.json)."""
    if directory is not None and (directory / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(str(directory))


def _plan_placement(cfg, source, directory, dtype, device, device_map, max_memory) -> dict | None:
    if device_map is None and max_memory is None:
        if device is not None:
            check_devices_exist([device])
        return None
    if device is not None:
        raise ValueError("pass either device or device_map/max_memory, not both")
    if isinstance(source, nn.Module):
        checkpoint_config = {"dtype": str(next(source.parameters()).dtype).removeprefix("torch.")}
    else:
        checkpoint_config = json.loads((directory / "config.json").read_text())
    return plan_device_map(cfg, device_map or "auto", max_memory, planning_dtype(dtype, checkpoint_config))


def _abbrev(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … and {len(names) - limit} more" if len(names) > limit else "")


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of `model`'s parameter (frozen) or buffer `name`, without copying it."""
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def materialize_derived_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute config-derived buffers (RoPE frequencies, embedding scale) that meta init left empty."""
    for module in model.modules():
        if hasattr(module, "derived_buffers"):
            for name, value in module.derived_buffers().items():
                module._buffers[name] = value.to(device)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not like '5GB', '500MB' or an int of bytes")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[match.group(2).upper()])


def save_pretrained(model: HookedDiffusionGemma, directory: str | Path, *, max_shard_size: int | str = "5GB") -> None:
    """Write transformers-format safetensors (sharded above `max_shard_size`) and config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tensors = dict(_named_tensors(model))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for hf, ours in sorted(checkpoint_names(model).items()):
        tensor = tensors[ours].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][hf] = tensor
        size += nbytes
    write_config_files(directory, model.cfg.to_hf(), model.cfg, model.dtype)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))


def write_config_files(directory: Path, config: dict[str, Any], cfg: DiffusionGemmaConfig, dtype: torch.dtype) -> None:
    """`config.json` (the transformers `config` with the weights' `dtype`) and `generation_config.json`
    with `cfg`'s special tokens: transformers' generate reads eos/pad from there (its model config alone
    leaves them unset)."""
    config = {**config, "dtype": str(dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    special = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id}
    eos = cfg.eos_token_ids
    special["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    (directory / "generation_config.json").write_text(json.dumps(special, indent=2, sort_keys=True))
