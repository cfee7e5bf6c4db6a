"""Node caches worth sharing between nodes, mirrored under `<artifact root>/_cache/<name>/`.

Which caches, and why only those:

- `dense_ppl/` (evaluate with `compare_dense`): one small JSON per base model and evaluation windows,
  and each one costs a full perplexity pass of the dense model. Shared: an evaluate stage on any node
  finds the figure another node measured.
- `teacher_logits/` (finetune with `teacher_cache`): node-local. Full-vocabulary logits are larger
  than recomputing them costs; a retried fine-tune resumes from its published checkpoint and needs only
  the steps the dead attempt never reached, which that attempt never cached either.
- `models/`, `hub/`, `data/`: node-local; every node builds or downloads them from their source.
- `checkpoints/`: the working copy of published checkpoints (see `workers.checkpoints`).
- `artifacts/`: this node's copies of stored artifacts (see `workers.storage`).

A shared cache's files are named by a content key and never change once written, so mirroring is
copying the files one side lacks: `pull` before the stage, `push` after it, each file through a temp
name so no reader sees half of one. Both are best effort: a failure costs a recomputation, never a
wrong result.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Literal

import fsspec

log = logging.getLogger(__name__)

CACHE_PREFIX = "_cache"

SHARED_CACHES: dict[str, tuple[str, ...]] = {"evaluate": ("dense_ppl",)}
"""Stage name -> the subdirectories of the node cache it reads and writes that are shared."""


def _is_entry(name: str) -> bool:
    """A finished cache file, not a writer's temp file."""
    return not name.startswith(".") and not name.endswith(".tmp")


class SharedCache:
    """Mirrors some subdirectories of a node's cache directory with the artifact root."""

    def __init__(self, artifact_root: str, cache_dir: Path, names: tuple[str, ...]) -> None:
        self.fs, root = fsspec.core.url_to_fs(artifact_root.rstrip("/"))
        self.prefix = f"{root}/{CACHE_PREFIX}"
        self.cache_dir, self.names = cache_dir, names

    def _remote_entries(self, name: str) -> set[str]:
        base = f"{self.prefix}/{name}"
        self.fs.invalidate_cache(base)  # other nodes add entries; never trust this process's old listing
        if not self.fs.exists(base):
            return set()
        found = self.fs.find(base)
        return {p[len(base) + 1:] for p in found if _is_entry(p.rsplit("/", 1)[-1])}

    def _local_entries(self, name: str) -> set[str]:
        base = self.cache_dir / name
        if not base.is_dir():
            return set()
        return {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() and _is_entry(p.name)}

    def pull(self) -> int:
        """Download the shared entries this node lacks; returns how many."""
        count = 0
        for name in self.names:
            for rel in sorted(self._remote_entries(name) - self._local_entries(name)):
                target = self.cache_dir / name / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
                try:
                    self.fs.get_file(f"{self.prefix}/{name}/{rel}", str(tmp))
                    os.replace(tmp, target)
                    count += 1
                finally:
                    tmp.unlink(missing_ok=True)
        return count

    def push(self) -> int:
        """Upload the entries this node has and the shared cache lacks; returns how many."""
        count = 0
        for name in self.names:
            for rel in sorted(self._local_entries(name) - self._remote_entries(name)):
                target = f"{self.prefix}/{name}/{rel}"
                staged = f"{target.rsplit('/', 1)[0]}/.{uuid.uuid4().hex[:8]}.tmp"
                self.fs.put_file(str(self.cache_dir / name / rel), staged)
                self.fs.mv(staged, target)
                count += 1
        return count


def shared_cache_for(stage: str, artifact_root: str, cache_dir: Path) -> SharedCache | None:
    """The shared caches of `stage`, or None when it uses none."""
    names = SHARED_CACHES.get(stage)
    return SharedCache(artifact_root, cache_dir, names) if names else None


def sync(cache: SharedCache | None, direction: Literal["pull", "push"]) -> int:
    """`cache.pull()` or `cache.push()`, logging instead of raising: a miss only costs a recomputation."""
    if cache is None:
        return 0
    try:
        return cache.pull() if direction == "pull" else cache.push()
    except Exception as error:  # noqa: BLE001 - a shared cache is an optimisation, never a reason to fail
        log.warning("shared cache %s failed under %s: %s", direction, cache.prefix, error)
        return 0
