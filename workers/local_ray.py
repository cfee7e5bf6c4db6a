"""A local Ray node that listens only where it is told to, and the check that it does.

Ray's gRPC servers (GCS, raylet, object manager, core workers) listen either on loopback only or on
every interface, and they pick loopback only when the node's IP is 127.0.0.1. On Linux, though,
`ray.init(_node_ip_address="127.0.0.1")` swaps a loopback address for the host's routable IP (so
other nodes could join), and the GCS then listens on every interface. Ray keeps loopback addresses
only in its single-machine mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read at import into
`ray_constants.ENABLE_RAY_CLUSTER`). So for a loopback bind host the node is started with that mode
on; every Ray process then listens on 127.0.0.1 (its dashboard agent and metrics ports included).
Clients of such a node need the same mode to keep its loopback address: `connect_address` applies it.

Any other bind host becomes the node's advertised IP, but Ray has no per-interface bind: it then
listens on every interface, and `exposed_sockets` reports so.

A new local node has token authentication on (Ray >= 2.5x: `ray.init` generates `~/.ray/auth_token` if
missing), and Ray logs at WARNING, on every start, that it is on and how to turn it off. That line is
dropped at its logger (`quiet_token_notice`); authentication itself stays on, and Ray's other warnings,
its warning that token authentication is *off* included, still show.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator

import psutil
import ray
from ray._private import ray_constants

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost"}
START_ATTEMPTS = 2
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenNotice(logging.Filter):
    """Drops Ray's per-start notice that token authentication is on (the default we keep), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)


def quiet_token_notice() -> None:
    """Install the filter on the logger Ray prints the notice from (ray/_private/authentication/
    authentication_token_setup.py, `_warn_token_auth_enabled`); idempotent."""
    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, _DropTokenNotice) for f in logger.filters):
        logger.addFilter(_DropTokenNotice())


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _single_machine(on: bool) -> Iterator[None]:
    """Ray's single-machine mode for the duration (it keeps loopback addresses as they are)."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    if on:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start(bind_host: str, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a Ray node in this process, listening on `bind_host` (loopback: loopback only).

    Ray's raylet gives its Python agents 15 s to report their ports and aborts otherwise, which a busy
    machine can miss while their imports are cold; a second attempt (after stopping what the first one
    started) finds them warm.
    """
    loopback = is_loopback(bind_host)
    quiet_token_notice()
    for attempt in range(1, START_ATTEMPTS + 1):
        before = {child.pid for child in psutil.Process().children()}
        try:
            with _single_machine(loopback):
                ray.init(
                    address="local",  # start our own, never join a Ray that happens to run on this machine
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    _node_ip_address="127.0.0.1" if loopback else bind_host,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            break
        except Exception as error:  # Ray raises a bare Exception when its node misses the start window
            if attempt == START_ATTEMPTS or "timed out during startup" not in str(error):
                raise
            log.warning("the local Ray node did not start (%s); retrying", error)
            _stop_new_children(before)
    exposed = exposed_sockets(bind_host)
    if exposed:
        log.warning("the local Ray node listens beyond %s: %s", bind_host, ", ".join(exposed))


def _stop_new_children(before: set[int]) -> None:
    """Stop what a failed start left: this process's children that were not there before it."""
    with contextlib.suppress(Exception):
        ray.shutdown()
    ray_dir = os.path.dirname(ray.__file__)
    started = [child for child in psutil.Process().children() if child.pid not in before and _runs_from(child, ray_dir)]
    for child in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(started, timeout=10)


def _runs_from(process: psutil.Process, folder: str) -> bool:
    try:
        return any(part.startswith(folder) for part in process.cmdline())
    except psutil.NoSuchProcess:
        return False


class RayAuthRefused(ConnectionError):
    """The cluster uses token authentication and refused this process's token (or its lack of one)."""


def connect_address(address: str) -> None:
    """Join the Ray cluster at `address` (host:port); a loopback head keeps its loopback address.

    Ray's own error for a refused token is "Failed to connect to Ray cluster at ...", with the reason only
    in its chained cause: that case raises `RayAuthRefused`, which says what to set.
    """
    host = address.rsplit(":", 1)[0].strip("[]")
    with _single_machine(is_loopback(host)):
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as error:
            if not _token_refused(error):
                raise
            raise RayAuthRefused(
                f"the Ray cluster at {address} uses token authentication and refused this process: set "
                "RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or in the file that "
                "RAY_AUTH_TOKEN_PATH names (docs/deploy.md, Ray token authentication)") from error


def _token_refused(error: BaseException) -> bool:
    """Whether Ray's authentication refusal is in `error`'s chain of causes."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _allowed(bind_host: str) -> set[str]:
    if is_loopback(bind_host):
        return {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    return {bind_host, f"::ffff:{bind_host}"}


def _node_pids() -> set[int]:
    """Pids of this node's GCS and raylet: the processes listening on the ports Ray reports for them."""
    context = ray.get_runtime_context()
    node = next(n for n in ray.nodes() if n["NodeID"] == context.get_node_id())
    ports = {int(context.gcs_address.rsplit(":", 1)[1]), node["NodeManagerPort"], node["ObjectManagerPort"]}
    return {c.pid for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and c.pid is not None}


def listening(pids: set[int]) -> list[tuple[str, str, int]]:
    """(name[pid], ip, port) of every socket the processes `pids` listen on."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((f"{process.name()}[{pid}]", conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def exposed_sockets(bind_host: str) -> list[str]:
    """Sockets of this node's GCS and raylet that listen on an address other than `bind_host`."""
    allowed = _allowed(bind_host)
    return [f"{name} {ip}:{port}" for name, ip, port in listening(_node_pids()) if ip not in allowed]
