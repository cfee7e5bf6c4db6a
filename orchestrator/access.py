"""Data access policy: what a recipe may read, checked for its owner.

A recipe names three inputs: `model`, `data.calibration` and `data.evaluation`. Besides built-ins
(`builtin:...`) and hub ids (models only), they may name:

- `artifact:<id>` (model only): a model a stage of one of the *same owner's* jobs produced. This is
  the only way a job reads another job's output; another owner's id reads as "not found".
- `dataset:<id>` (text only): text the same owner uploaded with `POST /v1/datasets`.
- a local path or URL (`file://`, `s3://`, ...): only under `Settings.allowed_local_roots`. None
  (the embedded default without auth) leaves paths unrestricted; an empty list (the default with
  auth) refuses every path. Symlinks and `..` are resolved before the check, relative paths and
  non-`file` URLs are refused when roots are configured (their meaning depends on where the worker
  runs), and the service's own state (home, artifact root, SQLite file) is never readable through a
  path even if a listed root contains it: artifacts are reached only by reference.

Refusals raise `AccessDenied` (HTTP 422, naming the field) or `ReferenceNotFound` (HTTP 404); their
messages never carry a server path the caller did not send.

`check_recipe` runs at submit; the flow calls `model_input` and `data_spec` when it runs the job, which
check the references again (an artifact or dataset may have gone since) and turn them into the URIs
workers read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from orchestrator.settings import Settings
from orchestrator.store import datasets
from orchestrator.store.errors import NotFound
from orchestrator.store.models import Artifact, Dataset, Job
from pipelines.recipe import Recipe
from pipelines.sources import HUB_PREFIX
from workers.requests import SOURCE_PREFIX

ARTIFACT_PREFIX = "artifact:"
DATASET_PREFIX = "dataset:"
BUILTIN_PREFIX = "builtin:"
MODEL_FIELD = "recipe.model"
TEXT_FIELDS = {"calibration": "recipe.data.calibration", "evaluation": "recipe.data.evaluation"}

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A Hugging Face repo id: `name` or `org/name`, no path syntax (leading dot, `..`, more slashes)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_MAX_ENTRIES = 10_000  # files of a directory input checked one by one (symlinks inside a root)

_INSTEAD = (
    "name a model as builtin:..., a hub id or artifact:<id>, and text as builtin:... or dataset:<id> "
    "(upload it with POST /v1/datasets)"
)
_NOT_ALLOWED = f"is not under a directory this server lets recipes read; {_INSTEAD}"
_NO_PATHS = f"local paths and URLs are not accepted by this server; {_INSTEAD}"


class AccessDenied(Exception):
    """A recipe input the caller may not read; `field` is its dotted path, e.g. `recipe.data.calibration`."""

    def __init__(self, field: str, reason: str, *, status_code: int = 422) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.status_code = status_code


class ReferenceNotFound(NotFound):
    """An `artifact:` or `dataset:` reference that does not exist *for this owner* (HTTP 404)."""

    def __init__(self, field: str, entity: str, ident: str) -> None:
        super().__init__(entity, ident)
        self.field = field
        self.args = (f"{field}: {entity} {ident!r} not found",)


# ------------------------------------------------------------------------------------ interface


def check_recipe(session: Session, recipe: Recipe, *, owner: str, settings: Settings) -> None:
    """Refuse a recipe that names anything `owner` may not read (called before the job is recorded)."""
    _check_model(session, recipe.model, owner=owner, settings=settings)
    for key, field in TEXT_FIELDS.items():
        _check_text(session, field, getattr(recipe.data, key), owner=owner, settings=settings)


def model_input(session: Session, model_ref: str, *, owner: str,
                settings: Settings | None = None) -> tuple[str, str | None]:
    """(URI the worker loads, referenced artifact id or None) for the recipe's `model`.

    `artifact:<id>` becomes that artifact's storage URI (checked again: it may be gone or corrupt by
    now); anything else stays a source reference the worker resolves (`workers.runner.SOURCE_PREFIX`).
    Where local paths are restricted (`settings.allowed_local_roots` is not None), a hub id goes to the
    worker as `hub:<id>`, so that it is never taken for a folder relative to the worker's directory.
    """
    if model_ref.startswith(ARTIFACT_PREFIX):
        artifact = _model_artifact(session, MODEL_FIELD, model_ref, owner=owner)
        return artifact.uri, artifact.id
    if settings is not None and settings.allowed_local_roots is not None and _HUB_ID.fullmatch(model_ref):
        return SOURCE_PREFIX + HUB_PREFIX + model_ref, None
    return SOURCE_PREFIX + model_ref, None


def data_spec(session: Session, data: dict[str, Any], *, owner: str) -> dict[str, Any]:
    """The recipe's `data` with each `dataset:<id>` replaced by that dataset's storage URI."""
    resolved = dict(data)
    for key, field in TEXT_FIELDS.items():
        value = data.get(key)
        if isinstance(value, str) and value.startswith(DATASET_PREFIX):
            resolved[key] = _dataset(session, field, value, owner=owner).uri
    return resolved


# ------------------------------------------------------------------------------------ references


def _reference_id(field: str, ref: str, prefix: str) -> str:
    ident = ref[len(prefix):]
    if not _ID.fullmatch(ident):
        raise AccessDenied(field, f"{prefix}<id> needs an id of 1-64 letters, digits, '-' or '_'")
    return ident


def _model_artifact(session: Session, field: str, ref: str, *, owner: str) -> Artifact:
    """The owner's model artifact that `ref` (`artifact:<id>`) names; others' read as not found."""
    ident = _reference_id(field, ref, ARTIFACT_PREFIX)
    artifact = session.get(Artifact, ident)
    job = session.get(Job, artifact.job_id) if artifact is not None else None
    if artifact is None or job is None or job.owner != owner:
        raise ReferenceNotFound(field, "artifact", ident)
    if artifact.stage_run_id is None or artifact.kind != "model":
        raise AccessDenied(field, f"artifact {ident!r} is not a model a stage produced (kind {artifact.kind!r})")
    if artifact.corrupt_reason:
        raise AccessDenied(field, f"artifact {ident!r} is marked corrupt", status_code=409)
    return artifact


def _dataset(session: Session, field: str, ref: str, *, owner: str) -> Dataset:
    ident = _reference_id(field, ref, DATASET_PREFIX)
    try:
        return datasets.get_dataset(session, ident, owner=owner)
    except NotFound:
        raise ReferenceNotFound(field, "dataset", ident) from None


# ------------------------------------------------------------------------------------ fields


def _check_model(session: Session, ref: str, *, owner: str, settings: Settings) -> None:
    if ref.startswith(ARTIFACT_PREFIX):
        _model_artifact(session, MODEL_FIELD, ref, owner=owner)
    elif ref.startswith(DATASET_PREFIX):
        raise AccessDenied(MODEL_FIELD, "dataset:<id> names text, not a model; use artifact:<id> for a model")
    elif ref.startswith(BUILTIN_PREFIX) or settings.allowed_local_roots is None or _HUB_ID.fullmatch(ref):
        return
    else:
        check_path(MODEL_FIELD, ref, settings)


def _check_text(session: Session, field: str, ref: str, *, owner: str, settings: Settings) -> None:
    if ref.startswith(DATASET_PREFIX):
        _dataset(session, field, ref, owner=owner)
    elif ref.startswith(ARTIFACT_PREFIX):
        raise AccessDenied(field, "artifact:<id> names a model, not text; upload text and use dataset:<id>")
    elif ref.startswith(BUILTIN_PREFIX) or settings.allowed_local_roots is None:
        return
    else:
        check_path(field, ref, settings)


# ------------------------------------------------------------------------------------ paths


def check_path(field: str, ref: str, settings: Settings) -> Path:
    """The resolved local path `ref` names, if policy lets recipes read it; `AccessDenied` otherwise.

    With roots configured, `ref` must be an absolute path or a `file://` URL; it is resolved (symlinks,
    `..`) and must lie under a root and outside the service's own state. A directory is checked file
    by file as well, since a symlink inside it could point anywhere.
    """
    roots = settings.allowed_local_roots
    if "\x00" in ref:
        raise AccessDenied(field, "contains a NUL byte")
    path = _local_path(field, ref)
    if roots is None:
        return path
    if not roots:
        raise AccessDenied(field, _NO_PATHS)
    if not path.is_absolute():
        raise AccessDenied(field, "a local path must be absolute (or a file:// URL)")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop, an unreadable component
        raise AccessDenied(field, _NOT_ALLOWED) from None
    protected = _protected_dirs(settings)
    _require_inside(field, resolved, roots, protected)
    if resolved.is_dir():
        for count, entry in enumerate(resolved.rglob("*")):
            if count >= _MAX_ENTRIES:
                raise AccessDenied(field, f"directory holds more than {_MAX_ENTRIES} entries")
            _require_inside(field, entry.resolve(), roots, protected)
    return resolved


def _local_path(field: str, ref: str) -> Path:
    """`ref` as a path: plain paths as they are, `file://` URLs decoded; other URLs are refused."""
    scheme = _SCHEME.match(ref)
    if scheme is None or len(scheme.group(1)) == 1:  # "C:..." is a drive letter, not a scheme
        return Path(ref)
    if scheme.group(1).lower() != "file":
        raise AccessDenied(field, f"URLs other than file:// are not accepted here; {_INSTEAD}")
    parts = urlsplit(ref)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise AccessDenied(field, "a file:// URL must name a local path (file:///...) without host, query or fragment")
    return Path(unquote(parts.path))


def _require_inside(field: str, path: Path, roots: list[Path], protected: list[Path]) -> None:
    # the same message either way: the answer must not tell where the service keeps its own files
    if not any(path.is_relative_to(root) for root in roots) or any(path.is_relative_to(p) for p in protected):
        raise AccessDenied(field, _NOT_ALLOWED)


def _protected_dirs(settings: Settings) -> list[Path]:
    """Where the service keeps tenants' data: home (caches, checkpoints), artifact root, SQLite file."""
    protected = [Path(settings.home).expanduser().resolve()]
    fs, root = fsspec.core.url_to_fs(settings.artifacts_url)
    if isinstance(fs, LocalFileSystem):
        protected.append(Path(root).resolve())
    url = make_url(settings.database)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        protected.append(Path(url.database).expanduser().resolve())
    return protected
