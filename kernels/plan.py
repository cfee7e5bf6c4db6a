"""The kernel plan: which kernel each Linear shape uses at each token count, on which GPU.

A plan is a JSON artifact (kind `kernel_plan`), validated by pydantic models that forbid unknown
keys. It is keyed by the environment it was measured in (GPU name and capability, CUDA, driver,
torch, cuSPARSELt), the dtype, and the weight shape `"<out>x<in>"`; under each shape, by the token
counts that were tuned. Sample (abridged)::

    {"format": "sparseflow.kernel_plan", "version": 1, "dtype": "float16", "tokens": [1, 2048],
     "environment": {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "cuda": "13.0", ...},
     "shapes": {"11008x4096": {"out_features": 11008, "in_features": 4096, "layers": ["model.layers.0.mlp.up_proj"],
                "choices": {"1": {"backend": "dense", "reason": "best sparse (...) 0.93x, below 1.02x", ...},
                            "2048": {"backend": "cusparselt-planned", "config": {"alg_id": 1, ...},
                                     "times_ms": {"dense": 0.61, "cusparselt-planned": 0.43}, "speedup": 1.42}}}}}

`apply_plan` swaps each 2:4 Linear whose shape has a sparse choice for a `SparseLinear`, which picks
the backend by the runtime token count (nearest tuned count, log scale) and runs dense elsewhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from kernels.backends import Backend, Handle, make_backends, nearest_bucket
from kernels.sparse24 import is_24, mask_from_zero_pattern

log = logging.getLogger(__name__)

PLAN_FORMAT = "sparseflow.kernel_plan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan file that cannot be read, or one that does not fit the model or machine."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Environment(_Strict):
    gpu: str | None = Field(None, description="GPU name as CUDA reports it; None: not measured on a GPU.")
    capability: str | None = None
    cuda: str | None = None
    driver: str | None = None
    torch: str
    cusparselt: int | None = None
    sparse24_sm90: str | None = Field(None, description="Key of our sm90 2:4 library build; None: not built here.")


class KernelChoice(_Strict):
    backend: str = "dense"
    config: dict[str, int] = Field(default_factory=dict)
    times_ms: dict[str, float] = Field(default_factory=dict, description="Median per-call time per backend.")
    max_rel_error: dict[str, float | None] = Field(default_factory=dict)
    speedup: float | None = Field(None, description="Dense time over the chosen backend's; None: not measured.")
    confirmed_speedups: list[float] = Field(default_factory=list, description="Paired dense/sparse re-timings.")
    reason: str = ""
    rejected: dict[str, str] = Field(default_factory=dict, description="Backend -> why it was not a candidate.")
    searched_configs: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Backend -> the config its in-process search found, chosen or not.")
    eager_backend: str | None = Field(
        None, description="Backend for calls outside CUDA graphs, where host time counts; None: `backend`.")
    eager_reason: str = ""
    host_us: dict[str, float] = Field(default_factory=dict, description="Host microseconds to issue one call.")

    def route(self, graphed: bool) -> str:
        """The backend for a call captured into a CUDA graph (`graphed`) or run eagerly."""
        return self.backend if graphed or self.eager_backend is None else self.eager_backend


class ShapePlan(_Strict):
    out_features: int = Field(ge=1)
    in_features: int = Field(ge=1)
    layers: list[str] = Field(default_factory=list)
    choices: dict[int, KernelChoice]


class KernelPlan(_Strict):
    format: Literal["sparseflow.kernel_plan"] = PLAN_FORMAT
    version: Literal[1] = PLAN_VERSION
    environment: Environment
    dtype: Literal["float16", "bfloat16"] = "float16"
    tokens: list[int]
    shapes: dict[str, ShapePlan] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    def sparse_shapes(self) -> dict[str, ShapePlan]:
        return {k: s for k, s in self.shapes.items() if any(c.backend != "dense" for c in s.choices.values())}


def environment_of(device: torch.device | None) -> Environment:
    from kernels.timing import device_info

    info = device_info(device)
    return Environment(gpu=info.get("gpu"), capability=info.get("capability"), cuda=info.get("cuda"),
                       driver=info.get("driver"), torch=info["torch"], cusparselt=info.get("cusparselt"),
                       sparse24_sm90=_sparse24_key(info.get("capability")))


def _sparse24_key(capability: str | None) -> str | None:
    """Our sm90 library's key where it can run (a Hopper GPU, with nvcc and the CUTLASS headers)."""
    if capability != "9.0":
        return None
    from kernels.cutlass24 import Cutlass24Error, library_key

    try:
        return library_key()[0]
    except Cutlass24Error:
        return None


def save_plan(plan: KernelPlan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.model_dump(mode="json"), indent=1, sort_keys=False) + "\n")
    return path


def load_plan(path: str | Path) -> KernelPlan:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PlanError(f"{path}: cannot read kernel plan: {error}") from error
    if isinstance(data, dict) and data.get("version") not in (None, PLAN_VERSION):
        raise PlanError(f"{path}: kernel plan version {data.get('version')!r}, this code reads {PLAN_VERSION}")
    try:
        return KernelPlan.model_validate(data)
    except ValidationError as error:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PlanError(f"{path}: invalid kernel plan: {fields}") from error


Route = tuple[Backend | None, Any]  # (backend, handle); backend None: `F.linear` on the dense weight


class GraphMode:
    """Whether the model a plan was applied to is being captured into a CUDA graph, asked once per model call.

    A layer whose eager and graphed routes differ must know which mode each call is in. Asking the stream
    (`torch.cuda.is_current_stream_capturing`) in every such layer cost about 3 µs a call inside a host-paced
    eager decode step, 1% of the step with 12 such layers (bench/decode_host_probe.py, H200); `apply_plan`
    therefore asks once, in a forward pre-hook on the model, and its layers read the answer. `capturing` is
    None outside a model call: a layer called on its own asks the stream itself.
    """

    __slots__ = ("capturing",)

    def __init__(self) -> None:
        self.capturing: bool | None = None

    def enter(self, module: nn.Module, args: Any) -> None:
        self.capturing = torch.cuda.is_current_stream_capturing()

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.capturing = None


class SparseLinear(nn.Module):
    """A Linear whose forward runs the plan's backend for the runtime token count.

    Holds one handle per backend its choices name (the dense one is the masked weight). The weight
    is not a trainable parameter any more: this module is for inference. A token count routed to
    dense calls `F.linear` with the bias fused, as `nn.Linear` does, so a tuned model pays nothing
    where dense was chosen. Calls captured into a CUDA graph follow each choice's `backend`; eager
    calls follow its `eager_backend` (host time counts there). Only a layer whose two routes differ needs to
    know which mode a call is in; it reads that from its `GraphMode` (shared by the model's layers, set once
    per model call by `apply_plan`'s hook), or asks the stream when called outside its model.
    """

    def __init__(self, linear: nn.Linear, mask: torch.Tensor | None, choices: Mapping[int, KernelChoice],
                 backends: Mapping[str, Backend], fp8_scale: Any = None, graph_mode: GraphMode | None = None) -> None:
        super().__init__()
        self._graph_mode = graph_mode or GraphMode()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.choices = {int(t): c for t, c in choices.items()}
        self.buckets = sorted(self.choices)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        names = {c.route(graphed) for c in self.choices.values() for graphed in (False, True)}
        self._backends = {name: backends[name] for name in names}
        self._handles: dict[str, Handle] = {}
        for name, backend in self._backends.items():
            configs = {t: c.config for t, c in self.choices.items() if c.backend == name and c.config}
            extra = {"scale": fp8_scale} if backend.fp8 else {}
            self._handles[name] = backend.prepare(linear.weight, mask, configs, **extra)
        self._modes_differ = any(c.route(False) != c.route(True) for c in self.choices.values())
        self._routes: dict[tuple[int, bool], Route] = {}
        # the fast paths: inputs of up to `_dense_numel` elements route to dense in both modes, of up to
        # `_eager_dense_numel` in eager mode. Plain attributes, not a Parameter or buffer, so reading them skips
        # nn.Module's attribute lookup
        self._dense_weight = self._handles["dense"].data if "dense" in self._handles else None
        no_dense = self._dense_weight is None
        self._dense_numel = -1 if no_dense else self._dense_tokens((False, True)) * self.in_features
        self._eager_dense_numel = -1 if no_dense else self._dense_tokens((False,)) * self.in_features
        self._bias = None if self.bias is None else self.bias.data

    def _dense_tokens(self, modes: tuple[bool, ...]) -> int:
        """The largest token count up to which every count routes to dense in each of `modes` (False: eager,
        True: graphed; 0: none)."""
        sparse = [t for t in self.buckets if {self.choices[t].route(g) for g in modes} != {"dense"}]
        if not sparse:
            return 2**62
        low, high = 0, sparse[0]  # nearest_bucket is monotone in the token count: bisect the boundary
        while low < high:
            mid = (low + high + 1) // 2
            routes = {self.backend_for(mid, graphed) for graphed in modes}
            low, high = (mid, high) if routes == {"dense"} else (low, mid - 1)
        return low

    def backend_for(self, tokens: int, graphed: bool = False) -> str:
        return self.choices[nearest_bucket(tokens, self.buckets)].route(graphed)

    def _resolve(self, tokens: int, graphed: bool) -> Route:
        """Resolved once per (token count, mode): a decode step is bound by host time."""
        name = self.backend_for(tokens, graphed)
        handle = self._handles[name]
        route: Route = (None, handle.data) if name == "dense" else (self._backends[name], handle)
        if len(self._routes) < 4096:
            self._routes[(tokens, graphed)] = route
        return route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        numel = x.numel()
        if numel <= self._dense_numel:  # as cheap as nn.Linear: decode-sized calls are bound by host time
            return F.linear(x, self._dense_weight, self._bias)
        graphed = False
        if self._modes_differ:
            graphed = self._graph_mode.capturing
            if graphed is None:  # called outside the model's own call
                graphed = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if numel <= self._eager_dense_numel and not graphed:  # eager decode of a layer sparse only in graphs
            return F.linear(x, self._dense_weight, self._bias)
        tokens = numel // self.in_features
        backend, handle = self._routes.get((tokens, graphed)) or self._resolve(tokens, graphed)
        if backend is None:
            return F.linear(x, handle, self._bias)
        y = backend.linear(x, handle)
        return y if self._bias is None else y + self._bias

    def extra_repr(self) -> str:
        def pick(choice: KernelChoice) -> str:
            eager = choice.route(graphed=False)
            return choice.backend + (f" (eager {eager})" if eager != choice.backend else "")

        picks = ", ".join(f"{t}:{pick(self.choices[t])}" for t in self.buckets)
        return f"in_features={self.in_features}, out_features={self.out_features}, tokens->backend {{{picks}}}"


@dataclass
class ApplyReport:
    replaced: dict[str, str] = field(default_factory=dict)  # module name -> shape key
    dense: dict[str, str] = field(default_factory=dict)  # module name -> why it stayed nn.Linear
    graph_mode_hooks: list[Any] = field(default_factory=list)  # GraphMode's hooks on the model, when registered


def check_environment(plan: KernelPlan, device: torch.device) -> None:
    """Raise `PlanError` when a plan with sparse choices was measured on another GPU or torch."""
    if not plan.sparse_shapes():
        return
    here = environment_of(device)
    for attr in ("gpu", "torch"):
        if getattr(here, attr) != getattr(plan.environment, attr):
            raise PlanError(
                f"kernel plan measured with {attr}={getattr(plan.environment, attr)!r}, "
                f"this process has {getattr(here, attr)!r}: tune again on this machine"
            )


def apply_plan(
    model: nn.Module,
    plan: KernelPlan,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    backends: Mapping[str, Backend] | None = None,
    check_env: bool = True,
    fp8_scales: Mapping[str, Any] | None = None,
) -> ApplyReport:
    """Swap 2:4 Linears for `SparseLinear` where the plan has a sparse choice for their shape.

    `masks` maps module names to boolean 2:4 masks; None reads the masks off the weights' zero pattern (a Linear
    whose weight is not 2:4 stays dense). `fp8_scales` maps the names of layers quantized to FP8 to their scales (a
    weight scale tensor, or `kernels.fp8.Fp8Scales`): those follow their shape's `:fp8` choices, the only ones that
    may name FP8 kernels. The model must already be on the device and in the dtype the plan was tuned for.
    When some replaced layer routes differently in CUDA graphs and eagerly, the model gets a forward pre-hook
    and hook (`GraphMode`; their handles are in the report) that ask once per call whether it is captured.
    """
    report = ApplyReport()
    sparse = plan.sparse_shapes()
    if not sparse:
        return report
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if check_env:
        check_environment(plan, device)
    needed = {c.backend for s in sparse.values() for c in s.choices.values()}
    backends = dict(backends) if backends is not None else make_backends(sorted(needed))
    for name in needed:
        if name not in backends:
            raise PlanError(f"plan names backend {name!r}, which is not available here")
        ok, why = backends[name].available(device)
        if not ok:
            raise PlanError(f"plan names backend {name!r}, unavailable on {device}: {why}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    fp8_scales = fp8_scales or {}
    graph_mode, modes_differ = GraphMode(), False
    for name, linear in targets:
        scale = fp8_scales.get(name)
        key = f"{linear.out_features}x{linear.in_features}"
        if scale is not None:
            key += ":fp8" if masks is not None and name in masks or is_24(linear.weight) else ":fp8-dense"
        if key not in sparse:
            continue
        if masks is not None:
            if name not in masks:
                report.dense[name] = "no mask given"
                continue
            mask = masks[name].to(device=linear.weight.device, dtype=torch.bool)
        elif is_24(linear.weight):
            mask = mask_from_zero_pattern(linear.weight)
        elif scale is not None and not any(backends[c.route(g)].sparse for c in sparse[key].choices.values()
                                           for g in (False, True) if c.route(g) != "dense"):
            mask = None  # a quantized layer that was not pruned: dense FP8 needs no pattern
        else:
            report.dense[name] = "weight does not follow 2:4"
            continue
        if linear.weight.dtype != getattr(torch, plan.dtype):
            raise PlanError(f"{name}: weight is {linear.weight.dtype}, plan was tuned for {plan.dtype}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = SparseLinear(linear, mask, sparse[key].choices, backends, scale, graph_mode)
        setattr(parent, child, layer)
        report.replaced[name] = key
        modes_differ = modes_differ or layer._modes_differ
    if modes_differ and device.type == "cuda":
        report.graph_mode_hooks = [model.register_forward_pre_hook(graph_mode.enter),
                                   model.register_forward_hook(graph_mode.leave, always_call=True)]
    log.info("kernel plan applied: %d Linears sparse, %d kept dense", len(report.replaced), len(report.dense))
    return report


def dense_plan(shapes: Mapping[str, tuple[int, int, list[str]]], tokens: list[int], dtype: str, reason: str,
               environment: Environment, notes: list[str] | None = None) -> KernelPlan:
    """A plan that marks every shape dense for every token count, with `reason` and no timings."""
    return KernelPlan(
        environment=environment, dtype=dtype, tokens=list(tokens), notes=list(notes or []),
        shapes={k: ShapePlan(out_features=o, in_features=i, layers=layers,
                             choices={t: KernelChoice(backend="dense", reason=reason) for t in tokens})
                for k, (o, i, layers) in shapes.items()},
    )


def plan_from_tuning(tuned: Mapping[str, Mapping[int, Mapping[str, Any]]], layers: Mapping[str, list[str]],
                     tokens: list[int], dtype: str, environment: Environment,
                     notes: list[str] | None = None) -> KernelPlan:
    """Wrap `kernels.autotune.tune` output into a validated plan."""
    shapes = {}
    for key, choices in tuned.items():
        out_f, in_f = (int(v) for v in key.partition(":")[0].split("x"))
        shapes[key] = ShapePlan(out_features=out_f, in_features=in_f, layers=list(layers.get(key, [])),
                                choices={int(t): KernelChoice(**c) for t, c in choices.items()})
    return KernelPlan(environment=environment, dtype=dtype, tokens=list(tokens), shapes=shapes, notes=list(notes or []))
