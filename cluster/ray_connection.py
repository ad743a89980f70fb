"""Connecting to Ray: an embedded local instance by default, or an existing cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cluster.account_dir import ray_temp_dir


def use_token_auth_if_available() -> None:
    """Clusters started by Ray 2.60's `ray start` require the token (~/.ray/auth_token) from every
    client: drivers, joining nodes and Jobs API clients. Send it whenever it is there."""
    if "RAY_AUTH_MODE" not in os.environ and Path.home().joinpath(".ray", "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str = "", *, num_cpus: int | None = None) -> None:
    """Start an embedded local Ray (no address and no RAY_ADDRESS) or join a running cluster.

    Inside a Ray job (submitted with the Jobs API) RAY_ADDRESS is set and the job's cluster is used.
    """
    target = address or os.environ.get("RAY_ADDRESS", "")
    if target:
        use_token_auth_if_available()  # before Ray is imported: it reads the mode once, at import
    import ray

    if ray.is_initialized():
        return
    # Workers' output (DeepSpeed banners, Ray Train's report dumps) stays in Ray's logs on each
    # node; aiayn's own progress lines reach the driver through jobs/report/progress.py.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if target:
        ray.init(address=target, **quiet)
    else:
        # The dashboard (on 127.0.0.1) serves the state API that Ray Train's controller polls.
        # address="local" always starts a new instance; without it Ray joins whatever cluster
        # /tmp/ray/ray_current_cluster names, even one that has been stopped.
        # Its sessions, logs and sockets (which Ray makes mode 777) lie inside this account's own
        # directory, as `aiayn cluster up`'s do; every address it listens on is the loopback's.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", _temp_dir=str(ray_temp_dir()), **quiet)
