"""Placing one model's blocks across several devices, planned with accelerate.

The decoder stack owns every weight; each encoder block uses its decoder twin's parameters (only
`layer_scalar` differs, see `HookedDiffusionGemma.tie_weights`). Plans are therefore made on the
decoder alone, with accelerate's `infer_auto_device_map` / `get_balanced_memory`, and each encoder
module follows its decoder twin. The embedding, self-conditioning and final norm share one device
(the "main" device): the LM head is the tied embedding, so the final norm's output must meet it
there. Activations cross devices at block boundaries through accelerate's `AlignDevicesHook`,
which moves a block's inputs (residual, RoPE tables, masks, prompt keys/values) to its device.

Everything here is decided before a tensor is read: a map naming modules that do not exist, leaving
weights unplaced, or a `max_memory` too small for the weights is refused up front.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffusionlens.components.sampler_hooks import SamplerHooks
from diffusionlens.components.stacks import DecoderStack, EncoderStack
from diffusionlens.config import DiffusionGemmaConfig

if TYPE_CHECKING:
    from diffusionlens.model import HookedDiffusionGemma

Device = int | str
# Units that are placed whole. Embedding, self-conditioning and the final norm follow the main device.
MAIN_UNITS = ("decoder.embed", "decoder.self_cond", "decoder.ln_final")
NO_SPLIT_CLASSES = ["Block", "SelfConditioning", "Embed", "RMSNorm"]
GB = 1e9


class DeviceMapError(ValueError):
    """A device map or memory budget that cannot hold the model."""


def placement_units(cfg: DiffusionGemmaConfig) -> list[str]:
    """The decoder modules a device map assigns, each placed whole (the encoder follows)."""
    return [*MAIN_UNITS, *(f"decoder.blocks.{i}" for i in range(cfg.num_hidden_layers))]


@functools.lru_cache(maxsize=2)  # a plan sizes the same meta tree several times; never mutated
def empty_module_tree(cfg: DiffusionGemmaConfig) -> nn.Module:
    """HookedDiffusionGemma's module tree (encoder, decoder, sampler hooks) on the meta device, from the
    stacks the model is built of: planning names and sizes units without importing the model, which
    loads checkpoints through this module (a test checks the two trees have the same module names)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        tree = nn.Module()
        tree.encoder = EncoderStack(cfg)
        tree.decoder = DecoderStack(cfg)
        tree.sampler = SamplerHooks()
    return tree


def unit_bytes(cfg: DiffusionGemmaConfig, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of parameters and buffers in every placement unit, at `dtype` (no tensor is allocated)."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(empty_module_tree(cfg).decoder, dtype=dtype)
    return {unit: sizes[unit.removeprefix("decoder.")] for unit in placement_units(cfg)}


def placed_bytes(cfg: DiffusionGemmaConfig, device_map: dict[str, Device], dtype: torch.dtype) -> dict[Device, int]:
    """Weight bytes each device holds under a full map from `plan_device_map`."""
    totals: dict[Device, int] = defaultdict(int)
    for unit, size in unit_bytes(cfg, dtype).items():
        totals[device_map[unit]] += size
    return dict(totals)


def _normalise_budget(max_memory: dict[Device, int | str]) -> dict[Device, int]:
    from accelerate.utils import convert_file_size_to_int

    return {d: convert_file_size_to_int(v) if isinstance(v, str) else int(v) for d, v in max_memory.items()}


def plan_device_map(
    cfg: DiffusionGemmaConfig,
    device_map: str | dict[str, Device] = "auto",
    max_memory: dict[Device, int | str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Device]:
    """A device for every module of both stacks that holds weights: `{"decoder.blocks.3": 1,
    "encoder.blocks.3": 1, ...}`.

    `device_map="auto"` balances the decoder's blocks over the devices of `max_memory` (default: every
    visible GPU, then CPU) with accelerate; a dict maps module names (a unit, or a parent such as
    "decoder" or "" for everything) to devices and is checked. Raises DeviceMapError, naming the
    modules or the shortfall in GB, before any weight is read.
    """
    sizes = unit_bytes(cfg, dtype)
    if isinstance(device_map, str):
        if device_map != "auto":
            raise DeviceMapError(f"device_map={device_map!r}: pass 'auto' or a dict of module name to device")
        decoder_map = _plan_auto(cfg, sizes, max_memory, dtype)
    else:
        decoder_map = _check_explicit(cfg, device_map)
        if max_memory is not None:
            _check_budget(sizes, decoder_map, _normalise_budget(max_memory))
    full = dict(decoder_map)
    full.update({unit.replace("decoder.", "encoder.", 1): dev for unit, dev in decoder_map.items()})
    del full["encoder.self_cond"]  # the encoder has no self-conditioning
    return full


def _plan_auto(
    cfg: DiffusionGemmaConfig, sizes: dict[str, int], max_memory: dict[Device, int | str] | None, dtype: torch.dtype
) -> dict[str, Device]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    budget = get_max_memory(None if max_memory is None else _normalise_budget(max_memory))
    budget = {d: v for d, v in budget.items() if d != "disk"}  # weights offloaded to disk are not supported
    total, available = sum(sizes.values()), sum(budget.values())
    if total > available:
        raise DeviceMapError(
            f"max_memory holds {available / GB:.2f} GB but the weights need {total / GB:.2f} GB at {dtype}: "
            f"{(total - available) / GB:.2f} GB short. Add devices, raise max_memory or load in a smaller dtype."
        )
    decoder = empty_module_tree(cfg).decoder
    if sum(1 for d in budget if d not in ("cpu", "mps")) > 1:
        budget = get_balanced_memory(decoder, budget, no_split_module_classes=NO_SPLIT_CLASSES, dtype=dtype)
    # The main units must share one device; the first device accelerate fills gets them, so plan with
    # their bytes set aside there and add them afterwards.
    main_bytes = sum(sizes[u] for u in MAIN_UNITS[1:])
    first = next(iter(budget))
    reserved = dict(budget) | {first: max(budget[first] - main_bytes, 0)}
    planned = infer_auto_device_map(decoder, reserved, no_split_module_classes=NO_SPLIT_CLASSES, dtype=dtype)
    decoder_map = {unit: _lookup(planned, unit.removeprefix("decoder.")) for unit in placement_units(cfg)}
    main = decoder_map["decoder.embed"]
    decoder_map.update(dict.fromkeys(MAIN_UNITS, main))
    _check_budget(sizes, decoder_map, _normalise_budget(max_memory) if max_memory is not None else budget)
    return decoder_map


def _lookup(planned: dict[str, Device], name: str) -> Device:
    """The device accelerate gave `name` or its nearest ancestor (it merges whole subtrees)."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in planned:
            return planned[key]
    raise DeviceMapError(f"accelerate left {name} unplaced")  # not reached: accelerate places everything


def _check_budget(sizes: dict[str, int], decoder_map: dict[str, Device], budget: dict[Device, int]) -> None:
    used: dict[Device, int] = defaultdict(int)
    for unit, size in sizes.items():
        used[decoder_map[unit]] += size
    if "disk" in used:
        short = used["disk"]
        raise DeviceMapError(
            f"max_memory is {short / GB:.2f} GB short of the weights (that much would be offloaded to disk, "
            "which diffusionlens does not do); add devices or raise max_memory"
        )
    over = {d: u for d, u in used.items() if d in budget and u > budget[d]}
    if over:
        detail = ", ".join(f"{d}: {u / GB:.2f} GB placed > {budget[d] / GB:.2f} GB" for d, u in over.items())
        raise DeviceMapError(f"the device map does not fit max_memory ({detail})")


def _check_explicit(cfg: DiffusionGemmaConfig, device_map: dict[str, Device]) -> dict[str, Device]:
    model = empty_module_tree(cfg)
    modules = dict(model.named_modules())
    units = placement_units(cfg)
    unknown = sorted(k for k in device_map if k not in modules)
    if unknown:
        raise DeviceMapError(
            f"device_map names modules that do not exist: {unknown}; place units such as "
            f"{units[:4]} (or a parent: 'decoder', 'decoder.blocks', '')"
        )
    twin_units = {u.replace("decoder.", "encoder.", 1) for u in units} - {"encoder.self_cond"}
    inside = sorted(k for k in device_map if any(k.startswith(u + ".") for u in [*units, *twin_units]))
    if inside:
        raise DeviceMapError(f"device_map splits a unit that is placed whole: {inside}; name the block itself")
    decoder_map: dict[str, Device] = {}
    unplaced = []
    for unit in units:
        twin = unit.replace("decoder.", "encoder.", 1)
        own, twins = _nearest_key(device_map, unit), _nearest_key(device_map, twin)
        if own is None and (twins is None or unit == "decoder.self_cond"):
            unplaced.append(unit)
            continue
        # The encoder follows its decoder twin unless a key names the encoder's side itself.
        if twins is not None and not twins.startswith("encoder"):
            twins = None
        if own is not None and twins is not None and str(device_map[own]) != str(device_map[twins]):
            raise DeviceMapError(
                f"{unit} and {twin} share weights and must sit on one device; device_map puts {own!r} on "
                f"{device_map[own]} and {twins!r} on {device_map[twins]}"
            )
        decoder_map[unit] = device_map[own if own is not None else twins]
    if unplaced:
        raise DeviceMapError(f"device_map leaves modules unplaced: {unplaced}; map each (or a parent) to a device")
    mains = {str(decoder_map[u]) for u in MAIN_UNITS}
    if len(mains) > 1:
        raise DeviceMapError(
            f"{list(MAIN_UNITS)} must share one device (the LM head is the tied embedding); got "
            f"{ {u: decoder_map[u] for u in MAIN_UNITS} }"
        )
    check_devices_exist(decoder_map.values(), what="device_map")
    return decoder_map


def visible_devices() -> list[str]:
    """The devices this process can place tensors on: the CPU, then every visible GPU."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return ["cpu", *gpus, *mps]


def check_devices_exist(devices: Iterable[Device], what: str = "device") -> None:
    """Refuse, before any weight is read, devices this machine does not have (torch would fail mid-load with
    an AssertionError) or names that are not devices."""
    visible = visible_devices()
    missing = []
    for device in dict.fromkeys(devices):
        try:
            torch_device = as_torch_device(device)
        except (RuntimeError, TypeError) as error:
            raise DeviceMapError(
                f"{what} names {device!r}, which is not a device ({error}); use one of {visible}"
            ) from None
        if torch_device.type == "cuda" and torch_device.index is None:
            torch_device = torch.device("cuda", 0)
        if torch_device.type in ("cuda", "mps") and str(torch_device).removesuffix(":0") not in {
            v.removesuffix(":0") for v in visible
        }:
            missing.append(str(device))
    if missing:
        raise DeviceMapError(
            f"{what} names {missing}, which this machine does not have (visible: {visible}); "
            "use one of the visible devices instead"
        )


def _nearest_key(device_map: dict[str, Device], name: str) -> str | None:
    """The most specific key of `device_map` that covers module `name` ("" covers everything)."""
    covering = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return max(covering, key=len) if covering else None


def as_torch_device(device: Device) -> torch.device:
    """accelerate's device keys (an int is a GPU index) as a torch.device."""
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def device_for_tensor(device_map: dict[str, Device], name: str) -> torch.device:
    """The device of one of our owned tensor names (`decoder.blocks.3.attn.W_Q`) under a full map."""
    return as_torch_device(_lookup(device_map, name))


def dispatch(model: HookedDiffusionGemma, device_map: dict[str, Device]) -> HookedDiffusionGemma:
    """Move every unit (and config-derived buffers) to its device and align block inputs.

    Blocks and final norms get an `AlignDevicesHook`, which moves their inputs to their device;
    the embedding, self-conditioning and RoPE tables run on the main device, where the tokens are.
    The map is kept as `model.device_map`.
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    main = as_torch_device(device_map["decoder.embed"])
    for stack in (model.encoder, model.decoder):
        stack.rotary.to(main)
    for unit, device in device_map.items():
        module = model.get_submodule(unit)
        module.to(as_torch_device(device))
        if ".blocks." in unit or unit.endswith("ln_final"):
            add_hook_to_module(module, AlignDevicesHook(execution_device=as_torch_device(device)))
    model.device_map = dict(device_map)
    return model


def describe(device_map: dict[str, Device], cfg: DiffusionGemmaConfig, dtype: torch.dtype) -> str:
    """One line per device: which decoder blocks it holds and their weight bytes."""
    lines = []
    for device, used in placed_bytes(cfg, device_map, dtype).items():
        blocks = [int(u.rsplit(".", 1)[1]) for u, d in device_map.items() if d == device and u.startswith("decoder.b")]
        extra = [u for u in MAIN_UNITS if device_map[u] == device]
        span = f"blocks {min(blocks)}–{max(blocks)}" if blocks else "no blocks"
        lines.append(f"{device}: {span}{' + embed/self_cond/ln_final' if extra else ''}, {used / GB:.2f} GB")
    return "\n".join(lines)


def planning_dtype(dtype: torch.dtype | None, checkpoint_config: dict[str, Any] | None) -> torch.dtype:
    """The dtype weights will have once loaded: the requested one, else the checkpoint's, else float32."""
    if dtype is not None:
        return dtype
    name = (checkpoint_config or {}).get("dtype") or (checkpoint_config or {}).get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32
