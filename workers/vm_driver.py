"""The `vm` worker driver: each assignment runs in a worker VM made by `autovibe vm up`.

`launch` ships the assignment to the VM over SSH, as the operator `vm up` recorded (the
platform's key, `vms/<name>/access.json`): one tar stream holding its spec, rewritten for the
VM's paths (`for_vm`), and the task's repository. It then starts the runner the way the Nomad
job's task starts it, `<install_dir>/.venv/bin/python -m workers.runner <spec.json>` with
PYTHONUNBUFFERED=1 (`RUNNER_ARGV`, `RUNNER_ENV`), in the unit cloud-init installed,
`autovibe-worker@<spec>.service`: as the `autovibe` user, with the proxy and CA environment of
/etc/environment. The VM network reaches the host and nothing else, so the proxy (at
`Settings.host`, which must be the host's address on that network) is the only way out.

`alive` asks systemd; once the unit has ended, the assignment's outputs (`RETURNED`: result,
patch, report, logs, transcript) come back into its folder here, where the scheduler collects
them as a local runner's. What comes back is hostile input: only regular files and folders
named in `RETURNED`, bounded in size, written without following a link; result.json is then
read by `workers.result` as any runner's.

Machine `m<i>` of a trial runs on the i-th VM (by name) that `vm up` made in this data root.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from contracts.config import NomadCluster
from contracts.dataroot import (
    DataRoot,
    atomic_write,
    open_nofollow,
    read_untrusted,
    write_secret_file,
)
from contracts.settings import Settings
from workers import vm_host
from workers.spec import AssignmentSpec
from workers.vm import VmSpec
from workers.workspace import IGNORED

RUNNER_ARGV = ("-m", "workers.runner")
"""After the interpreter, before the spec's path: the Nomad task's `args` (nomad-jobs/)."""
RUNNER_ENV = {"PYTHONUNBUFFERED": "1"}
"""The Nomad task's `env`; the rest comes from the VM's /etc/environment."""
VM_CA = PurePosixPath("/usr/local/share/ca-certificates/autovibe-proxy.crt")
"""The proxy's CA in the VM, as cloud-init writes it (vm-templates/base/user-data.j2)."""
RETURNED = (
    "result.json", "report.json", "patch.diff", "tests.log", "tests-tampered.diff",
    "agent.log", "runs.jsonl", "output",
)  # fmt: skip
"""What comes back from the VM into the assignment's folder: files, and `output/` (the
agent's transcript and summary); never the workspace, which only the patch leaves."""
FILE_LIMIT = 16 * 1024 * 1024
"""Most bytes of one returned file (result.json is read with the same bound)."""
TOTAL_LIMIT = 256 * 1024 * 1024
"""Most bytes brought back from one assignment."""
JOURNAL_LIMIT = 4 * 1024 * 1024
"""Most bytes of the runner's journal kept as runner.log."""
LAUNCHED = "vm.txt"
"""The name of the VM an assignment was sent to, in its folder here (host-only)."""
SSH_TIMEOUT_S = 120.0
ACTIVE = ("active", "activating", "deactivating", "reloading", "refreshing")
"""`systemctl is-active` answers for a runner that is still going (or restarting)."""

log = logging.getLogger(__name__)


class ReturnRefused(ValueError):
    """Something the VM sent back is not what a runner leaves: named, and nothing written."""


@dataclass(frozen=True)
class Vm:
    """A VM `vm up` made: its spec (with its address) and how the platform logs in."""

    spec: VmSpec
    user: str
    identity: Path | None
    known_hosts: Path

    @classmethod
    def load(cls, files: vm_host.VmFiles) -> Vm:
        access = json.loads(files.access_path.read_text())
        identity = Path(access["identity"]) if access.get("identity") else None
        return cls(files.spec(), str(access["user"]), identity, files.known_hosts)

    def ssh(
        self, command: str, stdin: bytes | None = None, timeout: float = SSH_TIMEOUT_S
    ) -> subprocess.CompletedProcess[bytes]:
        argv = vm_host.ssh_argv(self.spec, self.user, self.identity, self.known_hosts)
        return subprocess.run(
            [*argv, command], input=stdin, capture_output=True, timeout=timeout, check=False
        )

    def run(self, command: str, stdin: bytes | None = None) -> bytes:
        """`command` run by the operator's shell on the VM; its stdout, or OSError."""
        try:
            proc = self.ssh(command, stdin)
        except subprocess.TimeoutExpired as exc:
            raise OSError(f"{self.spec.name}: ssh timed out after {exc.timeout:.0f} s") from exc
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip()
            raise OSError(f"{self.spec.name}: `{command[:80]}` exited {proc.returncode}: {said}")
        return proc.stdout


def vm_artifacts(spec: AssignmentSpec, vm: VmSpec) -> PurePosixPath:
    """The assignment's folder under the VM's data root."""
    rel = Path("worker-artifacts", spec.project, spec.trial, spec.assignment)
    return PurePosixPath(vm.data_root) / rel.as_posix()


def for_vm(spec: AssignmentSpec, vm: VmSpec, host_root: Path) -> AssignmentSpec:
    """The spec as the runner in `vm` reads it: its folder, the task's repository, the data
    root and the proxy's CA at the VM's paths; the sandbox hides the VM's data root."""
    artifacts = Path(vm_artifacts(spec, vm))
    data_root = Path(vm.data_root)
    host_ca = str(DataRoot.at(host_root).ca_cert)

    def moved(path: Path) -> Path:
        if str(path) == host_ca:
            return Path(VM_CA)
        with contextlib.suppress(ValueError):
            return data_root / path.relative_to(host_root)
        return path

    env = {k: str(VM_CA) if v == host_ca else v for k, v in spec.env.items()}
    sandbox = None
    if spec.sandbox is not None:
        sandbox = spec.sandbox.model_copy(
            update={
                "hidden": [data_root],
                "read_only": [moved(p) for p in spec.sandbox.read_only],
                "rootfs": None,
            }
        )
    return spec.model_copy(
        update={
            "artifacts": artifacts,
            "repo": artifacts / "task-repo",
            "data_root": data_root,
            "env": env,
            "sandbox": sandbox,
        }
    )


def unit(spec_path: PurePosixPath) -> str:
    """Shell words for the runner's unit name (`systemd-escape` run on the VM)."""
    return f'"autovibe-worker@$(systemd-escape --path {shlex.quote(str(spec_path))}).service"'


def shipment(spec: AssignmentSpec, inside: AssignmentSpec) -> bytes:
    """A tar stream (paths relative to /) of the VM's spec.json (0600) and the task's
    repository, less what a workspace never copies (`workspace.IGNORED`)."""
    out = io.BytesIO()
    base = inside.artifacts.relative_to("/")
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = inside.model_dump_json(indent=2).encode()
        info = tarfile.TarInfo(str(base / "spec.json"))
        info.size, info.mode = len(data), 0o600
        tar.addfile(info, io.BytesIO(data))

        def skip(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
            name = Path(member.name).name
            return None if any(Path(name).match(p) for p in IGNORED) else member

        tar.add(spec.repo, arcname=str(base / "task-repo"), filter=skip)
    return out.getvalue()


def receive(stream: bytes, artifacts: Path) -> list[str]:
    """Write the tar `stream` from a VM into `artifacts` after checking every member (names,
    kinds, sizes); ReturnRefused names the first that is not a runner's output."""
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    total = 0
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if (
                path.is_absolute()
                or not path.parts
                or any(part in ("..", "") for part in path.parts)
                or path.parts[0] not in RETURNED
                or (len(path.parts) > 1 and path.parts[0] != "output")
                or len(path.parts) > 8
            ):
                raise ReturnRefused(f"{member.name!r}: not something a runner leaves")
            if not (member.isreg() or member.isdir()):
                raise ReturnRefused(f"{member.name!r}: a link or device, not a file")
            if member.size > FILE_LIMIT:
                raise ReturnRefused(f"{member.name!r}: {member.size} bytes, over {FILE_LIMIT}")
            total += member.size
            if total > TOTAL_LIMIT:
                raise ReturnRefused(f"more than {TOTAL_LIMIT} bytes returned")
            data = b""
            if member.isreg():
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
            members.append((member, data))
    written = []
    for member, data in members:
        target = artifacts / member.name
        if member.isdir():
            # Never through a link an earlier attempt left: mkdir refuses an existing name.
            if not target.is_dir() or target.is_symlink():
                target.mkdir(mode=0o755)
            continue
        fd = open_nofollow(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, below=artifacts)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        written.append(member.name)
    return written


class VmDriver:
    name = "vm"

    def __init__(self, cluster: NomadCluster | None = None, root: Path | None = None) -> None:
        """`cluster`: the drivers' one constructor (`workers.driver`); a VM places nothing.
        `root`: the data root whose `vms/` holds the VMs [$AUTOVIBE_DATA]."""
        self.root = root or DataRoot.at(Settings().data).root

    def vms(self) -> list[Vm]:
        """The VMs `vm up` made here that have an address, by name."""
        found = []
        for path in sorted((self.root / "vms").glob("*/vm.json")):
            files = vm_host.VmFiles(path.parent)
            with contextlib.suppress(OSError, ValueError, KeyError):
                vm = Vm.load(files)
                if vm.spec.address is not None:
                    found.append(vm)
        return found

    def vm_of(self, spec: AssignmentSpec) -> Vm:
        """The VM machine `m<i>` runs on: the i-th; OSError when there are fewer."""
        vms = self.vms()
        index = int(spec.machine[1:]) if spec.machine[1:].isdigit() else 0
        if not 1 <= index <= len(vms):
            raise OSError(
                f"machine {spec.machine}: {len(vms)} worker VM(s) under {self.root / 'vms'} "
                "(`autovibe vm up NAME` makes one; machines.count at most the VMs)"
            )
        return vms[index - 1]

    def launched_on(self, spec: AssignmentSpec) -> Vm | None:
        """The VM `launch` sent the assignment to (recorded before it shipped anything, in a
        file the VM's returns cannot name), None when it is gone or was never chosen."""
        try:
            name = read_untrusted(spec.artifacts / LAUNCHED, spec.artifacts, 256).decode().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return next((vm for vm in self.vms() if vm.spec.name == name), None)

    # -- the WorkerDriver port -----------------------------------------------------------------
    def launch(self, spec: AssignmentSpec) -> None:
        if spec.environment or spec.setup:
            raise OSError(
                f"task {spec.task_id}: task environments (packages, setup) are not built in "
                "worker VMs (the VM network reaches no Debian mirror, and a setup's proxy "
                "credential names the host's loopback); run it with driver: local"
            )
        spec.artifacts.mkdir(parents=True, exist_ok=True)
        # 0600: the spec carries the machine's live proxy credential.
        write_secret_file(spec.artifacts / "spec.json", spec.model_dump_json(indent=2))
        vm = self.vm_of(spec)
        if vm.spec.address is not None and spec.sandbox is not None:
            host = spec.sandbox.proxy_host
            if host.startswith("127.") or host in ("localhost", "::1"):
                raise OSError(
                    f"the proxy listens on {host}, which {vm.spec.name} cannot reach: start the "
                    "platform with AUTOVIBE_HOST set to the host's address on the VM network"
                )
        # Recorded first: an orchestrator that dies mid-launch finds the VM again.
        atomic_write(spec.artifacts / LAUNCHED, f"{vm.spec.name}\n")
        inside = for_vm(spec, vm.spec, spec.data_root or self.root)
        folder = shlex.quote(str(inside.artifacts))
        spec_path = inside.artifacts / "spec.json"
        script = (
            f"set -e; sudo rm -rf {folder}; sudo tar -x -C / -f -; "
            f"sudo chown -R autovibe:autovibe {folder}; "
            f"sudo systemctl reset-failed {unit(PurePosixPath(spec_path))} 2>/dev/null || true; "
            f"sudo systemctl start --no-block {unit(PurePosixPath(spec_path))}"
        )
        vm.run(script, stdin=shipment(spec, inside))

    def alive(self, spec: AssignmentSpec) -> bool:
        """True while the unit runs; once it has ended, its outputs are brought back and the
        assignment counts as alive until the scheduler has read the result.json they hold."""
        vm = self.launched_on(spec)
        if vm is None:
            return False
        inside = vm_artifacts(spec, vm.spec)
        try:
            proc = vm.ssh(f"systemctl is-active {unit(inside / 'spec.json')}")
        except subprocess.TimeoutExpired:
            log.warning("%s: %s did not answer; counted as running", spec.assignment, vm.spec.name)
            return True
        if proc.returncode == 255:  # ssh itself failed: the VM is unreachable for now
            log.warning("%s: ssh to %s failed; counted as running", spec.assignment, vm.spec.name)
            return True
        if proc.stdout.decode(errors="replace").strip() in ACTIVE:
            return True
        self.collect(spec, vm)
        return spec.result_path.exists()

    def cancel(self, spec: AssignmentSpec) -> None:
        """Stop the unit: systemd sends the runner SIGTERM (it stops its agent), then SIGKILL."""
        vm = self.launched_on(spec)
        if vm is not None:
            vm.run(f"sudo systemctl stop {unit(vm_artifacts(spec, vm.spec) / 'spec.json')}")

    # -- beyond the port -----------------------------------------------------------------------
    def collect(self, spec: AssignmentSpec, vm: Vm) -> list[str]:
        """Bring the runner's outputs and its journal (runner.log) back from `vm`."""
        inside = vm_artifacts(spec, vm.spec)
        names = " ".join(shlex.quote(n) for n in RETURNED)
        # The names that exist, NUL-separated; in output/ only files and folders (what the agent
        # linked there stays). A link at the top is sent as a link, which `receive` refuses.
        listing = (
            f'for n in {names}; do if [ -L "$n" ]; then printf \'%s\\0\' "$n"; '
            'elif [ "$n" = output ] && [ -d output ]; then '
            "find output \\( -type f -o -type d \\) -print0; "
            'elif [ -e "$n" ]; then printf \'%s\\0\' "$n"; fi; done'
        )
        tar = "tar -c --no-recursion --null -T - -f -"
        script = "sudo sh -c " + shlex.quote(
            f"cd {shlex.quote(str(inside))} && {{ {listing}; }} | {tar}"
        )
        try:
            written = receive(vm.run(script), spec.artifacts)
        except (OSError, tarfile.TarError, ReturnRefused) as exc:
            log.error("%s: outputs from %s refused: %s", spec.assignment, vm.spec.name, exc)
            return []
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            journal = vm.ssh(f"sudo journalctl -q -o cat -u {unit(inside / 'spec.json')}")
            atomic_write(spec.artifacts / "runner.log", journal.stdout[-JOURNAL_LIMIT:])
        return written
