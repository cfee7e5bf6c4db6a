"""Linear-layer backends: one interface, dense and 2:4 sparse implementations.

A backend turns a weight and its 2:4 mask into a `handle` once (`prepare`), then computes
`y = x @ (weight * mask)^T` from it (`linear`). `available(device)` says whether it can run there and
why not. Backends, by name:

- `dense`: cuBLAS through `F.linear` on the masked dense weight; the baseline and the fallback.
- `torch-semi-structured`: PyTorch's stock path, `to_sparse_semi_structured` (cuSPARSELt) + `F.linear`.
- `cslt-direct`: `torch._cslt_sparse_mm` called directly on a weight compressed once (diagnostic:
  it still builds a cuSPARSELt plan on every call, which is where the stock path's time goes).
- `cusparselt-planned`: cuSPARSELt through `kernels.cslt`: descriptors and plan built once per
  (shape, token count, layout, algorithm) and reused; one `cusparseLtMatmul` a call.
- `cutlass-sm90`: our own Hopper 2:4 GEMM (`kernels.cutlass24`, CUTLASS sm90a sparse kernels):
  compressed once, no transposes; config `kernel` (tile/schedule), `raster`, `swizzle`, `splits`,
  `mode` per token count, chosen by the tuner from `candidate_configs` timed on the weight itself.
- `sparse24-reference`: CPU-capable pure-torch reference over `Packed24`; for tests, never fast.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.sparse24 import Packed24

_PAD_TOKENS = 8  # cuSPARSELt dense operands: 16-byte aligned dimensions for 16-bit types


class BackendError(RuntimeError):
    """A backend cannot prepare or run this weight."""


def nearest_bucket(tokens: int, buckets: list[int]) -> int:
    """The tuned token count closest to `tokens` in log scale (ties go to the larger bucket)."""
    if not buckets:
        raise ValueError("no token buckets")
    return min(sorted(buckets, reverse=True), key=lambda b: abs(math.log2(b) - math.log2(max(tokens, 1))))


@dataclass
class Handle:
    """What `prepare` made for one weight; `data` is backend-specific."""

    backend: str
    out_features: int
    in_features: int
    dtype: torch.dtype
    device: torch.device
    data: Any
    configs: dict[int, dict[str, int]] = field(default_factory=dict)  # tuned tokens -> backend config


class Backend(ABC):
    name: str = ""
    sparse: bool = True
    fp8: bool = False  # takes FP8 weights: `prepare` also needs the layer's `scale` (see kernels.fp8_backends)
    config_keys: tuple[str, ...] = ()  # what a plan records of this backend's per-token config

    @abstractmethod
    def available(self, device: torch.device) -> tuple[bool, str]:
        """(can run on `device`, reason when it cannot)."""

    @abstractmethod
    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        """Build the handle for `weight * mask` (mask None: the weight already follows 2:4 or is dense)."""

    @abstractmethod
    def linear(self, x: Tensor, handle: Handle) -> Tensor:
        """`x @ (weight*mask)^T` for x of shape (..., in_features)."""

    def candidate_configs(self, tokens: int) -> list[dict[str, int]]:
        """Configs the tuner may try in its own process at `tokens` (none: the backend runs as prepared)."""
        return []

    @staticmethod
    def _masked(weight: Tensor, mask: Tensor | None) -> Tensor:
        weight = weight.detach()
        return weight if mask is None else weight * mask.to(weight.device)

    def _handle(self, weight: Tensor, data: Any, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        out_f, in_f = weight.shape
        return Handle(self.name, out_f, in_f, weight.dtype, weight.device, data, dict(configs or {}))


def _cuda_sm80(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"2:4 sparse tensor cores need sm80+, device is sm{major}x"
    return True, ""


def _cusparselt_torch(device: torch.device) -> tuple[bool, str]:
    ok, why = _cuda_sm80(device)
    if not ok:
        return ok, why
    if not torch.backends.cusparselt.is_available():
        return False, "this PyTorch build has no cuSPARSELt"
    return True, ""


def _loads(load: Any, what: str) -> tuple[bool, str]:
    """(True, "") when `load()` builds/loads a backend's native library, else (False, why)."""
    try:
        load()
    except Exception as error:  # noqa: BLE001 - any build/load failure makes the backend unavailable
        return False, f"{what} unavailable: {error}"
    return True, ""


def _check_sparse_dtype(weight: Tensor) -> None:
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise BackendError(f"2:4 kernels take float16/bfloat16 weights, got {weight.dtype}")


def _pad_rows(x2d: Tensor, multiple: int) -> Tensor:
    extra = (-x2d.shape[0]) % multiple
    return F.pad(x2d, (0, 0, 0, extra)) if extra else x2d


class DenseBackend(Backend):
    name = "dense"
    sparse = False

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        return self._handle(weight, self._masked(weight, mask).contiguous())

    def linear(self, x: Tensor, handle: Handle) -> Tensor:
        return F.linear(x, handle.data)


class TorchSemiStructuredBackend(Backend):
    name = "torch-semi-structured"

    def available(self, device: torch.device) -> tuple[bool, str]:
        return _cusparselt_torch(device)

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        _check_sparse_dtype(weight)
        from torch.sparse import to_sparse_semi_structured

        return self._handle(weight, to_sparse_semi_structured(self._masked(weight, mask).contiguous()))

    def linear(self, x: Tensor, handle: Handle) -> Tensor:
        return F.linear(x, handle.data)


class CsltDirectBackend(Backend):
    """`torch._cslt_sparse_mm` on a weight compressed once, no tensor subclass; config `alg_id`.

    Same layout as the stock path (y^T written row-major, then transposed): `transpose_result=True`
    asks cuSPARSELt 0.8 for a column-major output, whose plan took ~0.2 s to build on an H100, and
    `_cslt_sparse_mm` builds its plan on every call. Kept as a diagnostic, not a tuning candidate.
    """

    name = "cslt-direct"

    def available(self, device: torch.device) -> tuple[bool, str]:
        return _cusparselt_torch(device)

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        _check_sparse_dtype(weight)
        packed = torch._cslt_compress(self._masked(weight, mask).contiguous())
        return self._handle(weight, packed, configs)

    def linear(self, x: Tensor, handle: Handle) -> Tensor:
        x2d = x.reshape(-1, handle.in_features)
        tokens = x2d.shape[0]
        config = handle.configs[nearest_bucket(tokens, list(handle.configs))] if handle.configs else {}
        padded = _pad_rows(x2d, _PAD_TOKENS)
        y_t = torch._cslt_sparse_mm(handle.data, padded.t(), alg_id=config.get("alg_id", 0))
        y = y_t[:, :tokens].t()
        return (y.contiguous() if tokens > 1 else y).reshape(*x.shape[:-1], handle.out_features)


class CusparseltPlannedBackend(Backend):
    """cuSPARSELt with plans kept per (shape, tokens, config); see `kernels.cslt`.

    Config keys: `layout` (0, 1, 2; see the shim), `alg_id`, `split_k`, `split_k_mode`. Token counts
    the library rejects unpadded are padded to a multiple of 8 (remembered per shape). Plans are
    shared by every handle of one shape and kept in a bounded LRU owned by this backend instance.
    """

    name = "cusparselt-planned"
    config_keys = ("layout", "alg_id", "split_k", "split_k_mode")
    default_layout = 1  # the stock path's layout: cheap to plan, no tuning needed

    def __init__(self, max_plans: int = 512) -> None:
        self._plans: OrderedDict[tuple, Any] = OrderedDict()
        self._max_plans = max_plans
        self._needs_pad: set[tuple[int, int, int, torch.dtype, int]] = set()

    def available(self, device: torch.device) -> tuple[bool, str]:
        ok, why = _cuda_sm80(device)
        return _loads(lambda: self._lib(device), "cuSPARSELt shim") if ok else (ok, why)

    @staticmethod
    def _lib(device: torch.device):
        from kernels.cslt import Cslt

        return Cslt.load(device)

    @staticmethod
    def _family(layout: int) -> int:
        return 2 if layout == 2 else 0

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        _check_sparse_dtype(weight)
        masked = self._masked(weight, mask).contiguous()
        layouts = {c.get("layout", self.default_layout) for c in (configs or {}).values()} or {self.default_layout}
        lib = self._lib(weight.device)
        packed = {fam: lib.compress(masked, fam) for fam in {self._family(x) for x in layouts}}
        return self._handle(weight, packed, configs)

    def plan_for(self, handle: Handle, tokens: int, config: dict[str, int]) -> tuple[Any, int]:
        """(plan, padded token count) for this shape at `tokens`, built on first use."""
        from kernels.cslt import CsltError

        layout = config.get("layout", self.default_layout)
        shape = (handle.out_features, handle.in_features, tokens, handle.dtype, layout)
        rows = tokens + (-tokens) % _PAD_TOKENS if shape in self._needs_pad else tokens
        cfg = (layout, config.get("alg_id", 0), config.get("split_k", 1), config.get("split_k_mode", 0))
        key = (handle.out_features, handle.in_features, rows, handle.dtype, *cfg)
        plan = self._plans.get(key)
        if plan is None:
            lib = self._lib(handle.device)
            try:
                plan = lib.plan(handle.out_features, handle.in_features, rows, handle.dtype, handle.device, *cfg)
            except CsltError:
                if rows % _PAD_TOKENS == 0:
                    raise
                self._needs_pad.add(shape)
                return self.plan_for(handle, tokens, config)
            self._plans[key] = plan
            if len(self._plans) > self._max_plans:
                self._plans.popitem(last=False)[1].close()
        else:
            self._plans.move_to_end(key)
        return plan, rows

    def linear(self, x: Tensor, handle: Handle) -> Tensor:
        x2d = x.reshape(-1, handle.in_features)
        if x2d.dtype != handle.dtype:
            raise BackendError(f"{self.name}: input {x2d.dtype} but weight {handle.dtype}")
        tokens = x2d.shape[0]
        config = handle.configs[nearest_bucket(tokens, list(handle.configs))] if handle.configs else {}
        layout = config.get("layout", self.default_layout)
        packed = handle.data.get(self._family(layout))
        if packed is None:
            raise BackendError(f"{self.name}: weight was not compressed for layout {layout}")
        plan, rows = self.plan_for(handle, tokens, config)
        x2d = _pad_rows(x2d.contiguous(), rows) if rows != tokens else x2d.contiguous()
        if layout == 1:
            out = torch.empty(handle.out_features, rows, dtype=handle.dtype, device=x2d.device)
            plan.matmul(packed, x2d, out)
            y = out[:, :tokens].t()
            y = y.contiguous() if tokens > 1 else y
        else:
            out = torch.empty(rows, handle.out_features, dtype=handle.dtype, device=x2d.device)
            plan.matmul(packed, x2d, out)
            y = out[:tokens] if rows != tokens else out
        return y.reshape(*x.shape[:-1], handle.out_features)


@dataclass
class _CompressedWeight:
    """A weight in CUTLASS's sm90 2:4 layout, with the (kernel, schedule) resolved per token count."""

    values: Tensor
    meta: Tensor
    lib: Any  # the loaded `Sparse24Sm90` of the weight's device
    routes: dict[int, tuple[int, Any]] = field(default_factory=dict)


class CutlassSm90Backend(Backend):
    """Our sm90a 2:4 GEMM (`kernels.cutlass24`). Config per tuned token count: `kernel` (index into
    `cutlass24.KERNELS`) and its run-time schedule: `raster`, `swizzle`, and for stream-K kernels
    `splits`/`mode`. Without a config a token count gets `default_config`, a tile sized to it;
    `candidate_configs` is what the tuner times on the real weight."""

    name = "cutlass-sm90"
    config_keys = ("kernel", "splits", "mode", "raster", "swizzle")

    def available(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda" or not torch.cuda.is_available():
            return False, "needs a CUDA GPU"
        if torch.cuda.get_device_capability(device) != (9, 0):
            major, minor = torch.cuda.get_device_capability(device)
            return False, f"sm90a kernels run on Hopper (sm90) only, device is sm{major}{minor}"
        return _loads(lambda: self._lib(device), "sm90 2:4 library")

    @staticmethod
    def _lib(device: torch.device):
        from kernels.cutlass24 import Sparse24Sm90

        return Sparse24Sm90.load(device)

    @staticmethod
    def default_config(tokens: int) -> dict[str, int]:
        from kernels.cutlass24 import KERNELS

        def index(tile_n: int, stream_k: bool) -> int:
            return next(i for i, k in enumerate(KERNELS) if k.tile_n == tile_n and k.stream_k == stream_k)

        if tokens <= 16:
            return {"kernel": index(16, True)}
        if tokens <= 64:
            return {"kernel": index(64, True)}
        return {"kernel": index(256, False)}

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        _check_sparse_dtype(weight)
        if weight.device.type != "cuda":
            raise BackendError(f"{self.name} needs a CUDA weight")
        lib = self._lib(weight.device)
        values, meta = lib.compress(self._masked(weight, mask).contiguous())
        return self._handle(weight, _CompressedWeight(values, meta, lib), configs)

    def _route(self, handle: Handle, tokens: int) -> tuple[int, Any]:
        """(kernel, schedule) for a token count not routed yet; kept on the weight, since decode calls
        are host-bound and repeat the same count."""
        from kernels.cutlass24 import Schedule

        config = (handle.configs[nearest_bucket(tokens, list(handle.configs))] if handle.configs
                  else self.default_config(tokens))
        route = (config.get("kernel", 0), Schedule.of(config))
        if len(handle.data.routes) < 4096:
            handle.data.routes[tokens] = route
        return route

    def _kernel_schedule(self, handle: Handle, tokens: int, config: dict[str, int] | None) -> tuple[int, Any]:
        """(kernel, schedule) for a call: `config` when given (the tuner's search), else the route kept on
        the weight for this token count."""
        if config is None:
            return handle.data.routes.get(tokens) or self._route(handle, tokens)
        from kernels.cutlass24 import Schedule

        return config.get("kernel", 0), Schedule.of(config)

    def linear(self, x: Tensor, handle: Handle, config: dict[str, int] | None = None) -> Tensor:
        # host time is most of a decode-sized call: this path only looks things up
        weight: _CompressedWeight = handle.data
        x2d = x.reshape(-1, handle.in_features)
        if x2d.dtype != handle.dtype:
            raise BackendError(f"{self.name}: input {x2d.dtype} but weight {handle.dtype}")
        kernel, schedule = self._kernel_schedule(handle, x2d.shape[0], config)
        y = weight.lib.linear(x2d.contiguous(), weight.values, weight.meta, handle.out_features, kernel, schedule)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], handle.out_features)

    def candidate_configs(self, tokens: int) -> list[dict[str, int]]:
        """Every kernel with the scheduler's own choices; for few tokens, stream-K kernels also split K
        2/4/8 ways; for many, the large tiles also try each raster order with swizzles 1, 4 and 8 (an
        activation matrix larger than L2 is re-read per wave unless neighbouring tiles share it)."""
        from kernels.cutlass24 import KERNELS, RASTER, STREAM_K_MODES

        out = []
        for i, kernel in enumerate(KERNELS):
            out.append({"kernel": i})
            if kernel.stream_k and tokens <= 512:
                out.append({"kernel": i, "mode": STREAM_K_MODES["stream_k"]})
                out += [{"kernel": i, "splits": s, "mode": STREAM_K_MODES["split_k"]} for s in (2, 4, 8)]
            if not kernel.stream_k and tokens >= 1024:
                out += [{"kernel": i, "raster": RASTER[r], "swizzle": s}
                        for r in ("along_m", "along_n") for s in (1, 4, 8)]
        return out


class ReferenceBackend(Backend):
    """Pure-torch 2:4 reference: packs with `Packed24`, unpacks on every call. Correct, never fast."""

    name = "sparse24-reference"

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def prepare(self, weight: Tensor, mask: Tensor | None, configs: dict[int, dict[str, int]] | None = None) -> Handle:
        return self._handle(weight, Packed24.from_dense(weight.detach(), mask))

    def linear(self, x: Tensor, handle: Handle) -> Tensor:
        return F.linear(x, handle.data.to_dense())


BACKENDS: dict[str, type[Backend]] = {
    DenseBackend.name: DenseBackend,
    TorchSemiStructuredBackend.name: TorchSemiStructuredBackend,
    CsltDirectBackend.name: CsltDirectBackend,
    CusparseltPlannedBackend.name: CusparseltPlannedBackend,
    CutlassSm90Backend.name: CutlassSm90Backend,
    ReferenceBackend.name: ReferenceBackend,
}

# what tuning tries on a GPU, in order; `dense` is always the baseline; the FP8 ones only on quantized layers
GPU_CANDIDATES = ("dense", "torch-semi-structured", "cusparselt-planned", "cutlass-sm90", "dense-fp8",
                  "cutlass-sm90-fp8")


def all_backends() -> dict[str, type[Backend]]:
    """Every backend by name, the FP8 ones (`kernels.fp8_backends`, which builds on this module) included."""
    from kernels.fp8_backends import FP8_BACKENDS

    return {**BACKENDS, **FP8_BACKENDS}


def make_backends(names: list[str] | tuple[str, ...]) -> dict[str, Backend]:
    known = all_backends()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown backend(s) {unknown}; known: {', '.join(known)}")
    return {name: known[name]() for name in names}
