"""The way out of a task's setup commands: the operator's registries, through the proxy.

A task's setup (`environment.setup`, `workers.setups`) is run once and shared by every trial
and project that names the same repository, commands and root, so what it may reach cannot be
one trial's narrower list: its credential carries none, so the proxy applies the operator's
(`AUTOVIBE_EGRESS_ALLOW`, the list it starts with). With that list empty in the settings, or
an unsandboxed run, the setup stays offline.

Its credential names machine `setup` (`budget.scopes.SETUP_MACHINE`) of the trial's project,
for `<assignment>-setup`: its flows are captured and metered under that identity, and a model
call it made would be charged to the project and that machine's day, never to the agent.
"""

from __future__ import annotations

from budget.scopes import SETUP_MACHINE
from contracts.config import Task
from contracts.credentials import platform_proxy_url, proxy_env
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from workers.setups import SETUP_TIMEOUT_S

BRIDGED_HOST = "127.0.0.1"
"""Where a sandbox reaches the proxy: the bridge on its own loopback (`workers.sandbox`)."""


def setup_env(
    settings: Settings,
    key: bytes,
    root: DataRoot,
    *,
    task: Task,
    project: str,
    trial: str,
    assignment: str,
    sandboxed: bool,
) -> dict[str, str] | None:
    """The proxy variables and CA certificate the task's setup runs with, for `assignment` of
    `project`'s `trial`; None (offline) without setup commands, a sandbox or an operator's
    egress allowlist."""
    if not (task.environment and task.environment.setup and sandboxed and settings.egress_allow):
        return None
    url = platform_proxy_url(
        key, BRIDGED_HOST, settings.proxy_port, machine=SETUP_MACHINE, project=project,
        trial=trial, assignment=assignment,
        # The setup may wait for another runner's build of it, then run for its own limit.
        lifetime_s=SETUP_TIMEOUT_S + task.timeout_s,
    )  # fmt: skip
    # No egress list of its own: the proxy applies the one it was started with, the operator's.
    return proxy_env(url, root.ca_cert)
