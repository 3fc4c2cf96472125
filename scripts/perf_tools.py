"""Speed and memory measurement of GLARE: our networks against the official explicit-attention computation.

Used by ``scripts/bench_inference.py`` (the CLI, see ``docs/performance.md``), ``scripts/bench_nat.py`` and
``scripts/count_params_macs.py``; they import it as ``perf_tools`` (this folder is on their ``sys.path``). Pieces:

* :class:`ExplicitAttnBlock` and :func:`with_explicit_attention`: the reference. A deep copy of a network in which
  every :class:`~glare_nat_arch.blocks.AttnBlock` is replaced by the official formulation (``bmm`` -> scale ->
  ``softmax`` -> ``bmm`` with the explicit (B, N, N) map, as taming-transformers / GLARE's ``AttnBlock``), with the
  same weights, and every deformable conv runs BasicSR's im2col kernel (the official ``DCNv2Pack``).
  **Benchmark reference only**: the project's networks never build an N x N map.
* :func:`build_inference_networks`, :func:`make_low_light_image`, :func:`make_enhancer`: the full inference network
  (``GLARENet`` + ``GLAREVQGAN``, random but seeded weights) and the timed call (``torch.inference_mode``,
  autocast, optional ``channels_last`` / ``torch.compile``).
* :func:`measure`: warm-up, then the median latency of repeats (``torch.cuda.synchronize`` on GPU) and the peak
  CUDA memory of the call (``torch.cuda.max_memory_allocated``). CPU peak memory is measured by the CLI as the
  peak RSS of one subprocess per variant (RSS high-water marks cannot be reset in-process): :func:`rss_bytes`.
* :func:`count_macs` / :func:`mac_counter`: multiply-accumulates of a call (``FlopCounterMode`` plus formulas for
  the CPU SDPA kernel and ``torchvision::deform_conv2d``, which torch has none for); also on ``meta`` tensors.
* :func:`make_train_step`: one forward + backward + optimizer step of Stage I (VQGAN, L1 + LPIPS + codebook +
  adaptive hinge GAN, generator and discriminator steps), Stage II (flow NLL) or Stage III (AFT: L1 + VGG16
  perceptual + MS-SSIM) for training throughput. Loss networks (AlexNet-LPIPS, VGG16) use random weights: same
  cost, no downloads.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from glare_nat_arch.blocks import AttnBlock
from glare_nat_arch.deform import LeanDCNv2Pack
from glare_nat_arch.glare_arch import GLAREFlowNet, GLARENet
from glare_nat_arch.vqgan_arch import GLAREVQGAN
from glare_nat_models.inference import autocast_context

__all__ = [
    "AMP_DTYPES",
    "TINY_ARCH",
    "STAGE_SHAPES",
    "ExplicitAttnBlock",
    "with_explicit_attention",
    "count_modules",
    "build_inference_networks",
    "calibrate_codebook",
    "make_low_light_image",
    "make_enhancer",
    "capture_code_indices",
    "Measurement",
    "measure",
    "LiveTensorBytes",
    "sdpa_macs_from_shapes",
    "deform_macs_from_shapes",
    "mac_counter",
    "count_macs",
    "rss_bytes",
    "peak_rss_bytes",
    "output_difference",
    "TrainStep",
    "make_train_step",
]

#: ``--amp`` names -> autocast dtype (None = float32, no autocast). The official inference uses fp16 autocast.
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}

#: Small architecture for CI smoke runs (same layout as the official one: 3 levels, attention at 1/4 scale).
TINY_ARCH = dict(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(64,), resolution=256, z_channels=3)
_TINY_FLOW = dict(cond_channels=16, flow_hidden_channels=16, flow_K=2, flow_unused_f_in=8, flow_unused_f_out=8)
_TINY_CODES = 256

#: Training crop side and batch per stage: official Stage II (320, 4) and Stage III (256, 2) from the ymls (totals
#: over the official 2 GPUs); Stage I has no official config, (256, 4) is our choice. ``tiny``: CI smoke sizes.
STAGE_SHAPES = {
    "official": {"I": (256, 4), "II": (320, 4), "III": (256, 2)},
    "tiny": {"I": (32, 2), "II": (32, 2), "III": (32, 2)},
}


# --------------------------------------------------------------------------------------------------------------
# the explicit-attention reference
# --------------------------------------------------------------------------------------------------------------
class ExplicitAttnBlock(AttnBlock):
    """The official attention computation, with the same parameters (``norm, q, k, v, proj_out``) as AttnBlock.

    Shapes: (B, C, H, W) -> (B, C, H, W); builds the (B, N, N) attention map, N = H*W. The steps and their order
    follow the official module, so its memory behaviour (under fp16 autocast: the fp16 scores, the fp32 softmax
    output and its fp16 copy for the second ``bmm``) is reproduced as well as its values.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = self.q(hn), self.k(hn), self.v(hn)
        q = q.reshape(b, c, h * w).permute(0, 2, 1)  # (B, N, C)
        k = k.reshape(b, c, h * w)  # (B, C, N)
        attn = torch.bmm(q, k)  # (B, N, N): the explicit map
        attn = attn * (int(c) ** -0.5)
        attn = F.softmax(attn, dim=2)
        v = v.reshape(b, c, h * w)
        out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)  # out[:, :, i] = sum_j attn[i, j] v[:, :, j]
        return x + self.proj_out(out)


def with_explicit_attention(module: nn.Module) -> nn.Module:
    """The official-style reference: a deep copy of ``module`` with every AttnBlock replaced by an
    :class:`ExplicitAttnBlock` holding the same weights (same device, dtype, ``requires_grad`` and train/eval mode)
    and every deformable conv on BasicSR's im2col kernel (``DCNv2Pack``, as the official code), whatever its
    ``dcn_impl``. ``module`` itself is not changed."""
    if type(module) is AttnBlock:
        return _explicit_copy(module)
    ref = copy.deepcopy(module)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is AttnBlock:
                setattr(parent, name, _explicit_copy(child))
            elif isinstance(child, LeanDCNv2Pack):
                child.impl = "im2col"
    return ref


def _explicit_copy(block: AttnBlock) -> ExplicitAttnBlock:
    p0 = block.q.weight
    new = ExplicitAttnBlock(block.in_channels).to(device=p0.device, dtype=p0.dtype)
    new.load_state_dict(block.state_dict())  # after the dtype change: an exact copy of the weights
    for p_new, p_old in zip(new.parameters(), block.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    return new.train(block.training)


def count_modules(module: nn.Module, cls: type) -> int:
    """Number of sub-modules whose type is exactly ``cls``."""
    return sum(type(m) is cls for m in module.modules())


# --------------------------------------------------------------------------------------------------------------
# networks and inputs
# --------------------------------------------------------------------------------------------------------------
def _arch_kwargs(tiny: bool) -> tuple[dict, dict]:
    """(GLARENet kwargs, GLAREVQGAN kwargs): official defaults, or :data:`TINY_ARCH`."""
    if not tiny:
        return {}, {}
    return {**TINY_ARCH, **_TINY_FLOW}, {**TINY_ARCH, "n_embed": _TINY_CODES}


def make_low_light_image(height: int, width: int, seed: int = 0, batch: int = 1) -> Tensor:
    """A deterministic dark test image (batch, 3, height, width) in [0, 0.3]: smooth colour blobs plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(1, height // 16), max(1, width // 16), generator=g)
    img = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (0.25 * img + 0.05 * torch.rand(batch, 3, height, width, generator=g)).clamp(0, 0.3)


@torch.no_grad()
def calibrate_codebook(net: GLAREFlowNet, vqgan: GLAREVQGAN, size: int = 64, seed: int = 1) -> None:
    """Give the random codebook a trained-like density: codes = flow latents ``z_hat`` of a calibration image
    (sampled with replacement) plus 5 % noise. With the default init (uniform +-1/K) every latent is far from
    all codes and nearest-code decisions are trivially stable, which would hide precision effects."""
    z = net.reverse(make_low_light_image(size, size, seed))["z_hat"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
    g = torch.Generator().manual_seed(seed)
    codes = vqgan.quantize.embedding.weight
    idx = torch.randint(0, flat.shape[0], (codes.shape[0],), generator=g)
    noise = torch.randn(codes.shape, generator=g) * 0.05 * flat.std(dim=0, keepdim=True)
    codes.copy_(flat[idx] + noise)


def build_inference_networks(tiny: bool = False, seed: int = 0) -> tuple[GLARENet, GLAREVQGAN]:
    """GLARENet + GLAREVQGAN in eval mode on the CPU, float32, random weights fixed by ``seed``.

    Official sizes (101.4M parameters used at inference) or the tiny CI config; the codebook is calibrated
    (:func:`calibrate_codebook`). The same ``seed`` gives bit-identical weights in every process.
    """
    net_kw, vq_kw = _arch_kwargs(tiny)
    torch.manual_seed(seed)
    net = GLARENet(**net_kw).eval()
    vqgan = GLAREVQGAN(**vq_kw).eval()
    calibrate_codebook(net, vqgan, size=32 if tiny else 64)
    return net, vqgan


def make_enhancer(
    net: GLARENet,
    vqgan: GLAREVQGAN,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    compile_net: bool = False,
) -> Callable[[Tensor], Tensor]:
    """``fn(lq) -> raw output`` for (B, 3, H, W) on ``device``, run under ``torch.inference_mode`` and autocast
    (``amp``; no-op on CPU). ``channels_last`` converts both networks and the input to NHWC memory format;
    ``compile_net`` wraps the network call in ``torch.compile``."""
    if channels_last:
        net.to(memory_format=torch.channels_last)
        vqgan.to(memory_format=torch.channels_last)

    def core(x: Tensor) -> Tensor:
        return net(x, vqgan)

    call = torch.compile(core) if compile_net else core

    def fn(x: Tensor) -> Tensor:
        with torch.inference_mode(), autocast_context(device, amp):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return call(x)

    return fn


def capture_code_indices(vqgan: GLAREVQGAN, store: list[Tensor]) -> torch.utils.hooks.RemovableHandle:
    """Append the code indices (B, h, w) of every ``vqgan.quantize`` call to ``store`` (a forward hook)."""

    def hook(_module: nn.Module, _inputs: tuple, outputs: tuple) -> None:
        store.append(outputs[2].detach().cpu())

    return vqgan.quantize.register_forward_hook(hook)


# --------------------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------------------
def sdpa_macs_from_shapes(q: list[int], k: list[int], v: list[int]) -> int:
    """q (..., N, d), k (..., M, d), v (..., M, dv) -> batch*heads*(N*M*d + N*M*dv)."""
    batch = 1
    for s in q[:-2]:
        batch *= s
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def deform_macs_from_shapes(weight: list[int], out: list[int]) -> int:
    """Dense-conv equivalent of a deformable conv: B*C_out*H_out*W_out*C_in/groups*kh*kw."""
    c_out, cin_per_group, kh, kw = weight
    return out[0] * c_out * out[2] * out[3] * cin_per_group * kh * kw


def mac_counter():
    """A ``FlopCounterMode`` (no display) that also counts the CPU flash-attention kernel and
    ``torchvision::deform_conv2d`` (no formula in torch). Its ``get_total_flops() // 2`` are MACs: convolutions and
    matrix products (incl. attention and the tap-wise DCN's GEMMs); norms, sampling and element-wise ops are not
    counted. Nests with :class:`LiveTensorBytes`."""
    from torch.utils.flop_counter import FlopCounterMode

    def deform_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs):
        return 2 * deform_macs_from_shapes(list(weight_shape), list(out_shape))

    def cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
        return 2 * sdpa_macs_from_shapes(list(q_shape), list(k_shape), list(v_shape))

    mapping = {  # keyed by overload packet
        torch.ops.torchvision.deform_conv2d: deform_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_macs(fn: Callable, inputs: tuple = ()) -> int:
    """MACs of ``fn(*inputs)`` (see :func:`mac_counter`); works on ``meta`` tensors."""
    with mac_counter() as counter:
        fn(*inputs)
    return counter.get_total_flops() // 2


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the mode and still alive (a CPU peak-memory probe).

    Outputs that share an input's storage (views, in-place ops) are not allocations and are not counted, so
    weights that existed before the mode never are. Memory a kernel allocates internally (oneDNN reorders,
    torchvision's deformable-conv im2col buffer) is invisible here: compare with the process's peak RSS.

    ``attribute``: a module (or several) whose sub-modules name the allocations; then ``snapshot`` lists, at the
    peak, the largest live tensors as ``(shape, MiB, module that allocated it)`` (at most ``top``).
    """

    def __init__(self, attribute: nn.Module | list[nn.Module] | None = None, top: int = 10) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.top = top
        self.snapshot: list[tuple[tuple[int, ...], float, str]] = []
        self.peak_module = ""
        self._live: dict[int, tuple[tuple[int, ...], int, str]] = {}
        self._stack: list[str] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        roots = [] if attribute is None else (attribute if isinstance(attribute, list) else [attribute])
        for i, root in enumerate(roots):
            for name, mod in root.named_modules():
                label = f"{i}:{name or type(root).__name__}" if len(roots) > 1 else (name or type(root).__name__)
                self._hooks.append(mod.register_forward_pre_hook(self._enter(label)))
                self._hooks.append(mod.register_forward_hook(self._leave))

    def _enter(self, label: str) -> Callable[..., None]:
        def hook(*_) -> None:  # hooks must return None: a value would replace the module's input
            self._stack.append(label)

        return hook

    def _leave(self, *_) -> None:
        self._stack.pop()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key in self._live or key in inputs or nbytes == 0:  # views / in-place results are not allocations
                continue
            where = self._stack[-1] if self._stack else ""
            self._live[key] = (tuple(t.shape), nbytes, where)
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
                if self._hooks:
                    self.peak_module = where
                    big = sorted(self._live.values(), key=lambda v: -v[1])[: self.top]
                    self.snapshot = [(shape, n / 2**20, m) for shape, n, m in big]
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    """Wall-clock latencies (s) of the timed repeats, their CPU times (s, all threads of this process), the
    output of the last call, and memory (bytes; None if not measured).

    ``peak_bytes``: peak CUDA memory allocated during warm-up and repeats (weights and input included);
    ``base_bytes``: CUDA memory allocated before the first call (weights + input); ``reserved_bytes``: peak
    memory reserved by PyTorch's caching allocator (what the GPU must actually provide, minus the CUDA context).
    """

    times: list[float]
    cpu_times: list[float]
    output: Tensor | None
    peak_bytes: int | None = None
    base_bytes: int | None = None
    reserved_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        """Median wall-clock latency (s)."""
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        """Median CPU time (s) per call: robust to other processes competing for the cores (CPU runs)."""
        return statistics.median(self.cpu_times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Tensor | None], device: torch.device, warmup: int = 1, repeats: int = 3) -> Measurement:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed (wall clock, synchronised on CUDA, and
    process CPU time).

    On CUDA also records the peak allocated memory over all calls (after resetting the peak statistics).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    base = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    times, cpu_times = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if device.type != "cuda":
        return Measurement(times=times, cpu_times=cpu_times, output=out)
    peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return Measurement(times, cpu_times, out, peak_bytes=peak, base_bytes=base, reserved_bytes=reserved)


def code_agreement(a: Tensor, b: Tensor) -> dict[str, float | int]:
    """``codes_equal`` (fraction), ``codes_differ`` (count) and ``codes_total`` of two code-index maps.

    The count matters: one flipped code in 30,000 rounds to 1.0000, yet moves the output near it (a flip happens
    where a latent sits almost midway between two codes and a float-rounding difference tips it)."""
    if a.shape != b.shape:
        raise ValueError(f"code_agreement: code maps {tuple(a.shape)} and {tuple(b.shape)} differ in shape")
    differ = int((a != b).sum())
    return {"codes_equal": 1.0 - differ / max(a.numel(), 1), "codes_differ": differ, "codes_total": a.numel()}


def output_difference(a: Tensor, b: Tensor) -> dict[str, float]:
    """``max_abs``, ``mean_abs`` and ``rel_l2 = ||a - b|| / ||b||`` of two outputs (compared in float64)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    d = (a64 - b64).abs()
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "rel_l2": float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30)),
    }


# --------------------------------------------------------------------------------------------------------------
# training steps
# --------------------------------------------------------------------------------------------------------------
class _Stepper:
    """fp16 autocast + GradScaler (as the official Stage II/III), bf16 autocast, or plain float32."""

    def __init__(self, device: torch.device, amp: torch.dtype | None):
        self.device, self.amp = device, amp
        use_scaler = amp == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def autocast(self):
        return autocast_context(self.device, self.amp)

    def step(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)


StageBuild = tuple[Callable[[], None], dict[str, nn.Module]]


def _stage1(device, amp, variant, tiny, batch, patch) -> StageBuild:
    from glare_nat_arch.discriminator_arch import PatchGANDiscriminator
    from glare_nat_models.losses import LPIPSLoss, adaptive_gan_weight

    _, vq_kw = _arch_kwargs(tiny)
    vq = GLAREVQGAN(**vq_kw).train()
    if variant == "reference":
        vq = with_explicit_attention(vq)
    vq.to(device)
    disc = PatchGANDiscriminator().to(device).train()
    lpips = LPIPSLoss(alexnet_weights="random").to(device)
    opt_g = torch.optim.Adam(vq.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    run = _Stepper(device, amp)
    gt = make_low_light_image(patch, patch, seed=3, batch=batch).mul(3).clamp(0, 1).to(device)

    def step() -> None:
        opt_g.zero_grad(set_to_none=True)
        with run.autocast():
            rec, emb_loss, _ = vq(gt)
            rec = rec.float()
            nll = F.l1_loss(rec, gt) + lpips(rec, gt)
            g_loss = -disc(rec).mean()
        weight = adaptive_gan_weight(nll, g_loss, vq.get_last_layer()) * 0.8
        run.step(nll + emb_loss + weight * g_loss, opt_g)
        opt_d.zero_grad(set_to_none=True)
        with run.autocast():
            d_loss = 0.5 * (F.relu(1 - disc(gt)).mean() + F.relu(1 + disc(rec.detach())).mean())
        run.step(d_loss, opt_d)
        run.scaler.update()

    return step, {"vqgan": vq, "discriminator": disc}


def _frozen_vqgan(tiny: bool, device: torch.device) -> GLAREVQGAN:
    _, vq_kw = _arch_kwargs(tiny)
    vq = GLAREVQGAN(**vq_kw).eval().requires_grad_(False)
    return vq.to(device)


def _stage2(device, amp, variant, tiny, batch, patch) -> StageBuild:
    net_kw, _ = _arch_kwargs(tiny)
    net = GLAREFlowNet(**net_kw).train()
    vq = _frozen_vqgan(tiny, device)
    if variant == "reference":
        net, vq = with_explicit_attention(net), with_explicit_attention(vq)
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    run = _Stepper(device, amp)
    lq = make_low_light_image(patch, patch, seed=4, batch=batch).to(device)
    gt = lq.mul(3).clamp(0, 1)
    mu_from_gt = torch.tensor([i % 5 == 0 for i in range(batch)], device=device)  # official ratio 0.2

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with run.autocast():
            with torch.no_grad():
                latent = vq.encode(gt)
            loss = net(latent, lq, mu_from_gt=mu_from_gt)["nll"].mean()
        run.step(loss, opt)
        run.scaler.update()

    return step, {"net": net, "vqgan": vq}


def _stage3(device, amp, variant, tiny, batch, patch) -> StageBuild:
    from glare_nat_models.losses import MSSSIMLoss, VGG16PerceptualLoss

    net_kw, _ = _arch_kwargs(tiny)
    net = GLARENet(**net_kw).train()
    for frozen in (net.RRDB, net.flowUpsamplerNet):  # official: frozen, only D_MF trains
        frozen.requires_grad_(False).eval()
    vq = _frozen_vqgan(tiny, device)
    if variant == "reference":
        net, vq = with_explicit_attention(net), with_explicit_attention(vq)
    net.to(device)
    vgg = VGG16PerceptualLoss(0.01, weights_path="random").to(device)
    msssim = MSSSIMLoss(0.2)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=5e-5)
    run = _Stepper(device, amp)
    lq = make_low_light_image(patch, patch, seed=5, batch=batch).to(device)
    gt = lq.mul(3).clamp(0, 1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with run.autocast():
            out = net(lq, vq)
        out = out.float().clamp(0, 1)
        run.step(F.l1_loss(out, gt) + vgg(out, gt) + msssim(out, gt), opt)
        run.scaler.update()

    return step, {"net": net, "vqgan": vq}


_STAGES = {"I": _stage1, "II": _stage2, "III": _stage3}


@dataclass
class TrainStep:
    """``step()`` runs one training iteration; ``modules`` are the networks it uses (``net``/``vqgan``/...)."""

    step: Callable[[], None]
    batch: int
    patch: int
    modules: dict[str, nn.Module]


def make_train_step(
    stage: str, device: torch.device, amp: torch.dtype | None, variant: str = "ours", tiny: bool = False
) -> TrainStep:
    """Build stage ``'I'``, ``'II'`` or ``'III'`` on ``device``.

    ``step()`` runs one forward + backward + optimizer step on a fixed random batch of :data:`STAGE_SHAPES` size
    (Stage I: a generator and a discriminator step). ``variant='reference'`` uses explicit attention
    (:func:`with_explicit_attention`).
    """
    if stage not in _STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_STAGES)}")
    if variant not in ("ours", "reference"):
        raise ValueError(f"unknown variant {variant!r}; expected 'ours' or 'reference'")
    patch, batch = STAGE_SHAPES["tiny" if tiny else "official"][stage]
    torch.manual_seed(0)
    step, modules = _STAGES[stage](device, amp, variant, tiny, batch, patch)
    return TrainStep(step, batch, patch, modules)
