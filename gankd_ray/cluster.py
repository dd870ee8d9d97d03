"""Connecting to Ray (an embedded local instance, or an existing cluster), and the placement-group reaper that
frees a dead Train controller's CPUs on any cluster, dashboard or not.

Security defaults: the dashboard binds to 127.0.0.1 unless the caller asks for another host (it has no
authentication of its own), and Ray's token authentication is left as Ray configures it (on for local
clusters since 2.59). A dashboard beyond loopback with token authentication turned off is an open
job-submission endpoint (anyone who reaches it runs code as the user): ``check_dashboard_exposure``
refuses it unless explicitly allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
from typing import Any

from gankd_ray import ray_compat
from gankd_ray.errors import InputError

LOCAL_HOST = "127.0.0.1"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's switch: unset or "token" = token authentication on a local cluster

# How often a placement-group reaper asks whether its controller is alive: the delay before a stopped trial's
# CPUs return.
CONTROLLER_POLL_S = 1.0
# A controller busy in a blocking call answers late; only an actor error means it is gone.
CONTROLLER_ANSWER_TIMEOUT_S = 10.0


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard: bool = True,
    dashboard_host: str = LOCAL_HOST,
    dashboard_port: int | None = None,
    log_to_driver: bool = True,
) -> str | None:
    """Start or join Ray; returns the dashboard URL (``http://host:port``) when there is one.

    Args:
        address: None starts an embedded local Ray; ``auto`` or ``HOST:PORT`` joins a cluster.
        num_cpus / num_gpus: local instance only.
        dashboard: local instance only; a cluster's dashboard is the head node's. Runs do not need it (the
            CPUs of a run whose controller died are freed by PlacementGroupReaper below, not by Ray Train's
            State API cleaner); it serves the dashboard views and the State API tools.
        dashboard_host: bind address of a local dashboard.
        log_to_driver: forward every worker's and actor's output to this process's console (Ray's default);
            a search turns it off unless ``--verbose`` and prints its own lines (``gankd_ray.tune.console``).
    """
    import ray

    apply_train_env_defaults()
    if ray.is_initialized():
        return _dashboard_url(ray.get_runtime_context())
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        _quiet_default_auth_notice()
        kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard)
        if dashboard:
            kwargs["dashboard_host"] = dashboard_host
            if dashboard_port is not None:
                kwargs["dashboard_port"] = dashboard_port
        context = ray.init(**kwargs)
    return _dashboard_url(context)


def check_dashboard_exposure(host: str, *, address: str | None = None, allow_unauthenticated: bool = False) -> None:
    """Refuse (``InputError``, one line) a local dashboard bound beyond loopback while token authentication
    is off; with ``allow_unauthenticated`` print a warning instead. Call it before Ray starts.

    A cluster's dashboard (``address`` given) is the head node's business, not this process's.
    """
    if address or _is_loopback(host) or not token_auth_disabled():
        return
    exposure = (
        f"--dashboard-host {host} with {AUTH_MODE_ENV}={os.environ[AUTH_MODE_ENV]}: an unauthenticated "
        "job-submission endpoint, anyone who reaches it can run code as you"
    )
    if not allow_unauthenticated:
        raise InputError(
            f"{exposure}; bind it to 127.0.0.1 (forward the port over ssh) or turn token "
            "authentication on (--allow-unauthenticated-dashboard overrides)"
        )
    print(f"WARNING: {exposure} (allowed by --allow-unauthenticated-dashboard)", file=sys.stderr, flush=True)


def token_auth_disabled() -> bool:
    """Whether a local Ray started by this process runs without token authentication (Ray reads the variable
    the same way: any value but ``token`` turns it off)."""
    mode = os.environ.get(AUTH_MODE_ENV)
    return mode is not None and mode.strip().lower() != "token"


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to any interface


def apply_train_env_defaults() -> None:
    """Set ``ray_compat.TRAIN_ENV_DEFAULTS`` where the user has not. Call it in every process that builds a
    trainer: Ray Train propagates these variables from that process to its controller and workers, which on an
    existing cluster do not inherit the launching shell's environment."""
    for key, value in ray_compat.TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _quiet_default_auth_notice() -> None:
    """Drop Ray's notice that a local cluster uses token authentication (its secure default).

    It goes to stderr at every start and would bury a one-line error such as a trial that can never fit
    the cluster. Only that notice: the warning that authentication is disabled still shows.
    """
    auth_logger = logging.getLogger(ray_compat.AUTH_NOTICE_LOGGER)
    if not any(isinstance(f, _DropNotice) for f in auth_logger.filters):
        auth_logger.addFilter(_DropNotice(ray_compat.AUTH_NOTICE_PREFIX))


def _dashboard_url(context: Any) -> str | None:
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


class PlacementGroupReaper:
    """Detached async actor: removes a Train run's latest placement group once the run's controller is dead.

    Ray frees a placement group that an actor created only when that actor and its whole job are gone, so the
    group of a Train controller killed mid-run (every trial ASHA stops) stays reserved while the search lives.
    Ray Train's own cleaner learns of the death from the State API, which needs the dashboard; this one asks
    the controller itself, through its actor handle. Ray core's API (plus the built-in actor ping,
    ``ray_compat.actor_ready``), and no torch import: it is a small process. Started per run by
    gankd_ray.ray_compat.PlacementGroupReaperCallback, in the controller.

    It holds the controller's handle, which keeps the controller alive: on a normal end the controller,
    having removed its placement group, kills its reaper.
    """

    def __init__(self, controller):
        self._controller = controller
        self._placement_group = None

    async def register(self, placement_group) -> None:
        self._placement_group = placement_group  # a restarted worker group has a new one; Train removed the old

    async def watch(self) -> None:
        import ray

        while await self._controller_alive():
            await asyncio.sleep(CONTROLLER_POLL_S)
        self._remove_placement_group()
        ray.actor.exit_actor()

    async def _controller_alive(self) -> bool:
        import ray

        try:
            await asyncio.wait_for(ray_compat.actor_ready(self._controller), CONTROLLER_ANSWER_TIMEOUT_S)
        except (asyncio.TimeoutError, ray.exceptions.ActorUnavailableError):  # busy or briefly unreachable
            return True
        except ray.exceptions.RayActorError:
            return False
        return True

    def _remove_placement_group(self) -> None:
        from ray.util.placement_group import placement_group_table, remove_placement_group

        group = self._placement_group
        if group is None or placement_group_table(group).get("state", "REMOVED") == "REMOVED":
            return
        logging.getLogger(__name__).info("Train controller died: removing its placement group %s", group.id.hex())
        remove_placement_group(group)
