"""Our own Hopper 2:4 GEMM: CUTLASS 3.x sm90a sparse kernels, built with nvcc, called through ctypes.

`csrc/sparse24_sm90.cuh` holds the templates; `csrc/sparse24_sm90_kernel.cu` is compiled once per
(16-bit element type, entry of `KERNELS`), `csrc/sparse24_sm90_fp8_kernel.cu` (e4m3 inputs, the per-channel
and per-token scales applied in the epilogue, bf16 output; `csrc/sparse24_sm90_fp8.cuh`) once per entry,
and `csrc/sparse24_sm90_compress.cu` once per element type, all in parallel, then linked into one shared
library in the cache folder (`SPARSEFLOW_CACHE`, default
`~/.cache/sparseflow`). The library's name carries a hash of the sources, the CUTLASS version, the
nvcc release and the table below, so a cache filled ahead of time (`python -m kernels.cutlass24
build`, on any machine with nvcc, no GPU needed) is used as is, and a change rebuilds.

The headers come from the `nvidia-cutlass` wheel (its `cutlass_library` package ships them) or from
`CUTLASS_PATH` (a CUTLASS checkout). Nothing is built or loaded at import time.

Why a library of our own: cuSPARSELt through PyTorch is slower than dense cuBLAS on most LLM shapes
on Hopper (see docs/kernels.md), and this one computes y[T, N] = x[T, K] W[N, K]^T with the sparse
weight as CUTLASS's A operand and no transposes, with tile shapes picked per (shape, tokens) by the
tuner, including split-K through CUTLASS's stream-K scheduler for few tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_HEADER = _CSRC / "sparse24_sm90.cuh"
_KERNEL_TU = _CSRC / "sparse24_sm90_kernel.cu"
_COMPRESS_TU = _CSRC / "sparse24_sm90_compress.cu"
_FP8_HEADER = _CSRC / "sparse24_sm90_fp8.cuh"
_FP8_KERNEL_TU = _CSRC / "sparse24_sm90_fp8_kernel.cu"
_ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)  # wgmma needs the "a" target
_ELEMENTS = {torch.float16: ("f16", "cutlass::half_t"), torch.bfloat16: ("bf16", "cutlass::bfloat16_t")}
FP8 = torch.float8_e4m3fn  # the FP8 kernels' input type; their output is bfloat16
STATUS = {1: "cannot implement this problem", 2: "initialize failed", 3: "launch failed", 4: "CUDA error"}


class Cutlass24Error(RuntimeError):
    """Building, loading or running the sm90 2:4 library failed; the message says which step."""


@dataclass(frozen=True)
class KernelConfig:
    """One compiled GEMM: CTA tile (M over weight rows, N over tokens; K is always 128), cluster,
    warp-specialized schedule (cooperative: two consumer warpgroups split M; ping-pong: they alternate
    tiles) and tile scheduler (persistent, or stream-K, which also does split-K for few tokens)."""

    tile_m: int
    tile_n: int
    cluster_m: int = 1
    cluster_n: int = 1
    pingpong: bool = False
    stream_k: bool = False

    @property
    def name(self) -> str:
        kind = "pingpong" if self.pingpong else "coop"
        tail = "_streamk" if self.stream_k else ""
        return f"{kind}_{self.tile_m}x{self.tile_n}_c{self.cluster_m}x{self.cluster_n}{tail}"

    def defines(self) -> list[str]:
        return [f"-DSF24_TILE_M={self.tile_m}", f"-DSF24_TILE_N={self.tile_n}", f"-DSF24_CLUSTER_M={self.cluster_m}",
                f"-DSF24_CLUSTER_N={self.cluster_n}", f"-DSF24_PINGPONG={int(self.pingpong)}",
                f"-DSF24_STREAMK={int(self.stream_k)}"]


# Large prefill tiles (the activations multicast over a 2x1 cluster, or the weight over 1x2), a
# ping-pong tile for mid-size problems, and narrow stream-K tiles for decode-sized token counts.
KERNELS: tuple[KernelConfig, ...] = (
    KernelConfig(128, 256),
    KernelConfig(128, 256, cluster_m=2),
    KernelConfig(256, 128),
    KernelConfig(128, 128, cluster_n=2),
    KernelConfig(64, 128, pingpong=True),
    KernelConfig(128, 64, stream_k=True),
    KernelConfig(128, 32, stream_k=True),
    KernelConfig(128, 16, stream_k=True),
)
STREAM_K_MODES = {"heuristic": 0, "data_parallel": 1, "split_k": 2, "stream_k": 3}
RASTER = {"heuristic": 0, "along_m": 1, "along_n": 2}


def find_cutlass() -> tuple[list[Path], str]:
    """(include folders, CUTLASS version) from CUTLASS_PATH or the nvidia-cutlass wheel."""
    roots = []
    if os.environ.get("CUTLASS_PATH"):
        roots.append(Path(os.environ["CUTLASS_PATH"]))
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p) / "source" for p in spec.submodule_search_locations)
    for root in roots:
        version_h = root / "include" / "cutlass" / "version.h"
        if version_h.is_file():
            text = version_h.read_text()
            parts = [re.search(rf"#define CUTLASS_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
            version = ".".join(m.group(1) if m else "?" for m in parts)
            return [root / "include", root / "tools" / "util" / "include"], version
    raise Cutlass24Error("CUTLASS headers not found: pip install nvidia-cutlass (or set CUTLASS_PATH to a checkout)")


def find_nvcc() -> tuple[str, str]:
    """(nvcc path, its release line); nvcc 12.3+ is needed for sm90a sparse wgmma."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for nvcc in filter(None, candidates):
        if Path(nvcc).is_file():
            done = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
            release = next((ln for ln in done.stdout.splitlines() if "release" in ln), done.stdout.strip())
            return nvcc, release.strip()
    raise Cutlass24Error("nvcc not found (set NVCC or CUDA_HOME); it builds the sm90 2:4 kernels")


def cache_dir(path: Path | str | None = None) -> Path:
    """Where this node keeps the kernels' compiled libraries (`path`, else `$SPARSEFLOW_CACHE`, else
    `~/.cache/sparseflow`); every kernel library of the package builds there.

    A property of the node that compiles and loads kernels (like `NVCC` or `CUDA_HOME`), read where they
    build: a Ray GPU node's image prefills it, and the service's settings, which describe the service, do
    not reach a stage's worker process."""
    return Path(path or os.environ.get("SPARSEFLOW_CACHE", Path.home() / ".cache" / "sparseflow"))


def library_key(kernels: tuple[KernelConfig, ...] = KERNELS) -> tuple[str, list[Path], str]:
    """(hash naming the library, include folders, nvcc path) for the current sources and toolchain."""
    includes, version = find_cutlass()
    nvcc, release = find_nvcc()
    digest = hashlib.sha256()
    for source in (_HEADER, _KERNEL_TU, _COMPRESS_TU, _FP8_HEADER, _FP8_KERNEL_TU):
        digest.update(source.read_bytes())
    digest.update(repr((version, release, _ARCH_FLAGS, kernels, sorted(v[0] for v in _ELEMENTS.values()))).encode())
    return digest.hexdigest()[:16], includes, nvcc


def _compile(nvcc: str, includes: list[Path], source: Path, defines: list[str], obj: Path) -> None:
    partial = obj.with_suffix(f".{os.getpid()}.tmp.o")
    cmd = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", *_ARCH_FLAGS, "-Xcompiler", "-fPIC",
           *[f"-I{p}" for p in includes], *defines, "-c", str(source), "-o", str(partial)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise Cutlass24Error(f"nvcc failed on {source.name} {' '.join(defines)}:\n{done.stderr.strip()[-3000:]}")
    partial.replace(obj)


def build_library(cache: Path | str | None = None, jobs: int | None = None,
                  kernels: tuple[KernelConfig, ...] = KERNELS) -> Path:
    """Compile (once per key) and return the shared library's path. Takes minutes: ~1 min per object, 27 objects."""
    key, includes, nvcc = library_key(kernels)
    target = cache_dir(cache) / f"libsf_sparse24_sm90-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    units: list[tuple[Path, list[str], str]] = []
    for tag, element in _ELEMENTS.values():
        units.append((_COMPRESS_TU, [f"-DSF24_NAME=sf24_compress_{tag}", f"-DSF24_ELEMENT={element}"], f"c_{tag}"))
        for i, config in enumerate(kernels):
            defines = [f"-DSF24_NAME=sf24_{tag}_{i}", f"-DSF24_ELEMENT={element}", *config.defines()]
            units.append((_KERNEL_TU, defines, f"k_{tag}_{i}"))
    units.append((_COMPRESS_TU, ["-DSF24_NAME=sf24_compress_e4m3", "-DSF24_FP8=1"], "c_e4m3"))
    for i, config in enumerate(kernels):
        units.append((_FP8_KERNEL_TU, [f"-DSF24_NAME=sf24_e4m3_{i}", *config.defines()], f"k_e4m3_{i}"))
    # objects are kept per key, so an interrupted build resumes where it stopped
    objects_dir = target.parent / f"sf24-objects-{key}"
    objects_dir.mkdir(exist_ok=True)
    objects = [objects_dir / f"{name}.o" for _, _, name in units]
    todo = [(source, defines, obj) for (source, defines, _), obj in zip(units, objects, strict=True)
            if not obj.is_file()]
    jobs = jobs or max(1, os.cpu_count() or 1)
    log.info("building %s: %d of %d objects to compile, %d jobs", target.name, len(todo), len(units), jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda unit: _compile(nvcc, includes, *unit), todo))
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    # CUTLASS reaches the driver through cudart's entry-point lookup: no -lcuda (no stub needed)
    cmd = [nvcc, "-shared", *_ARCH_FLAGS, *map(str, objects), "-o", str(partial)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise Cutlass24Error(f"linking the sm90 2:4 library failed:\n{done.stderr.strip()[-3000:]}")
    partial.replace(target)
    shutil.rmtree(objects_dir, ignore_errors=True)
    log.info("built %s", target)
    return target


class Schedule(NamedTuple):
    """Run-time scheduling of one kernel: split-K (stream-K kernels), raster order and swizzle."""

    splits: int = 1
    mode: int = 0  # STREAM_K_MODES
    raster: int = 0  # RASTER
    swizzle: int = 1  # 1, 2, 4 or 8

    @classmethod
    def of(cls, config: dict[str, int]) -> Schedule:
        return cls(*(int(config.get(f, d)) for f, d in zip(cls._fields, cls._field_defaults.values(), strict=True)))


def current_stream(device: torch.device) -> int:
    """The current CUDA stream's handle; torch's raw getter skips building a Stream object per call."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device.index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


class Sparse24Sm90:
    """The loaded library for one device. Create it through `Sparse24Sm90.load(device)`."""

    _loaded: dict[int, Sparse24Sm90] = {}

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path = path
        self.device = device
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        lib = ctypes.CDLL(str(path))
        vp, i32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        self._compress: dict[torch.dtype, tuple] = {}
        self._kernels: dict[tuple[torch.dtype, int], tuple] = {}
        for dtype, tag in [*((d, t) for d, (t, _) in _ELEMENTS.items()), (FP8, "e4m3")]:
            sizes = getattr(lib, f"sf24_compress_{tag}_sizes")
            sizes.argtypes = [i32, i32, ctypes.POINTER(sz), ctypes.POINTER(sz)]
            workspace = getattr(lib, f"sf24_compress_{tag}_workspace")
            workspace.argtypes, workspace.restype = [i32, i32], sz
            run = getattr(lib, f"sf24_compress_{tag}_run")
            run.argtypes = [i32, i32, vp, vp, vp, vp, sz, i32, i32, vp]
            self._compress[dtype] = (sizes, workspace, run)
            for i in range(len(KERNELS)):
                ws = getattr(lib, f"sf24_{tag}_{i}_workspace")
                ws.argtypes = [i32] * 9 + [ctypes.POINTER(sz)]
                gemm = getattr(lib, f"sf24_{tag}_{i}_run")
                scales = [vp, vp] if dtype == FP8 else []  # weight scale [N], token scale [T]
                gemm.argtypes = [i32, i32, i32, vp, vp, vp, vp, *scales, vp, sz, i32, i32, i32, i32, i32, i32, vp]
                self._kernels[(dtype, i)] = (ws, gemm)
        self._lib = lib
        self._workspaces: dict[int, torch.Tensor] = {}
        self._workspace_sizes: dict[tuple, int] = {}

    @classmethod
    def load(cls, device: torch.device, cache: Path | str | None = None) -> Sparse24Sm90:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        if index not in cls._loaded:
            major, minor = torch.cuda.get_device_capability(index)
            if (major, minor) != (9, 0):
                raise Cutlass24Error(f"sm90a kernels need a Hopper GPU (sm90), device is sm{major}{minor}")
            cls._loaded[index] = cls(build_library(cache), torch.device("cuda", index))
        return cls._loaded[index]

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status:
            raise Cutlass24Error(f"{what}: {STATUS.get(status, f'status {status}')}")

    def compress(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, metadata) of a 2:4-pruned (N, K) fp16/bf16/e4m3 CUDA weight in CUTLASS's sm90 layout.

        Each group of 4 along K keeps its (at most 2) non-zeros; a group with more is a caller error
        that the backend's correctness check catches, since the extra values are dropped."""
        if weight.dtype not in self._compress or not weight.is_cuda or weight.dim() != 2:
            raise Cutlass24Error(f"compress needs a 2-D fp16/bf16/e4m3 CUDA tensor, got {weight.dtype} "
                                 f"on {weight.device}")
        weight = weight.contiguous()
        m, k = weight.shape
        sizes, workspace, run = self._compress[weight.dtype]
        values_bytes, meta_bytes = ctypes.c_size_t(), ctypes.c_size_t()
        self._check(sizes(m, k, ctypes.byref(values_bytes), ctypes.byref(meta_bytes)), f"sizes of {m}x{k}")
        values = torch.zeros(values_bytes.value, dtype=torch.uint8, device=weight.device)
        meta = torch.zeros(meta_bytes.value, dtype=torch.uint8, device=weight.device)
        scratch = torch.empty(max(workspace(m, k), 1), dtype=torch.uint8, device=weight.device)
        self._check(run(m, k, weight.data_ptr(), values.data_ptr(), meta.data_ptr(), scratch.data_ptr(),
                        scratch.numel(), self.device.index, self.sm_count, self._stream()), f"compress {m}x{k}")
        return values, meta

    def workspace_bytes(self, dtype: torch.dtype, kernel: int, m: int, n: int, k: int, schedule: Schedule) -> int:
        """Workspace for one problem; raises `Cutlass24Error` when the kernel cannot run it."""
        ws, _ = self._kernels[(dtype, kernel)]
        size = ctypes.c_size_t()
        self._check(ws(m, n, k, *schedule, self.device.index, self.sm_count, ctypes.byref(size)),
                    f"{KERNELS[kernel].name} on {m}x{k}, {n} tokens, {schedule}")
        return size.value

    def _stream(self) -> int:
        return current_stream(self.device)

    def _launch_workspace(self, problem: tuple) -> tuple[int, int, torch.Tensor | None]:
        """(workspace bytes, stream, workspace buffer) for one call; the size is asked once per problem,
        which also checks that the kernel can run it."""
        nbytes = self._workspace_sizes.get(problem)
        if nbytes is None:
            nbytes = self._workspace_sizes[problem] = self.workspace_bytes(*problem)
        stream = self._stream()
        return nbytes, stream, self._workspace(nbytes, stream)

    def _workspace(self, nbytes: int, stream: int) -> torch.Tensor | None:
        if nbytes == 0:
            return None
        buf = self._workspaces.get(stream)
        if buf is None or buf.numel() < nbytes:  # one grow-only buffer per stream: calls on it are ordered
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._workspaces[stream] = buf
        return buf

    def linear(self, x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, out_features: int,
               kernel: int = 0, schedule: Schedule | None = None) -> torch.Tensor:
        """y[T, N] = x2d[T, K] @ W^T with W given by `compress`; x2d contiguous, same dtype as W."""
        tokens, k = x2d.shape
        dtype = x2d.dtype
        schedule = schedule or Schedule()
        out = torch.empty(tokens, out_features, dtype=dtype, device=x2d.device)
        nbytes, stream, workspace = self._launch_workspace((dtype, kernel, out_features, tokens, k, schedule))
        status = self._kernels[(dtype, kernel)][1](
            out_features, tokens, k, values.data_ptr(), meta.data_ptr(), x2d.data_ptr(), out.data_ptr(),
            None if workspace is None else workspace.data_ptr(), nbytes, *schedule, self.device.index,
            self.sm_count, stream)
        self._check(status, f"{KERNELS[kernel].name} on {out_features}x{k}, {tokens} tokens, {schedule}")
        return out

    def linear_fp8(self, xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                   w_scale: torch.Tensor, out_features: int, kernel: int = 0,
                   schedule: Schedule | None = None) -> torch.Tensor:
        """bf16 y[T, N] = x_scale[T] * w_scale[N] * (xq[T, K] @ Wq^T), Wq given by `compress` of e4m3 codes.

        xq contiguous e4m3, x_scale fp32 [T] (per token), w_scale fp32 [N] (per output channel)."""
        tokens, k = xq.shape
        schedule = schedule or Schedule()
        out = torch.empty(tokens, out_features, dtype=torch.bfloat16, device=xq.device)
        nbytes, stream, workspace = self._launch_workspace((FP8, kernel, out_features, tokens, k, schedule))
        status = self._kernels[(FP8, kernel)][1](
            out_features, tokens, k, values.data_ptr(), meta.data_ptr(), xq.data_ptr(), out.data_ptr(),
            w_scale.data_ptr(), x_scale.data_ptr(), None if workspace is None else workspace.data_ptr(), nbytes,
            *schedule, self.device.index, self.sm_count, stream)
        self._check(status, f"e4m3 {KERNELS[kernel].name} on {out_features}x{k}, {tokens} tokens, {schedule}")
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the sm90 2:4 GEMM library into the cache ahead of time.")
    parser.add_argument("command", choices=["build", "key"])
    parser.add_argument("--cache", default=None, help="default: $SPARSEFLOW_CACHE or ~/.cache/sparseflow")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "key":
        print(library_key()[0])
    else:
        print(build_library(args.cache, args.jobs))


if __name__ == "__main__":
    main()
