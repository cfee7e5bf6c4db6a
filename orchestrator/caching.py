"""Stage caching by content: the same stage on the same inputs with the same code is not run twice.

The key hashes the stage's parameters, the job's data sources and seed, the identity of every input
artifact, and the code version. A hit reuses the earlier stage run's outputs (any job's) if they are
still in storage; the reuse is recorded as a tag and as new artifact rows of this job pointing at the
same content, so lineage stays per job.

Identities are content, not names, so that a model or a text that changed in place is never taken for
the one a cached stage read (the nightly zoo relies on this to skip only what is really unchanged):

- a stored artifact: its sha256;
- a source model or text given as a local path (or `file://` URL): the sha256 of its bytes (a directory:
  of the `checksums.json`-style manifest of its files), memoized by path, size and modification time so
  an unchanged multi-GB model is hashed once (per process, and across processes under a memo directory);
- `builtin:` sources: the sha256 of the file the package ships them in;
- a hub id: the hub's current commit of the repository when it can be asked, else the id;
- `dataset:<id>`: the id (an uploaded dataset never changes);
- the kernel-plan cache that `kernel_tune` reads: the GPU environment as Ray reports it (accelerator
  types), since a plan depends on the GPU it is measured on, not on which other plans were cached.

Anything that cannot be hashed (a path that is gone, a remote URL, a hub that cannot be reached) keeps its
reference as identity, and `content_identity` says why, for the caller to record as a degradation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from sqlalchemy.orm import Session

from orchestrator.store import queries
from orchestrator.store.models import Artifact
from pipelines.sources import BUILTIN_TEXT_FILES, HUB_PREFIX, SMOLLM2_GGUF, SourceError, is_url, package_file
from workers.requests import SOURCE_PREFIX

log = logging.getLogger(__name__)

DATA_KEYS = ("calibration", "evaluation")
ENVIRONMENT_INPUTS = frozenset({"kernel_cache"})
"""Store-served inputs whose identity in the key is the GPU environment (see the module docstring)."""
_BUILTIN_FILES = {"builtin:smollm2-135m": SMOLLM2_GGUF,
                  **{f"builtin:{name}": shipped for name, shipped in BUILTIN_TEXT_FILES.items()}}
_MAX_FILES = 10_000
_HUB_TTL_S = 600.0
_CHUNK = 1 << 22


def stage_cache_key(*, kind: str, params: dict[str, Any], data: dict[str, Any], seed: int,
                    inputs: dict[str, Artifact], code_version: str) -> str:
    content = {
        "kind": kind,
        "params": params,
        "data": {k: content_identity(v).value if k in DATA_KEYS and isinstance(v, str) else v
                 for k, v in sorted(data.items())},
        "seed": seed,
        "inputs": {k: _input_identity(k, a) for k, a in sorted(inputs.items())},
        "code": code_version,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _input_identity(kind: str, artifact: Artifact) -> str:
    if kind in ENVIRONMENT_INPUTS:
        return gpu_environment()
    if artifact.sha256:
        return artifact.sha256
    if artifact.uri.startswith(SOURCE_PREFIX):
        return content_identity(artifact.uri.removeprefix(SOURCE_PREFIX)).value
    return artifact.uri


def _still_stored(uri: str) -> bool:
    if uri.startswith("source:"):
        return True
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def reuse_cached(session: Session, *, job_id: str, stage_run_id: str, cache_key: str) -> list[Artifact] | None:
    """Copy a cached stage run's outputs onto `stage_run_id` from one of the same owner's jobs; None when
    there is nothing usable."""
    cached = queries.find_cached_stage(session, cache_key, owner=queries.get_job(session, job_id).owner)
    if cached is None or cached.id == stage_run_id:
        return None
    outputs = queries.stage_outputs(session, cached.id)
    if not outputs or not all(_still_stored(a.uri) for a in outputs):
        return None
    reused = [
        queries.add_artifact(session, job_id=job_id, stage_run_id=stage_run_id, kind=a.kind, uri=a.uri,
                             sha256=a.sha256, size_bytes=a.size_bytes)
        for a in outputs
    ]
    queries.add_metrics(session, job_id=job_id, stage_run_id=stage_run_id,
                        metrics=[(m.name, m.value, m.step) for m in cached.metrics])
    queries.add_tag(session, job_id=job_id, stage_run_id=stage_run_id, key="cached_from", value=cached.id)
    return reused


# --- content identities ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What a source is, for the cache: `sha256:<hex>` of its content, `hub:<id>@<commit>`, `dataset:<id>`,
    or its reference (`ref:<ref>`) when the content could not be read, `note` saying why."""

    value: str
    note: str | None = None


_lock = threading.Lock()
_files: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256
_hub: dict[str, tuple[float, Identity]] = {}


def content_identity(ref: str, memo_dir: Path | None = None) -> Identity:
    """The identity of a model or text reference (without the `source:` prefix); never raises."""
    try:
        return _identity(ref, memo_dir)
    except (OSError, SourceError, ValueError) as error:
        return Identity(f"ref:{ref}", f"content of {ref!r} not readable ({type(error).__name__}: {error}); "
                                      "the stage cache keys it by its reference")


def _identity(ref: str, memo_dir: Path | None) -> Identity:
    if ref.startswith("dataset:"):
        return Identity(ref)
    if ref in _BUILTIN_FILES:
        return Identity(f"sha256:{_file_sha256(package_file(*_BUILTIN_FILES[ref]), memo_dir)}")
    if ref.startswith("builtin:"):
        return Identity(f"ref:{ref}", f"{ref!r} is not a known built-in: keyed by its reference")
    if ref.startswith(HUB_PREFIX):
        return _hub_identity(ref.removeprefix(HUB_PREFIX))
    if is_url(ref):
        fs, path = fsspec.core.url_to_fs(ref)
        if not isinstance(fs, LocalFileSystem):
            return Identity(f"ref:{ref}", f"{ref.split('://')[0]}:// sources are keyed by their URL, not content")
        ref = path
    local = Path(ref).expanduser()
    if local.exists():
        return Identity(f"sha256:{_path_sha256(local, memo_dir)}")
    if local.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        return Identity(f"ref:{ref}", f"{ref!r} does not exist here: keyed by its reference")
    return _hub_identity(ref)


def _path_sha256(path: Path, memo_dir: Path | None) -> str:
    """A file's sha256, or the digest of a directory's manifest (relative path -> sha256 of each file)."""
    if path.is_file():
        return _file_sha256(path, memo_dir)
    files = []
    for count, item in enumerate(sorted(path.rglob("*"))):
        if count >= _MAX_FILES:
            raise ValueError(f"more than {_MAX_FILES} entries to hash")
        if item.is_file():
            files.append(item)
    entries = {f.relative_to(path).as_posix(): _file_sha256(f, memo_dir) for f in files}
    text = json.dumps({"algorithm": "sha256", "files": entries}, indent=1, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: Path, memo_dir: Path | None) -> str:
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    memo = memo_dir / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:40] if memo_dir else None
    with _lock:
        digest = _files.get(key)
    if digest is None and memo is not None and memo.is_file():
        digest = memo.read_text().strip()
    if digest is None:
        sha = hashlib.sha256()
        with resolved.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
        digest = sha.hexdigest()
    if memo is not None and not memo.is_file():  # also when this process knew it: later processes need it
        _write_memo(memo, digest)
    with _lock:
        _files[key] = digest
    return digest


def _write_memo(memo: Path, digest: str) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        scratch = memo.with_name(f".{memo.name}.{os.getpid()}.{threading.get_ident()}")
        scratch.write_text(digest)
        os.replace(scratch, memo)
    except OSError as error:  # only a memo: the next process hashes again
        log.warning("content hash memo %s not written: %s", memo, error)


def _hub_identity(repo_id: str) -> Identity:
    """`hub:<id>@<commit>` from the hub (remembered for a few minutes), else the id with the reason."""
    now = time.monotonic()
    with _lock:
        cached = _hub.get(repo_id)
    if cached is not None and now - cached[0] < _HUB_TTL_S:
        return cached[1]
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo_id, timeout=5).sha
        identity = Identity(f"hub:{repo_id}@{sha}") if sha else Identity(
            f"ref:{repo_id}", f"hub id {repo_id!r}: the hub gave no commit; keyed by its id")
    except Exception as error:  # offline, unknown repo, gated: the stage itself reports what is wrong
        identity = Identity(f"ref:{repo_id}", f"hub id {repo_id!r}: commit unknown ({type(error).__name__}); "
                                              "the stage cache keys it by its id")
    with _lock:
        _hub[repo_id] = (now, identity)
    return identity


def gpu_environment() -> str:
    """The GPUs stages may be placed on, as the connected Ray cluster reports them."""
    import ray

    if not ray.is_initialized():
        return "gpu:unknown"
    resources = ray.cluster_resources()
    if not resources.get("GPU"):
        return "gpu:none"
    types = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    return f"gpu:{','.join(types) or 'untyped'}"


def record_source_identities(session: Session, job_id: str, *, model_uri: str | None, memo_dir: Path) -> None:
    """Hash the job's source model (`model_uri`, a `source:` URI; None for a stored artifact) and data once,
    before its first stage: the digests are memoized under `memo_dir` for later jobs and processes, and
    recorded as the job's `content` tags (a reference that could not be hashed as a `degraded` tag)."""
    if any(tag.key == "content" for tag in queries.job_tags(session, job_id)):
        return  # a resumed job: recorded on its first run
    job = queries.get_job(session, job_id)
    sources = {f"data.{key}": job.recipe.get("data", {}).get(key) for key in DATA_KEYS}
    if model_uri is not None and model_uri.startswith(SOURCE_PREFIX):
        sources = {"model": model_uri.removeprefix(SOURCE_PREFIX), **sources}
    # hashed before the first write: SQLite holds its write lock from the first write to the commit
    identities = {name: content_identity(ref, memo_dir) for name, ref in sources.items() if isinstance(ref, str)}
    for name, identity in identities.items():
        queries.add_tag(session, job_id=job_id, key="content", value=f"{name}: {identity.value}")
        if identity.note:
            queries.add_tag(session, job_id=job_id, key="degraded", value=f"{name}: {identity.note}")
