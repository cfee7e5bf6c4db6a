"""The progress mailbox: one per Ray cluster, shared by every process that submits stages, and bounded.

The sharing test uses a real head (`ray start --head --block`, loopback) stopped at the end; each
driver is a fresh Python process, as each flow run is on a cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray_head

from workers.progress import EventStore

DRIVER = """
import sys
from workers import local_ray, progress
local_ray.connect_address(sys.argv[1])
import ray
box = progress.mailbox()
if sys.argv[2] == "post":
    ray.get(box.post.remote("run-1", {"done": 1}))
else:
    print("TAKEN", ray.get(box.take.remote("run-1")))
print("ACTOR", box._actor_id.hex())
"""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_events_are_kept_per_stage_run_until_taken() -> None:
    store = EventStore()
    store.post("a", {"done": 1})
    store.post("b", {"done": 2})
    store.post("a", {"done": 3})
    assert store.take("a") == [{"done": 1}, {"done": 3}]
    assert store.take("a") == []
    assert store.take("b") == [{"done": 2}]
    assert store.pending() == 0


def test_events_nobody_takes_are_dropped_once_stale() -> None:
    clock = Clock()
    store = EventStore(stale_after_s=10.0, clock=clock)
    store.post("dead-watcher", {"done": 1})
    clock.now = 5.0
    store.post("live", {"done": 1})
    clock.now = 11.0
    store.post("live", {"done": 2})  # a post is when stale runs are looked for
    assert store.pending() == 1
    assert store.take("dead-watcher") == []
    assert store.take("live") == [{"done": 1}, {"done": 2}]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(address, environment of its clients): a head with its own token, as a cluster has."""
    folder = tmp_path_factory.mktemp("ray-progress")
    auth = ray_head.token_auth(folder)
    process, address = ray_head.start(folder, 1, auth)
    try:
        yield address, {**os.environ, **auth}
    finally:
        ray_head.stop(process)


def _driver(head: tuple[str, dict[str, str]], action: str) -> str:
    address, env = head
    done = subprocess.run([sys.executable, "-c", DRIVER, address, action], capture_output=True, text=True,
                          timeout=120, check=False, cwd=Path(__file__).resolve().parents[2], env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(300)
def test_drivers_of_one_cluster_share_one_mailbox(head: tuple[str, dict[str, str]]) -> None:
    posted = _driver(head, "post")
    taken = _driver(head, "take")  # another process, another Ray job: the same actor, the first one's events
    assert "TAKEN [{'done': 1}]" in taken
    actor = [line for line in posted.splitlines() if line.startswith("ACTOR")]
    assert actor and actor[0] in taken.splitlines()
