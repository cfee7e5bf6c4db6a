"""cuSPARSELt with plans that live as long as the weight: a ctypes binding over `csrc/cslt_shim.cpp`.

The shim is compiled on first use (a C++ compiler and the `cusparseLt.h` shipped with the loaded
library, from the `nvidia-cusparselt` wheel or `CUSPARSELT_PATH`) into a cache folder keyed by the
source and header hashes. Nothing happens at import time.

`Cslt.plan(out, in, tokens, dtype, device, layout, alg_id, split_k, split_k_mode)` builds the
descriptors and the plan once; `CsltPlan.matmul(w_packed, x, out)` is then one `cusparseLtMatmul` on
the current stream. Layouts (see the shim): 0 and 2 write y[T, N] in place; 1 writes y^T[N, T].
A weight is compressed per layout family: `compress(w, layout)` (layouts 0 and 1 share one form).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.cutlass24 import cache_dir as build_cache_dir

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "cslt_shim.cpp"
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}


class CsltError(RuntimeError):
    """cuSPARSELt (or building the shim over it) failed; the message names the call and status."""


def _site_roots() -> list[Path]:
    roots: list[Path] = []
    env = os.environ.get("CUSPARSELT_PATH")
    if env:
        roots.append(Path(env))
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels

        for base in nvidia.__path__:
            roots.extend(Path(p) for p in sorted(glob.glob(os.path.join(base, "*"))))
    except ImportError:
        pass
    return roots


def find_cusparselt() -> tuple[Path, Path]:
    """(include dir holding cusparseLt.h, lib dir holding libcusparseLt.so.0)."""
    for root in _site_roots():
        header, lib = root / "include" / "cusparseLt.h", root / "lib" / "libcusparseLt.so.0"
        if header.is_file() and lib.is_file():
            return header.parent, lib.parent
    raise CsltError("cusparseLt.h and libcusparseLt.so.0 not found (install nvidia-cusparselt or set CUSPARSELT_PATH)")


def _cuda_includes() -> list[Path]:
    found: list[Path] = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            found.append(Path(os.environ[env]) / "include")
    found.append(Path("/usr/local/cuda/include"))
    found.extend(root / "include" for root in _site_roots())
    return [p for p in found if (p / "cuda_runtime_api.h").is_file() or (p / "cusparse.h").is_file()]


def build_shim(cache_dir: Path | None = None) -> Path:
    """Compile the shim (once per source/header version) and return the shared library's path."""
    include, libdir = find_cusparselt()
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise CsltError("no C++ compiler (c++/g++) to build the cuSPARSELt shim")
    digest = hashlib.sha256(_SOURCE.read_bytes() + (include / "cusparseLt.h").read_bytes()).hexdigest()[:16]
    cache_dir = build_cache_dir(cache_dir)
    target = cache_dir / f"libsf_cslt-{digest}.so"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", str(_SOURCE), f"-I{include}"]
    cmd += [f"-I{p}" for p in _cuda_includes()]
    cmd += [f"-L{libdir}", "-l:libcusparseLt.so.0", f"-Wl,-rpath,{libdir}", "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CsltError(f"building the cuSPARSELt shim failed: {done.stderr.strip()[-2000:]}")
    tmp.replace(target)
    log.info("built cuSPARSELt shim %s", target)
    return target


@dataclass
class CsltPlan:
    """One cuSPARSELt plan for y[T, N] = x[T, K] @ W[N, K]^T at a fixed T; reused for every call."""

    lib: Cslt
    ptr: ctypes.c_void_p
    out_features: int
    in_features: int
    tokens: int
    dtype: torch.dtype
    layout: int
    alg_id: int
    split_k: int
    split_k_mode: int
    workspace: torch.Tensor | None
    max_alg: int

    def matmul(self, packed: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = x[T, K] @ W^T ([T, N]; [N, T] for layout 1), `packed` from `Cslt.compress(w, layout)`."""
        ws = self.workspace.data_ptr() if self.workspace is not None else None
        stream = torch.cuda.current_stream(x.device).cuda_stream
        status = self.lib.fn.sf_matmul(self.ptr, packed.data_ptr(), x.data_ptr(), out.data_ptr(), ws, stream)
        if status:
            raise CsltError(f"cusparseLtMatmul: {self.lib.error(status)}")
        return out

    def search(self, packed: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int]:
        """cuSPARSELt's own search (may crash on some builds: call it in a subprocess)."""
        alg, split, mode = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        ws = self.workspace.data_ptr() if self.workspace is not None else None
        stream = torch.cuda.current_stream(x.device).cuda_stream
        status = self.lib.fn.sf_search(self.ptr, packed.data_ptr(), x.data_ptr(), out.data_ptr(), ws, stream,
                                       ctypes.byref(alg), ctypes.byref(split), ctypes.byref(mode))
        if status:
            raise CsltError(f"cusparseLtMatmulSearch: {self.lib.error(status)}")
        return alg.value, split.value, mode.value

    def close(self) -> None:
        if self.ptr:
            self.lib.fn.sf_plan_destroy(self.ptr)
            self.ptr = ctypes.c_void_p()

    def __del__(self) -> None:  # plans hold descriptors in the library
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class Cslt:
    """The loaded shim. One per process and device: create it through `Cslt.load()`."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.device = device
        fn = ctypes.CDLL(str(path))
        vp, i64, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
        fn.sf_init.restype = i32
        fn.sf_version.argtypes = [ctypes.POINTER(i32)]
        fn.sf_error_string.restype = ctypes.c_char_p
        fn.sf_error_string.argtypes = [i32]
        fn.sf_compressed_size.argtypes = [i64, i64, i32, i32, ctypes.POINTER(sz), ctypes.POINTER(sz)]
        fn.sf_compress.argtypes = [i64, i64, i32, i32, vp, vp, vp, vp]
        fn.sf_plan_create.argtypes = [i64, i64, i64, i32, i32, i32, i32, i32, ctypes.POINTER(vp)]
        fn.sf_plan_destroy.argtypes = [vp]
        fn.sf_plan_destroy.restype = None
        fn.sf_plan_workspace.argtypes = [vp]
        fn.sf_plan_workspace.restype = sz
        fn.sf_plan_max_alg.argtypes = [vp]
        fn.sf_matmul.argtypes = [vp, vp, vp, vp, vp, vp]
        fn.sf_matmul.restype = i32
        fn.sf_search.argtypes = [vp, vp, vp, vp, vp, vp] + [ctypes.POINTER(i32)] * 3
        self.fn = fn
        self.path = path
        status = fn.sf_init()
        if status:
            raise CsltError(f"cusparseLtInit: {self.error(status)}")
        version = ctypes.c_int()
        self.version = version.value if fn.sf_version(ctypes.byref(version)) == 0 else -1

    _loaded: dict[int, Cslt] = {}

    @classmethod
    def load(cls, device: torch.device, cache_dir: Path | None = None) -> Cslt:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        if index not in cls._loaded:
            with torch.cuda.device(index):
                cls._loaded[index] = cls(build_shim(cache_dir), torch.device("cuda", index))
        return cls._loaded[index]

    def error(self, status: int) -> str:
        text = self.fn.sf_error_string(status)
        return f"status {status} ({text.decode() if text else 'unknown'})"

    def compress(self, weight: torch.Tensor, layout: int = 0) -> torch.Tensor:
        """Pack a 2:4-pruned (N, K) CUDA weight into cuSPARSELt's compressed form (values + metadata)."""
        if weight.dtype not in _DTYPES or not weight.is_cuda or weight.dim() != 2:
            raise CsltError(f"compress needs a 2-D fp16/bf16 CUDA tensor, got {weight.dtype} on {weight.device}")
        weight = weight.contiguous()
        n, k = weight.shape
        size, buf = ctypes.c_size_t(), ctypes.c_size_t()
        sparse_b = 2 if layout == 2 else 0
        status = self.fn.sf_compressed_size(n, k, _DTYPES[weight.dtype], sparse_b, ctypes.byref(size),
                                            ctypes.byref(buf))
        if status:
            raise CsltError(f"cusparseLtSpMMACompressedSize2({n}x{k}): {self.error(status)}")
        out = torch.empty(size.value, dtype=torch.uint8, device=weight.device)
        scratch = torch.empty(max(buf.value, 1), dtype=torch.uint8, device=weight.device)
        stream = torch.cuda.current_stream(weight.device).cuda_stream
        status = self.fn.sf_compress(n, k, _DTYPES[weight.dtype], sparse_b, weight.data_ptr(), out.data_ptr(),
                                     scratch.data_ptr(), stream)
        if status:
            raise CsltError(f"cusparseLtSpMMACompress2({n}x{k}): {self.error(status)}")
        return out

    def plan(self, out_features: int, in_features: int, tokens: int, dtype: torch.dtype, device: torch.device,
             layout: int = 0, alg_id: int = 0, split_k: int = 1, split_k_mode: int = 0) -> CsltPlan:
        if dtype not in _DTYPES:
            raise CsltError(f"cuSPARSELt plan: unsupported dtype {dtype}")
        ptr = ctypes.c_void_p()
        status = self.fn.sf_plan_create(out_features, in_features, tokens, _DTYPES[dtype], layout, alg_id, split_k,
                                        split_k_mode, ctypes.byref(ptr))
        if status:
            raise CsltError(
                f"cusparseLt plan {out_features}x{in_features} tokens={tokens} layout={layout} alg={alg_id} "
                f"split_k={split_k}: {self.error(status)}"
            )
        size = self.fn.sf_plan_workspace(ptr)
        workspace = torch.empty(size, dtype=torch.uint8, device=device) if size else None
        return CsltPlan(self, ptr, out_features, in_features, tokens, dtype, layout, alg_id, split_k, split_k_mode,
                        workspace, self.fn.sf_plan_max_alg(ptr))
