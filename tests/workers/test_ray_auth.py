"""Joining a Ray cluster that uses token authentication: a refused token is named, a right one joins.

A real head (`ray start --head --block`, loopback, its own token file) in a process group of its own,
stopped at the end; each client is a fresh Python process, since a process joins one Ray only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray_head

pytestmark = pytest.mark.timeout(300)

CLIENT = """
import sys
from workers import local_ray
try:
    local_ray.connect_address(sys.argv[1])
except local_ray.RayAuthRefused as error:
    print("REFUSED", error)
    sys.exit(3)
import ray
print("JOINED", ray.cluster_resources().get("CPU"))
"""


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(address, token file) of a head that asks for the token in that file."""
    folder = tmp_path_factory.mktemp("ray-auth")
    auth = ray_head.token_auth(folder)
    head, address = ray_head.start(folder, 1, auth)
    try:
        yield address, Path(auth["RAY_AUTH_TOKEN_PATH"])
    finally:
        ray_head.stop(head)


def _client(address: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([sys.executable, "-c", CLIENT, address], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=False)


def test_a_client_without_the_token_is_told_what_to_set(token_head):
    address, _ = token_head
    done = _client(address, RAY_AUTH_MODE="disabled")
    assert done.returncode == 3, done.stdout + done.stderr[-3000:]
    assert f"REFUSED the Ray cluster at {address} uses token authentication" in done.stdout
    assert "RAY_AUTH_MODE=token" in done.stdout and "RAY_AUTH_TOKEN_PATH" in done.stdout


def test_a_client_with_the_token_joins(token_head):
    address, token = token_head
    done = _client(address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "JOINED 1.0" in done.stdout
