"""Datasets: text a tenant uploads so that recipes can name it (`dataset:<id>`) instead of a server path.

`POST /v1/datasets?name=...` takes the raw text as the body (text/plain or application/octet-stream),
streams it to storage while checking it (size limit `max_dataset_bytes` -> 413; UTF-8 without NUL
bytes -> else 422) and records it with its sha256. Everything is scoped to the caller: another owner's
dataset reads as not found. Responses never carry the storage location.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, computed_field
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentUser, OrchestratorDep, SessionDep, SettingsDep
from api.schemas import ErrorBody
from orchestrator import dataset_files
from orchestrator.access import DATASET_PREFIX
from orchestrator.store import datasets
from orchestrator.store.errors import NotFound

router = APIRouter(prefix="/v1/datasets", tags=["datasets"],
                   responses={401: {"description": "Missing or unknown bearer token.", "model": ErrorBody}})
_NOT_FOUND = {404: {"description": "No such dataset for this owner.", "model": ErrorBody}}

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ACCEPTED_TYPES = ("text/plain", "application/octet-stream")
_TEXT_BODY = {
    "required": True,
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


class DatasetPublic(BaseModel):
    """An uploaded dataset as its owner sees it; `ref` is what a recipe's `data` fields take."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    sha256: str = Field(description="sha256 of the uploaded bytes.")
    size_bytes: int
    created_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ref(self) -> str:
        return DATASET_PREFIX + self.id


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


def _check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if media_type not in _ACCEPTED_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "body: send the text itself as text/plain or application/octet-stream",
        )


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                            f"body: dataset is larger than the limit of {limit} bytes")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic,
             openapi_extra={"requestBody": _TEXT_BODY},
             responses={413: {"description": "Larger than max_dataset_bytes.", "model": ErrorBody},
                        415: {"description": "Not text/plain or application/octet-stream.", "model": ErrorBody}})
async def upload_dataset(
    request: Request,
    user: CurrentUser,
    settings: SettingsDep,
    orchestrator: OrchestratorDep,
    name: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                               description="A label for the dataset (shown in listings).")],
) -> DatasetPublic:
    """Store the body as a dataset of the caller; refused uploads leave nothing behind."""
    _check_content_type(request)
    limit = settings.max_dataset_bytes
    _check_declared_length(request, limit)
    dataset_id = datasets.new_dataset_id()
    uri = dataset_files.dataset_uri(settings, owner=user, dataset_id=dataset_id)
    writer = await run_in_threadpool(dataset_files.DatasetWriter, uri, limit)
    try:
        async for chunk in request.stream():
            await run_in_threadpool(writer.write, chunk)
        sha256, size = await run_in_threadpool(writer.finish)
    except dataset_files.DatasetRejected as error:
        await run_in_threadpool(writer.discard)
        code = (status.HTTP_413_REQUEST_ENTITY_TOO_LARGE if isinstance(error, dataset_files.DatasetTooLarge)
                else 422)
        raise HTTPException(code, f"body: {error}") from None
    except BaseException:  # client gone, storage error: no file without a row
        await run_in_threadpool(writer.discard)
        raise

    def record() -> DatasetPublic:
        with orchestrator.sessions.begin() as session:
            row = datasets.add_dataset(session, dataset_id=dataset_id, owner=user, name=name, uri=uri,
                                       sha256=sha256, size_bytes=size)
            return DatasetPublic.model_validate(row)

    try:
        return await run_in_threadpool(record)
    except BaseException:
        await run_in_threadpool(dataset_files.remove, uri)
        raise


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, user: CurrentUser,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> DatasetsPublic:
    rows = datasets.list_datasets(session, owner=user, limit=limit, offset=offset)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=len(rows))


def _owned(session: SessionDep, user: str, dataset_id: str):
    if not _ID.fullmatch(dataset_id):  # also keeps NUL bytes and huge strings away from the database
        raise NotFound("dataset", dataset_id[:64])
    return datasets.get_dataset(session, dataset_id, owner=user)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=_NOT_FOUND)
def get_dataset(dataset_id: str, session: SessionDep, user: CurrentUser) -> DatasetPublic:
    return DatasetPublic.model_validate(_owned(session, user, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses={**_NOT_FOUND, 409: {"description": "A queued or running job reads it.", "model": ErrorBody}})
def delete_dataset(dataset_id: str, session: SessionDep, user: CurrentUser) -> Response:
    """Forget the dataset and delete its text (409 while a queued or running job of yours reads it)."""
    row = _owned(session, user, dataset_id)
    if readers := datasets.jobs_reading(session, DATASET_PREFIX + row.id, owner=user):
        raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {row.id} is read by queued or running job(s) "
                            f"{', '.join(readers[:5])}: cancel them or wait until they end")
    uri = row.uri
    datasets.delete_dataset(session, row.id, owner=user)
    session.commit()  # the row goes first: a file without a row is harmless, a row without a file is not
    dataset_files.remove(uri)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
