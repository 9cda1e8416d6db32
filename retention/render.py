"""System configuration rendered from the retention policy, so the numbers live in one file.

- `logrotate.conf`: the service logs (`run/*.log`).
- `autovibe-retention.cron`: tmpreaper lines, the mtime-based approximation of
  `autovibe retention apply` for hosts without systemd; install it or the timer, not both.
- `autovibe-retention.service` + `.timer`: `autovibe retention apply` once a day.
- `ilm/autovibe-traffic-<group>.json`: Elasticsearch ILM policies per indexed field group, for
  the daily indices `autovibe-traffic-<group>-YYYY.MM.DD` the proxy's shipper writes; ILM ages
  each from the date in its name (configs/elasticsearch/, parse_origination_date).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from contracts.dataroot import DataRoot
from retention.policy import RetentionPolicy

HEADER = (
    "# Rendered by `autovibe retention render` from retention-policies.yaml: "
    "edit the policy, not this file."
)
RUN_AT = (3, 17)
"""Hour and minute of the daily run, the same for the timer and cron."""
SERVICE = "autovibe-retention.service"
TIMER = "autovibe-retention.timer"
CRON = "autovibe-retention.cron"
LOGROTATE = "logrotate.conf"
# Unit files and cron lines take these paths unquoted: keep to characters that need no escaping.
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")
_PLAIN_GLOB = re.compile(r"^/[A-Za-z0-9._/+*?-]*$")


def _plain(path: Path, what: str, glob: bool = False) -> str:
    text = str(path)
    if not (_PLAIN_GLOB if glob else _PLAIN_PATH).match(text):
        allowed = "._/+-*?" if glob else "._/+-"
        raise ValueError(
            f"{what} {text!r} must be an absolute path of letters, digits and {allowed} "
            "to be written into unit files, cron lines and logrotate.conf"
        )
    return text


def logrotate(policy: RetentionPolicy, root: DataRoot) -> str:
    logs = policy.service_logs
    paths = " ".join(_plain(root.root / p, "log path", glob=True) for p in logs.paths)
    # copytruncate: `autovibe up` keeps its services' log files open for their whole life.
    return (
        f"{HEADER}\n{paths} {{\n"
        "    daily\n"
        f"    rotate {logs.keep_days}\n"
        f"    maxage {logs.keep_days}\n"
        "    missingok\n"
        "    notifempty\n"
        "    copytruncate\n"
        "    compress\n"
        "    delaycompress\n"
        "    dateext\n"
        "}\n"
    )


def cron(policy: RetentionPolicy, root: DataRoot) -> str:
    hour, minute = RUN_AT
    protect = " ".join(f"--protect {shlex.quote(p)}" for p in policy.protected_patterns)
    lines = [
        HEADER,
        "# tmpreaper ages each file by mtime, not whole day or trial folders as",
        "# `autovibe retention apply` does; use it only where the systemd timer cannot run.",
        "SHELL=/bin/sh",
    ]
    for name, rule in policy.deleting().items():
        folder = _plain(root.root / name, "data root")
        lines.append(
            f"{minute} {hour} * * * root tmpreaper --mtime --mtime-dir {protect} "
            f"{rule.keep_days}d {folder}"
        )
    return "\n".join(lines) + "\n"


def systemd_service(root: DataRoot, executable: Path, policy_path: Path) -> str:
    data = _plain(root.root, "data root")
    return (
        f"{HEADER}\n"
        "[Unit]\n"
        f"Description=autovibe retention: delete what has expired under {data}\n"
        f"RequiresMountsFor={data}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"Environment=AUTOVIBE_DATA={data}\n"
        f"ExecStart={_plain(executable, 'executable')} retention apply "
        f"--policy {_plain(policy_path, 'policy file')}\n"
        "Nice=19\n"
        "IOSchedulingClass=idle\n"
        "NoNewPrivileges=true\n"
        "ProtectSystem=strict\n"
        f"ReadWritePaths={data}\n"
    )


def systemd_timer() -> str:
    hour, minute = RUN_AT
    return (
        f"{HEADER}\n"
        "[Unit]\n"
        "Description=Run autovibe retention daily\n"
        "\n"
        "[Timer]\n"
        f"OnCalendar=*-*-* {hour:02d}:{minute:02d}:00\n"
        "Persistent=true\n"
        "RandomizedDelaySec=15min\n"
        f"Unit={SERVICE}\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def ilm_policies(policy: RetentionPolicy) -> dict[str, dict[str, Any]]:
    """Body of `PUT _ilm/policy/<name>` per field group; a null keep has no delete phase."""
    out = {}
    for group, days in policy.index_fields.model_dump().items():
        # Daily indices named by their day never roll over (rollover needs an alias or a data
        # stream); a delete phase's min_age counts from the day in the index name.
        phases: dict[str, Any] = {"hot": {"actions": {}}}
        if days is not None:
            phases["delete"] = {"min_age": f"{days}d", "actions": {"delete": {}}}
        out[f"autovibe-traffic-{group}"] = {
            "policy": {"_meta": {"rendered_from": "retention-policies.yaml"}, "phases": phases}
        }
    return out


def render(
    policy: RetentionPolicy, root: DataRoot, dest: Path, executable: Path, policy_path: Path
) -> list[Path]:
    """Write every file into `dest`; returns their paths."""
    files = {
        LOGROTATE: logrotate(policy, root),
        CRON: cron(policy, root),
        SERVICE: systemd_service(root, executable, policy_path),
        TIMER: systemd_timer(),
    }
    for name, body in ilm_policies(policy).items():
        files[f"ilm/{name}.json"] = json.dumps(body, indent=2) + "\n"
    written = []
    for name, text in files.items():
        path = DataRoot.ensure((dest / name).parent) / Path(name).name
        path.write_text(text)
        written.append(path)
    return written
