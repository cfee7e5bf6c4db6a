"""Artifact integrity: the server re-checks stored bytes against their sha256 before it vouches for them.

Hashing a multi-GB model on every download would be too slow, so each verified artifact keeps a cheap
fingerprint of what was verified (`artifacts.fingerprint`: size and modification stamp of the file, or
of every file of a directory, as fsspec's `info` reports them, so it works on s3:// roots too, where the
stamp is LastModified/ETag). Before serving, `ensure_intact` compares the current fingerprint with the
stored one; only a difference (or no fingerprint yet) triggers a full sha256 check: a file against its
digest, a directory against its `checksums.json` manifest and the manifest against the artifact's digest.

Bit rot or a tamper that keeps size and mtime escapes the fingerprint, so `verify_some` re-hashes a few
artifacts at a time, least recently verified first, on a schedule (`verify_forever` is a ready loop for
the API lifespan). A mismatch sets `artifacts.corrupt_reason`; a corrupt artifact is never served again
(the API answers 409 with the reason) until an operator clears the column.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import fsspec
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.store.models import Artifact, utcnow
from workers.storage import MANIFEST

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


class ArtifactMissing(Exception):
    """The artifact's bytes are gone from storage."""


class ArtifactCorrupt(Exception):
    """The artifact's bytes no longer match its recorded sha256."""

    def __init__(self, artifact_id: str, reason: str) -> None:
        super().__init__(f"artifact {artifact_id} is corrupt: {reason}")
        self.artifact_id = artifact_id
        self.reason = reason


@dataclass(frozen=True)
class Snapshot:
    """One listing of an artifact in storage: its files with their fsspec info (size, stamps)."""

    fs: fsspec.AbstractFileSystem
    path: str
    is_dir: bool
    entries: Mapping[str, Mapping[str, Any]]

    def relative(self, member: str) -> str:
        return PurePosixPath(member).relative_to(self.path).as_posix()


def snapshot(uri: str) -> Snapshot:
    """List the artifact at `uri` once (one `info`, plus one `find` for a directory)."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError as error:
        raise ArtifactMissing("artifact content is gone from storage") from error
    if info.get("type") == "directory":
        return Snapshot(fs, path, True, fs.find(path, detail=True))
    return Snapshot(fs, path, False, {path: info})


def _stamp(info: Mapping[str, Any]) -> str:
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag", "created"):
        value = info.get(key)
        if value is not None:
            return value.isoformat() if isinstance(value, datetime) else str(value)
    return ""


def fingerprint(snap: Snapshot) -> str:
    """Size and stamp of the file, or a digest of (name, size, stamp) of every file of the directory."""
    if not snap.is_dir:
        info = snap.entries[snap.path]
        return f"file:{int(info['size'])}:{_stamp(info)}"[:200]
    rows = [(snap.relative(m), int(i["size"]), _stamp(i)) for m, i in sorted(snap.entries.items())]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return f"dir:{len(rows)}:{sum(r[1] for r in rows)}:{digest}"


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def full_check(snap: Snapshot, sha256: str) -> str | None:
    """Re-hash the artifact; None if it matches `sha256`, else the reason (names relative to the artifact)."""
    if not snap.is_dir:
        actual = _sha256(snap.fs, snap.path)
        return None if actual == sha256 else f"sha256 of the file is {actual}, recorded {sha256}"
    manifest_path = f"{snap.path}/{MANIFEST}"
    if manifest_path not in snap.entries:
        return f"{MANIFEST} is missing"
    with snap.fs.open(manifest_path, "rb") as handle:
        raw = handle.read()
    if hashlib.sha256(raw).hexdigest() != sha256:
        return f"{MANIFEST} does not match the recorded sha256"
    try:
        expected: dict[str, str] = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is not a checksum manifest"
    present = {snap.relative(m): m for m in snap.entries if m != manifest_path}
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    changed = sorted(n for n in expected if n in present and _sha256(snap.fs, present[n]) != expected[n])
    problems = [f"{label}: {_listed(names)}" for label, names in
                (("changed", changed), ("missing", missing), ("not in the manifest", extra)) if names]
    return "; ".join(problems) or None


def _record(artifact: Artifact, snap: Snapshot, reason: str | None) -> None:
    artifact.verified_at = utcnow()
    if reason is None:
        artifact.fingerprint = fingerprint(snap)
    else:
        artifact.corrupt_reason = reason
        log.warning("artifact %s is corrupt: %s", artifact.id, reason)


def ensure_intact(session: Session, artifact: Artifact) -> Snapshot:
    """The artifact's current snapshot, after a full re-check if its bytes changed since the last one.

    Raises `ArtifactMissing`, or `ArtifactCorrupt` after recording the reason on the row (flushed; the
    caller commits, even though it then answers with an error). An artifact without a sha256 (an input
    reference) has nothing to check against and is returned as listed.
    """
    if artifact.corrupt_reason:
        raise ArtifactCorrupt(artifact.id, artifact.corrupt_reason)
    snap = snapshot(artifact.uri)
    if artifact.sha256 is None or artifact.fingerprint == fingerprint(snap):
        return snap
    reason = full_check(snap, artifact.sha256)
    _record(artifact, snap, reason)
    session.flush()
    if reason is not None:
        raise ArtifactCorrupt(artifact.id, reason)
    return snap


def stamp(session: Session, artifact: Artifact) -> None:
    """Record the fingerprint of freshly stored bytes whose sha256 was just computed (no re-hash), so the
    first download does not have to hash a large model before its first byte."""
    artifact.fingerprint = fingerprint(snapshot(artifact.uri))
    artifact.verified_at = utcnow()
    session.flush()


def verify_some(session: Session, limit: int = 2) -> dict[str, str | None]:
    """Fully re-hash up to `limit` stored outputs, never-verified and least recently verified first.

    Returns artifact id -> None (intact) or the corruption reason; rows are updated and flushed, the
    caller commits. Outputs whose bytes are gone are marked corrupt too (they cannot be served).
    """
    query = (
        select(Artifact)
        .where(Artifact.stage_run_id.is_not(None), Artifact.sha256.is_not(None), Artifact.corrupt_reason.is_(None))
        .order_by(Artifact.verified_at.is_not(None), Artifact.verified_at, Artifact.id)
        .limit(limit)
    )
    outcome: dict[str, str | None] = {}
    for artifact in session.scalars(query):
        try:
            snap = snapshot(artifact.uri)
        except ArtifactMissing as error:
            artifact.verified_at, artifact.corrupt_reason = utcnow(), str(error)
            outcome[artifact.id] = str(error)
            continue
        reason = full_check(snap, artifact.sha256 or "")
        _record(artifact, snap, reason)
        outcome[artifact.id] = reason
    session.flush()
    return outcome


async def verify_forever(sessions: sessionmaker[Session], every_s: float, limit: int = 2) -> None:
    """Call `verify_some` every `every_s` seconds off the event loop until cancelled (an API lifespan task)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(_verify_batch, sessions, limit)
        except asyncio.CancelledError:
            raise
        except Exception:  # a storage hiccup must not end the schedule
            log.exception("background artifact verification failed")


def _verify_batch(sessions: sessionmaker[Session], limit: int) -> None:
    with sessions.begin() as session:
        verify_some(session, limit)
