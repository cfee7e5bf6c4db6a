"""The polled status is kept for `status_cache_s` per (job, owner): bounded staleness, the process's own
writes seen at once, no body shared across owners, one render for concurrent pollers, errors never kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.status_cache import StatusCache
from orchestrator.settings import Settings
from orchestrator.states import Status
from orchestrator.store import queries

ALICE = {"Authorization": "Bearer tok-a"}
BOB = {"Authorization": "Bearer tok-b"}
TTL = 1.0


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path_factory.mktemp("status-cache") / "home", database_url=None,
                        artifact_root=None, ray_address=None, api_tokens={"tok-a": "alice", "tok-b": "bob"},
                        status_cache_s=TTL)
    with TestClient(create_app(settings), headers=ALICE) as test_client:
        yield test_client


def _job(client: TestClient) -> str:
    with client.app.state.orchestrator.sessions.begin() as session:
        return queries.create_job(session, name="cached", recipe={"name": "cached"}, code_version="t",
                                  package_versions={}, owner="alice", stages=[("evaluate", {})]).id


def _set_status_behind_the_api(client: TestClient, job_id: str, status: Status) -> None:
    """What a runner in another process does: write the store directly."""
    with client.app.state.orchestrator.sessions.begin() as session:
        queries.set_job_status(session, job_id, status)


def test_a_change_behind_the_api_shows_within_the_ttl(client: TestClient) -> None:
    job_id = _job(client)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    _set_status_behind_the_api(client, job_id, Status.running)
    changed = time.monotonic()
    seen = client.get(f"/v1/jobs/{job_id}").json()["status"]
    assert seen == "queued", "kept: the store was not read again within status_cache_s"
    while seen != "running":
        assert time.monotonic() - changed < TTL + 0.5, "a kept status outlived status_cache_s"
        time.sleep(0.05)
        seen = client.get(f"/v1/jobs/{job_id}").json()["status"]


def test_the_process_own_write_is_seen_at_once(client: TestClient) -> None:
    job_id = _job(client)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # now kept
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_kept_status_is_never_served_to_another_owner(client: TestClient) -> None:
    job_id = _job(client)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # kept for alice
    assert client.get(f"/v1/jobs/{job_id}", headers=BOB).status_code == 404


def test_not_found_is_not_kept(client: TestClient) -> None:
    session = client.app.state.orchestrator.sessions()
    try:  # flushed, not committed: its id is known, the API's reads do not see it yet
        job_id = queries.create_job(session, name="later", recipe={"name": "later"}, code_version="t",
                                    package_versions={}, owner="alice", stages=[("evaluate", {})]).id
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        session.commit()
    finally:
        session.close()
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # within status_cache_s of the 404


def test_concurrent_misses_share_one_render() -> None:
    renders = 0

    async def render() -> bytes:
        nonlocal renders
        renders += 1
        await asyncio.sleep(0.05)
        return b"body"

    async def poll() -> list[bytes]:
        cache = StatusCache(ttl_s=10)
        bodies = await asyncio.gather(*(cache.get(("job", "alice"), render) for _ in range(20)))
        bodies.append(await cache.get(("job", "alice"), render))  # fresh: kept
        bodies.append(await cache.get(("job", "bob"), render))  # another key: its own render
        return bodies

    assert asyncio.run(poll()) == [b"body"] * 22 and renders == 2


def test_a_failed_render_is_not_kept_and_a_lost_caller_does_not_cancel_it() -> None:
    async def scenario() -> bytes:
        cache = StatusCache(ttl_s=10)

        async def failing() -> bytes:
            raise LookupError("gone")

        with pytest.raises(LookupError):
            await cache.get(("job", "alice"), failing)

        async def slow() -> bytes:
            await asyncio.sleep(0.05)
            return b"late"

        first = asyncio.ensure_future(cache.get(("job", "alice"), slow))
        second = asyncio.ensure_future(cache.get(("job", "alice"), slow))
        await asyncio.sleep(0.01)
        first.cancel()  # its client went away
        return await second

    assert asyncio.run(scenario()) == b"late"


def test_zero_ttl_reads_the_store_every_time() -> None:
    cache = StatusCache(ttl_s=0)
    calls = []

    async def render() -> bytes:
        calls.append(1)
        return b"x"

    async def twice() -> None:
        await cache.get(("j", "o"), render)
        await cache.get(("j", "o"), render)

    asyncio.run(twice())
    assert len(calls) == 2
