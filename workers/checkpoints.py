"""Stage checkpoints on the artifact root, so a retried attempt resumes on whichever node it lands.

A stage (today: finetune with `checkpoint_every`) writes its checkpoint into a local working copy
(`<cache_dir>/checkpoints/<stage_run_id>`, replaced atomically by the pipeline) and calls
`ctx.on_checkpoint`. The worker's `CheckpointPublisher` then uploads it, through fsspec, under::

    <artifact root>/_checkpoints/<job_id>/<stage_run_id>/
        v<ns since epoch>-<random>/...   one published checkpoint, file for file
        LATEST.json                      {"version", "previous", "files": {relative path: sha256}}

The version's files are uploaded first and `LATEST.json` is written last (a single object PUT on an
object store; a rename on a local root), so a reader that follows the pointer always finds a whole
checkpoint, and checks every file against the pointer's sha256 before using it. The pointer's
previous version is kept as well (a reader that read the old pointer may still be downloading it);
older versions, and versions a dead attempt half uploaded, are deleted after each publish.

At stage start the worker fetches the latest published checkpoint into its working copy (skipped when
the working copy already matches it) and hands it to the stage as its `checkpoint` input. When the
stage succeeds the published checkpoints are deleted: they are resumable state, not artifacts (a
stage that wants its last checkpoint kept returns it as an output, which the worker stores like any
artifact). When it fails they stay, for the next attempt or a `resume`.

Uploads run on a background thread so training does not wait on the network; a newer checkpoint
supersedes one still waiting. The publisher snapshots the checkpoint with hard links when called (the
pipeline never rewrites a checkpoint file in place, it writes a new directory and renames it), so the
next save cannot change a checkpoint while it is being uploaded. On a local (or mounted) root the same
holds, and publishing and fetching hard-link files instead of copying them where the filesystem allows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from workers.storage import remove_local, replace_local, sha256_file, upload_dir

log = logging.getLogger(__name__)

CHECKPOINTS_PREFIX = "_checkpoints"
POINTER = "LATEST.json"


def _digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(source, target)


class CheckpointFetchError(OSError):
    """The published checkpoint could not be brought back whole."""


class RemoteCheckpoints:
    """The published checkpoints of one stage run under the artifact root."""

    def __init__(self, artifact_root: str, job_id: str, stage_run_id: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(artifact_root.rstrip("/"))
        self.prefix = f"{root}/{CHECKPOINTS_PREFIX}/{job_id}/{stage_run_id}"

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.prefix)

    def latest(self) -> dict[str, Any] | None:
        """The pointer to the latest complete checkpoint, or None when none was published."""
        try:
            pointer = json.loads(self.fs.cat_file(f"{self.prefix}/{POINTER}"))
        except FileNotFoundError:
            return None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("files"), dict) or "version" not in pointer:
            raise CheckpointFetchError(f"{self.uri}/{POINTER} is not a checkpoint pointer")
        return pointer

    def publish(self, local: Path) -> str:
        """Upload the checkpoint directory `local` as a new version, then point `LATEST.json` at it."""
        files = _digests(local)
        if not files:
            raise ValueError(f"checkpoint {local} is empty")
        previous = self.latest()
        version = f"v{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        if isinstance(self.fs, LocalFileSystem):  # a local or mounted root: link where it can, no copy
            shutil.copytree(local, f"{self.prefix}/{version}", copy_function=_link_or_copy)
        else:
            upload_dir(self.fs, local, f"{self.prefix}/{version}")
        pointer = {"version": version, "previous": previous["version"] if previous else None, "files": files}
        staged = f"{self.prefix}/.{POINTER}.{uuid.uuid4().hex[:8]}"
        self.fs.pipe_file(staged, json.dumps(pointer, sort_keys=True).encode())
        self.fs.mv(staged, f"{self.prefix}/{POINTER}")
        self._prune(keep={version, pointer["previous"]})
        return version

    def _prune(self, keep: set[str | None]) -> None:
        self.fs.invalidate_cache(self.prefix)
        for entry in self.fs.ls(self.prefix, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("v") and name not in keep:
                with contextlib.suppress(FileNotFoundError):  # a stale listing: already gone
                    self.fs.rm(entry, recursive=True)

    def fetch(self, local: Path) -> bool:
        """Make `local` a verified copy of the latest published checkpoint; False when none was published."""
        pointer = self.latest()
        if pointer is None:
            return False
        if local.is_dir() and _digests(local) == pointer["files"]:
            return True
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.with_name(f".{local.name}.fetch-{uuid.uuid4().hex[:8]}")
        try:
            for name in pointer["files"]:
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = f"{self.prefix}/{pointer['version']}/{name}"
                if isinstance(self.fs, LocalFileSystem):
                    _link_or_copy(source, str(target))
                else:
                    self.fs.get_file(source, str(target))
            got = _digests(staging)
            if got != pointer["files"]:
                bad = sorted(n for n in pointer["files"] if got.get(n) != pointer["files"][n])
                raise CheckpointFetchError(f"checkpoint {pointer['version']} arrived corrupt: {', '.join(bad[:5])}")
            replace_local(staging, local)
        except FileNotFoundError as error:
            raise CheckpointFetchError(f"checkpoint {pointer['version']} is incomplete: {error}") from error
        finally:
            remove_local(staging)
        return True

    def discard(self) -> None:
        """Delete every published checkpoint of this stage run."""
        self.fs.invalidate_cache(self.prefix)
        if self.fs.exists(self.prefix):
            self.fs.rm(self.prefix, recursive=True)


def discard_job_checkpoints(artifact_root: str, job_id: str) -> None:
    """Delete the published checkpoints of every stage run of `job_id` (for deleting a job)."""
    fs, root = fsspec.core.url_to_fs(artifact_root.rstrip("/"))
    prefix = f"{root}/{CHECKPOINTS_PREFIX}/{job_id}"
    fs.invalidate_cache(prefix)
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


class CheckpointPublisher:
    """The `on_checkpoint` callback of one attempt: publishes each checkpoint from a background thread."""

    def __init__(self, remote: RemoteCheckpoints, staging_root: Path) -> None:
        self.remote = remote
        self.staging_root = staging_root
        remove_local(staging_root)  # snapshots a killed attempt on this node left behind
        self.published = 0
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._pending: Path | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-publisher", daemon=True)
        self._thread.start()

    def __call__(self, checkpoint: Path) -> None:
        """Snapshot `checkpoint` now (hard links) and queue it for upload, superseding a queued older one."""
        self.staging_root.mkdir(parents=True, exist_ok=True)
        snapshot = self.staging_root / f"{checkpoint.name}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(checkpoint, snapshot, copy_function=_link_or_copy)
        with self._cond:
            if self._closed:
                remove_local(snapshot)
                return
            if self._pending is not None:
                remove_local(self._pending)
            self._pending = snapshot
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                snapshot, self._pending = self._pending, None
            try:
                version = self.remote.publish(snapshot)
                self.published += 1
                log.info("published checkpoint %s to %s", version, self.remote.uri)
            except Exception as error:  # noqa: BLE001 - training goes on; the next publish may succeed
                log.warning("could not publish checkpoint to %s: %s", self.remote.uri, error)
                self.errors.append(f"{type(error).__name__}: {error}")
            finally:
                remove_local(snapshot)

    def close(self, *, flush: bool) -> None:
        """Stop the thread: first uploading a queued checkpoint when `flush`, else dropping it."""
        with self._cond:
            if not flush and self._pending is not None:
                remove_local(self._pending)
                self._pending = None
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        remove_local(self.staging_root)
