"""Worker VMs: the machine shape (`VmSpec`) and the files rendered for one from `vm-templates/`.

A template is a folder of `vm-templates/` holding one Jinja2 file per output; each file
extends the same file of its parent (base → worker → gpu-worker). Rendering is strict: a
variable the caller did not give fails with its name instead of leaving a hole in a VM.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NoReturn

import jinja2
import jinja2.meta
import jinja2.nodes
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from contracts.settings import PROJECT_ROOT

TEMPLATES = PROJECT_ROOT / "vm-templates"
WORKER_UNIT = Path(__file__).resolve().parent / "systemd" / "autovibe-worker@.service"
OUTPUTS = ("user-data", "meta-data", "domain.xml", "nomad-client.hcl")
"""What every template renders: cloud-init NoCloud seed, libvirt domain, Nomad client config."""
UBUNTU_LTS = (
    "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"
)
PCI_ADDRESS = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
VARIABLES: dict[str, str] = {
    "operators": "Operators who may log in, SSH keys only, with sudo: a list of "
    "{name, ssh_keys: [public key, ...]}.",
    "proxy_url": "The metering proxy with this VM's machine credential, "
    "http://MACHINE:TOKEN@HOST:PORT; every process gets it from /etc/environment.",
    "ca_cert": "The proxy's CA certificate (PEM), trusted system-wide. `autovibe vm` takes "
    "$AUTOVIBE_DATA/proxy/mitmproxy-ca-cert.pem when it is not given.",
    "nomad_servers": "Nomad servers the VM's client joins: a list of host:port (RPC, 4647).",
    "autovibe_repo": "git URL of autovibe, cloned into install_dir at first boot.",
    "autovibe_ref": "Branch or tag of autovibe_repo to check out.",
}
"""The template variables that are not `VmSpec` fields: no defaults, each template needs those
its files use (`required`)."""
EXAMPLE_VARS = PROJECT_ROOT / "configs" / "vm" / "example.vars.yaml"
"""A vars file to start from: every template variable, with placeholder values."""
CONTEXT = frozenset({"vm", "template", "worker_unit"})
"""Names `render` gives every template itself."""


class VmTemplateError(Exception):
    """A template could not be rendered: unknown template, missing variable, bad value."""


class VmSpec(BaseModel):
    """One worker VM; every field can be overridden per trial or with `--var field=value`."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    name: str = Field(default="autovibe-worker", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    """Libvirt domain name, hostname and Nomad node name."""
    vcpus: int = Field(default=64, ge=1)
    """Virtual CPUs of the domain."""
    memory_mb: int = Field(default=8192, ge=512)
    """Memory of the domain, MiB."""
    disk_gb: int = Field(default=128, ge=8)
    """Size of the VM's disk, GB."""
    image: str = UBUNTU_LTS
    """Ubuntu LTS cloud image the qcow2 disk is backed by."""
    disk_path: PurePosixPath | None = None
    """The VM's qcow2 disk on the host [default: /var/lib/libvirt/images/<name>.qcow2]."""
    seed_path: PurePosixPath | None = None
    """cloud-init NoCloud seed ISO on the host [default: …/images/<name>-seed.iso]."""
    network: str = "autovibe"
    """Libvirt network the VM's virtio NIC joins; `autovibe vm up` makes it isolated (no
    forwarding) when libvirt lacks it, so the VM reaches its host (the proxy) and nothing else."""
    host_cidr: str = "192.168.150.1/24"
    """The host's address on that network when `vm up` creates it: where the VM finds the proxy."""
    accel: Literal["kvm", "tcg"] = "kvm"
    """KVM, or TCG (emulation, several times slower) when the host's KVM is not usable;
    `autovibe vm up` detects which."""
    kernel: PurePosixPath | None = None
    """Kernel booted directly (images from `autovibe vm image build`: no boot loader); None
    boots the disk's own."""
    initrd: PurePosixPath | None = None
    """Initrd booted with `kernel`."""
    cmdline: str = ""
    """Kernel command line with `kernel`."""
    provisioned: bool = False
    """The image already holds the packages and tools (`autovibe vm image build`): cloud-init
    installs nothing from apt and clones nothing; False for a plain cloud image."""
    address: str | None = None
    """The VM's address once it has one (DHCP lease): where operators SSH and tunnel VNC."""
    ssh_port: int = 22
    """Port of the VM's SSH server."""
    desktop: bool = False
    """Run an X desktop behind a VNC server (localhost-only, reached over SSH) for GUI agents."""
    vnc_display: int = Field(default=1, ge=1, le=99)
    """Display of the in-guest VNC server; it listens on port 5900 + display."""
    datacenter: str = "dc1"
    """Nomad datacenter the client joins."""
    data_root: PurePosixPath = PurePosixPath("/mnt/data/autovibe")
    """The data root inside the VM (shared storage), a Nomad host volume for the worker job."""
    host_data_root: PurePosixPath | None = None
    """Host folder shared into the VM at `data_root` over virtiofs (one-host setups); None
    when `data_root` is network storage mounted by other means."""
    install_dir: PurePosixPath = PurePosixPath("/opt/autovibe")
    """Where cloud-init checks out autovibe; the worker unit runs its `.venv`."""
    gpus: list[str] = Field(default_factory=list)
    """Host PCI addresses passed through (gpu-worker), e.g. 0000:41:00.0."""
    gpu_model: str = ""
    """GPU model advertised in Nomad node meta (gpu-worker), e.g. H100."""
    nvidia_driver: str = "550"
    """NVIDIA driver series installed on gpu-worker (Ubuntu `nvidia-driver-<series>-server`)."""

    @field_validator("gpus", mode="before")
    @classmethod
    def _split_gpus(cls, value: Any) -> Any:
        return [g for g in value.split(",") if g] if isinstance(value, str) else value

    @field_validator("gpus")
    @classmethod
    def _pci(cls, value: list[str]) -> list[str]:
        for gpu in value:
            if not PCI_ADDRESS.match(gpu):
                raise ValueError(f"{gpu!r} is not a PCI address like 0000:41:00.0")
        return value

    @property
    def disk(self) -> PurePosixPath:
        return self.disk_path or PurePosixPath(f"/var/lib/libvirt/images/{self.name}.qcow2")

    @property
    def seed(self) -> PurePosixPath:
        return self.seed_path or PurePosixPath(f"/var/lib/libvirt/images/{self.name}-seed.iso")

    @property
    def vnc_port(self) -> int:
        return 5900 + self.vnc_display

    def pci(self) -> list[dict[str, str]]:
        """`gpus` split into the domain/bus/slot/function of a libvirt <address>."""
        out = []
        for gpu in self.gpus:
            match = PCI_ADDRESS.match(gpu)
            assert match is not None  # validated
            domain, bus, slot, function = match.groups()
            out.append({"domain": domain, "bus": bus, "slot": slot, "function": function})
        return out


def templates(folder: Path = TEMPLATES) -> list[str]:
    """Names that can be rendered: folders that hold every output."""
    return sorted(
        d.name
        for d in folder.iterdir()
        if d.is_dir() and all((d / f"{o}.j2").is_file() for o in OUTPUTS)
    )


def _fail(message: str) -> NoReturn:
    raise VmTemplateError(message)


def _hcl(value: Any) -> str:
    """A HCL string/list literal: JSON, with template sequences (`${`, `%{`) escaped."""
    return json.dumps(value).replace("${", "$${").replace("%{", "%%{")


def environment(folder: Path = TEMPLATES) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,
        # Only the XML is escaped; YAML and HCL values go through `tojson` / `hcl`.
        autoescape=jinja2.select_autoescape(enabled_extensions=("xml.j2",), default=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["hcl"] = _hcl
    env.globals["fail"] = _fail
    return env


def split_vars(variables: dict[str, Any]) -> tuple[VmSpec, dict[str, Any]]:
    """`VmSpec` fields (validated) and the remaining template variables."""
    fields = {k: v for k, v in variables.items() if k in VmSpec.model_fields}
    rest = {k: v for k, v in variables.items() if k not in VmSpec.model_fields}
    try:
        return VmSpec.model_validate(fields), rest
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise VmTemplateError(f"bad VM spec: {problems}") from exc


def _check_template(template: str, folder: Path) -> None:
    names = templates(folder)
    if template not in names:
        raise VmTemplateError(f"unknown VM template {template!r}; allowed: {', '.join(names)}")


def required(template: str, folder: Path = TEMPLATES) -> list[str]:
    """The variables the files of `template` use, read from the templates themselves (each
    output and every file it extends), less those `render` provides."""
    _check_template(template, folder)
    env = environment(folder)
    assert env.loader is not None
    names: set[str] = set()
    for output in OUTPUTS:
        path: str | None = f"{template}/{output}.j2"
        while path is not None:
            source = env.loader.get_source(env, path)[0]
            ast = env.parse(source)
            names |= jinja2.meta.find_undeclared_variables(ast)
            parent = next(ast.find_all(jinja2.nodes.Extends), None)
            path = (
                parent.template.value
                if parent and isinstance(parent.template, jinja2.nodes.Const)
                else None
            )
    return sorted(names - CONTEXT - set(env.globals))


def missing(template: str, variables: dict[str, Any], folder: Path = TEMPLATES) -> list[str]:
    """The variables `template` needs that `variables` lacks, all of them."""
    return [name for name in required(template, folder) if name not in variables]


def render(
    template: str, spec: VmSpec, variables: dict[str, Any], folder: Path = TEMPLATES
) -> dict[str, str]:
    """Every output of `template` for `spec`, by file name; `variables` fill the rest."""
    _check_template(template, folder)
    if lacking := missing(template, variables, folder):
        lines = "".join(f"\n  {name}: {VARIABLES.get(name, '')}" for name in lacking)
        raise VmTemplateError(
            f"{template}: {len(lacking)} variable{'s' * (len(lacking) > 1)} missing "
            f"(give them in --vars FILE, e.g. {EXAMPLE_VARS.relative_to(PROJECT_ROOT)}, or --var "
            f"NAME=VALUE; `autovibe vm vars {template}` lists them all):{lines}"
        )
    env = environment(folder)
    context = {
        **variables,
        "vm": spec,
        "template": template,
        "worker_unit": WORKER_UNIT.read_text(),
    }
    out = {}
    for output in OUTPUTS:
        try:
            out[output] = env.get_template(f"{template}/{output}.j2").render(context)
        except jinja2.UndefinedError as exc:
            raise VmTemplateError(
                f"{template}/{output}.j2: {exc.message}; pass it with --var NAME=VALUE"
            ) from exc
    return out


def write(rendered: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in rendered.items():
        path = out / name
        path.write_text(text)
        paths.append(path)
    return paths
