"""Inference building blocks shared by the ``enhance`` and ``benchmark`` CLIs.

* :func:`pad_to_multiple` (:func:`glare_nat_arch.padding.pad_to_multiple`, the one padding) / :func:`crop_to`:
  any image size in, the same size out (networks need H, W % 4 == 0). Models that pad in their own ``test()``
  (the glare-nat models) get the image unpadded: each network input is padded exactly once.
* :func:`tiled_forward`: overlapping tiles with a cosine cross-fade, batched over tiles, for images too large
  for one forward pass.
* :func:`select_device`, :func:`autocast_context`, :func:`auto_tile_size`: device / precision / memory policy
  (reduced precision and automatic tiling are CUDA-only; the CPU path is plain float32, untiled unless asked);
  :func:`set_malloc_mmap_threshold`: the CPU allocator policy of the low-memory mode (``--mmap-threshold-mb``).
* :func:`load_options`, :func:`load_model_from_options`, :func:`model_forward_fn`: build a BasicSR model from a
  test option file without the BasicSR test pipeline, so no ``results/`` or ``experiments/`` folder is created.

Tile blending (see :func:`tile_weights_1d`): where two tiles overlap by ``o`` pixels, the outer ``o // 4``
pixels of each tile (those that saw the tile's artificial border) get weight 0 and the middle ``o / 2`` pixels
are cross-faded with complementary raised-cosine ramps (their sum is 1). Consequence: for a network whose
receptive-field radius is at most ``overlap // 4`` pixels (each 3x3 conv adds 1), tiled output equals untiled
output up to float rounding (~1e-6 on CPU; on CUDA, cuDNN picks size-dependent algorithms and TF32, so expect
~1e-4 there, measured on an H100). Networks with global context (attention over the whole image, global
statistics) see less context per tile, so their tiled output differs; the cross-fade hides the seams.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

import glare_nat_arch  # noqa: F401  (BasicSR import aliases before basicsr)
from glare_nat_arch.padding import pad_to_multiple

__all__ = [
    "pad_to_multiple",
    "crop_to",
    "tile_starts",
    "tile_weights_1d",
    "tiled_forward",
    "select_device",
    "resolve_precision",
    "autocast_context",
    "estimate_bytes_per_pixel",
    "auto_tile_size",
    "set_malloc_mmap_threshold",
    "load_options",
    "pretrain_paths",
    "load_model_from_options",
    "model_forward_fn",
    "run_enhancer",
]

TensorFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# padding
# --------------------------------------------------------------------------------------------------------------
def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (H, W)`` of a ``(B, C, H', W')`` tensor."""
    return x[..., : size[0], : size[1]]


# --------------------------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------------------------
def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Start offsets of tiles of size ``min(tile, length)`` covering ``[0, length)``.

    The fewest tiles whose neighbours overlap by at least ``overlap`` pixels, spread evenly; the first starts
    at 0 and the last ends at ``length``. Starts are multiples of ``multiple`` (``length`` and ``tile`` must be).
    """
    if tile >= length:
        return [0]
    if length % multiple or tile % multiple:
        raise ValueError(f"length {length} and tile {tile} must be multiples of {multiple}")
    max_stride = (tile - overlap) // multiple  # in units of `multiple`
    if overlap < 0 or max_stride < 1:
        raise ValueError(f"tile overlap must be in [0, tile - {multiple}] = [0, {tile - multiple}], got {overlap}")
    span = (length - tile) // multiple
    gaps = math.ceil(span / max_stride)
    base, rem = divmod(span, gaps)
    starts = [0]
    for i in range(gaps):
        starts.append(starts[-1] + base + (1 if i < rem else 0))
    return [s * multiple for s in starts]


def _ramp(width: int, device: torch.device) -> torch.Tensor:
    """Raised-cosine ramp ``0 -> 1`` over ``width`` samples (sample centres), shape ``(width,)``."""
    t = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width
    return torch.sin(0.5 * math.pi * t) ** 2


def tile_weights_1d(starts: list[int], tile: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Blending profile of each tile along one axis, shape ``(len(starts), tile)``, float64.

    For an interior edge shared with a neighbour overlapping by ``o`` pixels the profile is 0 on the outer
    ``o // 4`` pixels, a raised-cosine ramp over the next ``o - 2 * (o // 4)`` pixels, then 1; the neighbour's
    profile mirrors it, so the two sum to 1 across the overlap. Image borders keep weight 1.
    """
    device = device or torch.device("cpu")
    t = min(tile, length)
    prof = torch.ones(len(starts), t, dtype=torch.float64, device=device)
    for i, s in enumerate(starts):
        if i > 0:  # left edge overlaps the previous tile
            o = starts[i - 1] + t - s
            m = o // 4
            prof[i, :m] = 0
            prof[i, m : o - m] *= _ramp(o - 2 * m, device)
        if i < len(starts) - 1:  # right edge overlaps the next tile
            o = s + t - starts[i + 1]
            m = o // 4
            prof[i, t - m :] = 0
            prof[i, t - o + m : t - m] *= _ramp(o - 2 * m, device).flip(0)
    return prof


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def tiled_forward(
    fn: TensorFn,
    x: torch.Tensor,
    tile: int | None,
    overlap: int = 32,
    multiple: int = 4,
    tile_batch: int = 1,
    progress: bool = True,
    desc: str = "tiles",
) -> torch.Tensor:
    """Apply an image-to-image ``fn`` to ``x`` tile by tile and blend the tiles.

    ``x`` is padded to a multiple of ``multiple`` (reflect; ``multiple=1``: not padded, for an ``fn`` that pads
    itself) and the result cropped back, so any size works. ``tile=None`` (or a tile covering the whole padded
    image) runs ``fn`` once on the padded image.

    Args:
        fn: maps ``(N, C, h, w)`` to ``(N, C_out, h, w)`` (same spatial size, any device); ``h, w`` are
            multiples of ``multiple``.
        x: ``(B, C, H, W)`` input.
        tile: tile side in pixels (rounded down to a multiple of ``multiple``), or None for no tiling.
        overlap: minimum overlap between neighbouring tiles in pixels; at most ``tile - multiple``.
        multiple: spatial divisor required by ``fn``.
        tile_batch: number of tiles (per image) stacked into one ``fn`` call.
        progress: show a tqdm bar when there is more than one tile batch.
        desc: progress-bar label.

    Returns:
        ``(B, C_out, H, W)`` float32 tensor on the device of ``fn``'s output.
    """
    x_pad, size = pad_to_multiple(x, multiple) if multiple > 1 else (x, tuple(x.shape[-2:]))
    hp, wp = x_pad.shape[-2:]
    if tile is None or (tile >= hp and tile >= wp):
        return crop_to(fn(x_pad).float(), size)
    tile = max(multiple, (int(tile) // multiple) * multiple)
    ys, xs = tile_starts(hp, tile, overlap, multiple), tile_starts(wp, tile, overlap, multiple)
    th, tw = min(tile, hp), min(tile, wp)
    coords = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    b = x_pad.shape[0]

    from tqdm import tqdm

    out = weight = None
    bar = tqdm(total=len(coords), desc=desc, unit="tile", disable=not progress or len(coords) <= tile_batch)
    for group in _batches(coords, max(1, tile_batch)):
        batch = torch.cat([x_pad[:, :, ys[iy] : ys[iy] + th, xs[ix] : xs[ix] + tw] for iy, ix in group], dim=0)
        res = fn(batch).float()
        if res.shape[0] != batch.shape[0] or res.shape[-2:] != batch.shape[-2:]:
            raise ValueError(
                f"tiled_forward needs a size-preserving fn: input tiles {tuple(batch.shape)} gave {tuple(res.shape)}"
            )
        if out is None:
            dev = res.device
            out = torch.zeros(b, res.shape[1], hp, wp, dtype=torch.float32, device=dev)
            weight = torch.zeros(1, 1, hp, wp, dtype=torch.float32, device=dev)
            wy = tile_weights_1d(ys, tile, hp, dev)
            wx = tile_weights_1d(xs, tile, wp, dev)
        for k, (iy, ix) in enumerate(group):
            y, x0 = ys[iy], xs[ix]
            w2d = (wy[iy][:, None] * wx[ix][None, :]).float()
            out[:, :, y : y + th, x0 : x0 + tw] += res[k * b : (k + 1) * b] * w2d
            weight[:, :, y : y + th, x0 : x0 + tw] += w2d
        bar.update(len(group))
    bar.close()
    return crop_to(out / weight, size)


# --------------------------------------------------------------------------------------------------------------
# device, precision, memory
# --------------------------------------------------------------------------------------------------------------
def select_device(name: str | None = None) -> torch.device:
    """``None``/``'auto'`` -> CUDA if available else CPU; ``'cpu'``; ``'cuda'``/``'cuda:N'`` (error if absent)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{name}' (expected cpu, cuda or cuda:N)")
    return dev


def resolve_precision(device: torch.device, fp16: bool = False, bf16: bool = False) -> torch.dtype | None:
    """Autocast dtype for the request, or None for float32.

    Reduced precision is CUDA-only: on CPU a request is ignored with a warning. bf16 on a GPU without bf16
    support falls back to fp16 (warning).
    """
    if fp16 and bf16:
        raise ValueError("choose at most one of --fp16 and --bf16")
    if not (fp16 or bf16):
        return None
    if device.type != "cuda":
        warnings.warn("--fp16/--bf16 apply to CUDA only; running in float32 on CPU", stacklevel=2)
        return None
    if bf16 and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU does not support bf16; using fp16 autocast instead", stacklevel=2)
        return torch.float16
    return torch.bfloat16 if bf16 else torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on CUDA with ``dtype``; a no-op context for ``dtype=None`` or CPU."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h).
_M_MMAP_THRESHOLD = -3


def set_malloc_mmap_threshold(mb: float) -> bool:
    """Serve every CPU allocation of at least ``mb`` MiB from its own memory mapping (glibc ``mallopt``
    ``M_MMAP_THRESHOLD``), for the whole process. Returns False (and changes nothing) without glibc.

    By default glibc raises this threshold to the size of freed blocks, up to 32 MiB, so blocks up to that size come
    from the heap, and the heap keeps freed pages: the process's resident memory then exceeds the live tensors
    (docs/performance.md). A fixed
    threshold hands such blocks back to the OS when freed, at the cost of zeroing fresh pages on every allocation
    (slower). Process-wide, so only entry points call it, when asked (``--mmap-threshold-mb``).
    """
    if mb <= 0:
        raise ValueError(f"mmap threshold must be positive, got {mb} MiB")
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mb * 2**20)))


def estimate_bytes_per_pixel(fn: TensorFn, channels: int, device: torch.device, probe: int = 128) -> float:
    """Peak CUDA memory of one ``fn`` call on a ``(1, channels, probe, probe)`` zero input, per input pixel.

    Assumes memory grows linearly with pixel count (true for convolutions and memory-efficient SDPA).
    """
    if device.type != "cuda":
        raise ValueError("estimate_bytes_per_pixel measures CUDA memory; device is not CUDA")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        fn(torch.zeros(1, channels, probe, probe, device=device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return max(float(peak), 1.0) / (probe * probe)


def auto_tile_size(
    device: torch.device,
    image_hw: tuple[int, int],
    bytes_per_pixel: float,
    memory_fraction: float = 0.6,
    multiple: int = 4,
    min_tile: int = 64,
) -> int | None:
    """Tile side for ``image_hw`` that fits in ``memory_fraction`` of the free GPU memory, or None.

    Returns None (no tiling) on CPU, or when the whole image fits. ``bytes_per_pixel`` comes from
    :func:`estimate_bytes_per_pixel` (or a known figure for the model).
    """
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    budget_pixels = free * memory_fraction / bytes_per_pixel
    h, w = image_hw
    if h * w <= budget_pixels:
        return None
    side = int(math.sqrt(budget_pixels)) // multiple * multiple
    return max(min_tile, side)


# --------------------------------------------------------------------------------------------------------------
# models from option files
# --------------------------------------------------------------------------------------------------------------
def _set_by_path(opt: dict, dotted: str, value: Any) -> None:
    keys = dotted.replace(".", ":").split(":")
    node = opt
    for k in keys[:-1]:
        if not isinstance(node.get(k), Mapping):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def load_options(opt_path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a BasicSR option YAML (BasicSR's ordered loader) and apply ``overrides``.

    Args:
        opt_path: the YAML file.
        overrides: ``{"path:pretrain_network_g": "x.pth", "network_g:num_feat": 8}``; keys are ``:``- or
            ``.``-separated paths into the options (missing levels are created).

    Raises:
        FileNotFoundError / ValueError naming the file when it is missing, not YAML, or not a mapping.
    """
    import yaml
    from basicsr.utils.options import ordered_yaml

    path = Path(opt_path)
    if not path.is_file():
        raise FileNotFoundError(f"option file '{path}' does not exist")
    try:
        with path.open(encoding="utf-8") as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as exc:
        raise ValueError(f"option file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(opt, Mapping):
        raise ValueError(f"option file '{path}' must hold a mapping of options, got {type(opt).__name__}")
    opt = _to_plain_dict(opt)
    for key, value in (overrides or {}).items():
        _set_by_path(opt, key, value)
    return opt


def _to_plain_dict(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _to_plain_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain_dict(v) for v in obj]
    return obj


def pretrain_paths(opt: Mapping[str, Any]) -> dict[str, str]:
    """``{key: path}`` for every ``path.pretrain_network_*`` entry that is set (user ``~`` expanded)."""
    paths = opt.get("path") or {}
    return {
        k: str(Path(v).expanduser()) for k, v in paths.items() if k.startswith("pretrain_network") and v is not None
    }


def load_model_from_options(
    opt_path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    require_checkpoints: bool = True,
):
    """Build the BasicSR model of a test option file for inference (``is_train=False``, no side effects).

    Unlike ``basicsr.test.test_pipeline`` this creates no ``results/<name>`` folder and no log file, needs no
    ``datasets`` section, and never wraps the network in DataParallel.

    Args:
        opt_path: test option YAML (``model_type``, ``network_g``..., ``path.pretrain_network_*``).
        overrides: see :func:`load_options`.
        device: ``'cpu'``, ``'cuda'``, or None for auto; sets ``num_gpu`` to 0 or 1 accordingly.
        require_checkpoints: raise if no ``pretrain_network_*`` path is set (random weights are useless).

    Returns:
        The model (e.g. ``SRModel`` or a glare-nat model) with its networks in eval mode on ``device``.
    """
    from basicsr.models import build_model
    from basicsr.utils import set_random_seed

    opt = load_options(opt_path, overrides)
    for key in ("model_type", "network_g"):
        if key not in opt:
            raise KeyError(f"option file '{opt_path}' has no '{key}' entry")
    ckpts = pretrain_paths(opt)
    if require_checkpoints and not ckpts:
        raise ValueError(f"option file '{opt_path}' names no checkpoint (path.pretrain_network_g etc.)")
    for key, p in ckpts.items():
        if not Path(p).is_file():
            raise FileNotFoundError(f"option file '{opt_path}': path.{key} = '{p}' does not exist")
    opt.setdefault("path", {}).update(ckpts)

    dev = select_device(None if device is None else str(device))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    opt = deepcopy(opt)
    opt.update(is_train=False, dist=False, rank=0, world_size=1, num_gpu=1 if dev.type == "cuda" else 0)
    opt.setdefault("name", Path(opt_path).stem)
    if opt.get("manual_seed") is not None:
        set_random_seed(int(opt["manual_seed"]))
    model = build_model(opt)
    for name, value in vars(model).items():
        if name.startswith("net_") and isinstance(value, torch.nn.Module):
            value.eval()
    return model


def model_forward_fn(model, dtype: torch.dtype | None = None) -> TensorFn:
    """Wrap a BasicSR model as ``fn(lq) -> result``: ``(N, 3, H, W)`` in [0, 1] -> ``(N, 3, H, W)`` float32 CPU.

    Uses the stock model contract ``feed_data({'lq': x})``, ``test()``, ``get_current_visuals()['result']``;
    ``test()`` runs under :func:`autocast_context` with ``dtype``. ``fn.pads_itself`` is True for models whose
    ``test()`` pads the input to what their network needs (``pad_for_test``: the glare-nat models), so
    :func:`run_enhancer` does not pad for them.
    """
    device = getattr(model, "device", torch.device("cpu"))

    def fn(x: torch.Tensor) -> torch.Tensor:
        model.feed_data({"lq": x})
        with autocast_context(device, dtype):
            model.test()
        return model.get_current_visuals()["result"].float()

    fn.pads_itself = callable(getattr(model, "pad_for_test", None))
    return fn


def run_enhancer(
    fn: TensorFn,
    lq: torch.Tensor,
    device: torch.device,
    tile: int | str | None = None,
    overlap: int = 32,
    multiple: int = 4,
    tile_batch: int = 1,
    progress: bool = False,
    bytes_per_pixel: float | None = None,
) -> torch.Tensor:
    """Enhance one batch with padding, optional tiling and clamping: ``(B, 3, H, W)`` -> ``(B, 3, H, W)`` in [0, 1].

    ``tile``: None or 0 = whole image; an int = that tile side; ``'auto'`` = :func:`auto_tile_size` (CUDA only,
    measuring ``fn`` once if ``bytes_per_pixel`` is not given; no tiling on CPU). ``multiple``: the padding for an
    ``fn`` that does not pad itself (``fn.pads_itself``, :func:`model_forward_fn`: then tiles are cut from the
    unpadded image and ``fn`` pads each to its network's multiple).
    """
    if getattr(fn, "pads_itself", False):
        multiple = 1
    lq = lq.to(device)
    if tile == "auto":
        if device.type == "cuda":
            bpp = bytes_per_pixel or estimate_bytes_per_pixel(fn, lq.shape[1], device)
            tile = auto_tile_size(device, tuple(lq.shape[-2:]), bpp, multiple=multiple)
        else:
            tile = None
    elif tile is not None:
        tile = int(tile) or None
    out = tiled_forward(fn, lq, tile, overlap=overlap, multiple=multiple, tile_batch=tile_batch, progress=progress)
    return out.clamp_(0.0, 1.0)
