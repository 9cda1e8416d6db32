"""`autovibe vm …`: render the files of a worker VM from `vm-templates/`."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from workers import vm

app = typer.Typer(
    help="Worker VMs: cloud-init, libvirt domain, Nomad client.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _group() -> None:
    """Worker VMs: cloud-init, libvirt domain, Nomad client."""  # keeps `vm render` a subcommand


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def parse_var(item: str) -> tuple[str, Any]:
    """`k=v`: v as given; `k=@FILE` the file's text; `k=[…]` / `k={…}` parsed as JSON."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--var {item!r}: expected NAME=VALUE")
    if value.startswith("@"):
        return key, Path(value[1:]).read_text()
    if value[:1] in "[{":
        try:
            return key, json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--var {key}: not valid JSON: {exc}") from exc
    return key, value


def _variables(vars_file: Path | None, var: list[str] | None) -> dict[str, Any]:
    """--vars FILE, then --var NAME=VALUE on top; the proxy's CA from the data root when the
    variables give none."""
    variables: dict[str, Any] = {}
    try:
        if vars_file is not None:
            loaded = yaml.safe_load(vars_file.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{vars_file}: expected a mapping of variables")
            variables.update(loaded)
        variables.update(parse_var(item) for item in var or [])
    except (ValueError, OSError, yaml.YAMLError) as exc:
        raise _fail(str(exc)) from exc
    ca = DataRoot.at(Settings().data).ca_cert
    if "ca_cert" not in variables and ca.exists():  # the proxy's CA, as workers get it locally
        variables["ca_cert"] = ca.read_text()
    return variables


VarOption = Annotated[
    list[str] | None,
    typer.Option(
        "--var",
        help="NAME=VALUE; a VmSpec field (vcpus, memory_mb, disk_gb, gpus, …) or a template "
        "variable. VALUE @FILE reads a file, [..] / {..} is JSON.",
    ),
]
VarsFileOption = Annotated[
    Path | None, typer.Option("--vars", help="YAML mapping of variables; --var wins.")
]


@app.command("render")
def render(
    template: Annotated[str, typer.Argument(help="worker, gpu-worker or base.")],
    out: Annotated[Path, typer.Option("--out", help="Folder the files are written to.")],
    var: VarOption = None,
    vars_file: VarsFileOption = None,
) -> None:
    """Write user-data, meta-data, domain.xml, nomad-client.hcl and vm.json for one VM."""
    variables = _variables(vars_file, var)
    try:
        spec, rest = vm.split_vars(variables)
        paths = vm.write(vm.render(template, spec, rest), out)
        (out / "vm.json").write_text(spec.model_dump_json(indent=2))  # for `worker attach --vm`
        paths.append(out / "vm.json")
    except vm.VmTemplateError as exc:
        raise _fail(str(exc)) from exc
    for path in paths:
        console.print(str(path), highlight=False)


@app.command("vars")
def vars_(template: Annotated[str, typer.Argument(help="worker, gpu-worker or base.")]) -> None:
    """Every variable of TEMPLATE: its meaning, and its default or `required`."""
    try:
        needed = vm.required(template)
    except vm.VmTemplateError as exc:
        raise _fail(str(exc)) from exc
    # A console of this call's width (COLUMNS now), not the one made at import.
    out = Console()
    table = Table("variable", "default", "meaning", title=f"{template}: template variables")
    for name in needed:
        table.add_row(name, "required", Text(vm.VARIABLES.get(name, "")))
    out.print(table)
    defaults = vm.VmSpec().model_dump(mode="json")
    table = Table("variable", "default", "meaning", title="VmSpec fields (--var NAME=VALUE)")
    for name, field in vm.VmSpec.model_fields.items():
        default = defaults[name]
        shown = default if isinstance(default, str) else json.dumps(default)
        table.add_row(
            name,
            Text("-" if default is None else shown),
            Text(" ".join((field.description or "").split())),
        )
    out.print(table)
    out.print(f"example: {vm.EXAMPLE_VARS}", highlight=False, soft_wrap=True)


image_app = typer.Typer(help="Worker VM images (mmdebstrap → qcow2).", no_args_is_help=True)
app.add_typer(image_app, name="image")


@image_app.command("build")
def image_build(
    mirror: Annotated[
        str | None, typer.Option(help="Debian mirror [default: deb.debian.org].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Build again even when cached.")] = False,
) -> None:
    """Build the worker image (Debian, cloud-init, SSH, VNC desktop, Python, Node.js,
    bubblewrap, the autovibe worker in /opt/autovibe) unless the cache holds it; print its
    folder."""
    from workers import vm_image

    recipe = vm_image.ImageRecipe() if mirror is None else vm_image.ImageRecipe(mirror=mirror)
    root = DataRoot.at(Settings().data)
    target = vm_image.image_for(root, recipe)
    if not target.complete() or force:
        err.print(f"building {target.folder} (mmdebstrap {recipe.suite}, a minute or more)")
    try:
        image, built = vm_image.build(recipe, root, force=force)
    except vm_image.ImageError as exc:
        raise _fail(str(exc), code=1) from exc
    manifest = image.manifest()
    timings = manifest.get("timings", {})
    assert isinstance(timings, dict)
    how = "built" if built else "cached"
    spent = ", ".join(f"{k} {v}" for k, v in timings.items())
    err.print(f"{how}: {manifest['disk_bytes']} bytes of qcow2 ({spent})", highlight=False)
    console.print(str(image.folder), highlight=False, soft_wrap=True)


def _root() -> DataRoot:
    return DataRoot.at(Settings().data)


@app.command("up")
def up(
    name: Annotated[str, typer.Argument(help="The VM's name (libvirt domain, hostname).")],
    template: Annotated[str, typer.Option(help="worker, gpu-worker or base.")] = "worker",
    var: VarOption = None,
    vars_file: VarsFileOption = None,
    identity: Annotated[
        Path | None, typer.Option(help="The operator's private SSH key [ssh's default].")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for SSH and cloud-init.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for cloud-init.")] = 900,
) -> None:
    """Build (or take from the cache) the image, render the VM's files, define the domain in
    libvirt and start it; wait until cloud-init is done and the first operator can SSH in."""
    from workers import vm_host, vm_image

    root = _root()
    recipe = vm_image.ImageRecipe()
    installed = vm_host.installed(recipe.key())
    variables = {
        "disk_path": str(vm_host.LIBVIRT_IMAGES / f"{name}.qcow2"),
        "seed_path": str(vm_host.LIBVIRT_IMAGES / f"{name}-seed.iso"),
        **_variables(vars_file, var),
        "name": name,
        "image": str(installed.disk),
        "kernel": str(installed.kernel),
        "initrd": str(installed.initrd),
        "cmdline": recipe.cmdline,
        "provisioned": True,
    }
    if "accel" not in variables:
        variables["accel"], why = vm_host.accelerator()
        err.print(f"accelerator: {variables['accel']} ({why})", highlight=False)
    try:  # rendered first: a missing variable is reported before any build or libvirt call
        spec, rest = vm.split_vars(variables)
        rendered = vm.render(template, spec, rest)
    except vm.VmTemplateError as exc:
        raise _fail(str(exc)) from exc
    operators = rest.get("operators") or []
    user = str(operators[0]["name"]) if operators else "root"
    files = vm_host.VmFiles.of(root, name)
    try:
        if vm_host.state(name) is not None:
            raise _fail(f"libvirt already has a domain {name!r}: `autovibe vm down {name}` first")
        vm.write(rendered, files.folder)
        files.spec_path.write_text(spec.model_dump_json(indent=2))
        access = {"user": user, "identity": str(identity.resolve()) if identity else None}
        files.access_path.write_text(json.dumps(access))
        image, built = vm_image.build(recipe, root)
        vm_host.install_image(image)
        vm_host.ensure_network(spec.network, spec.host_cidr, files.folder)
        # The proxy's port is all the VM may reach on this host.
        vm_host.fence(spec.network, [urlsplit(str(rest["proxy_url"])).port or 8080])
        vm_host.make_disk(spec, installed)
        vm_host.make_seed(spec, files.folder / "user-data", files.folder / "meta-data")
        started = time.monotonic()
        vm_host.define_and_start(files.folder / "domain.xml", name)
        err.print(f"{name}: started ({spec.accel}, image {'built' if built else 'cached'})")
        if not wait:
            return
        address, _ = vm_host.wait_ready(spec, user, identity, files.known_hosts, timeout)
    except (vm_image.ImageError, vm_host.VmHostError) as exc:
        raise _fail(str(exc), code=1) from exc
    files.spec_path.write_text(spec.model_copy(update={"address": address}).model_dump_json())
    err.print(f"{name}: cloud-init done {time.monotonic() - started:.0f} s after start")
    console.print(f"{name} {address}", highlight=False)


@app.command("ls")
def ls() -> None:
    """VMs made with `vm up`: name, libvirt state, address, accelerator, vCPUs, memory."""
    from workers import vm_host

    table = Table("name", "state", "address", "accel", "vcpus", "memory_mb")
    for path in sorted((_root().root / "vms").glob("*/vm.json")):
        spec = vm.VmSpec.model_validate_json(path.read_text())
        state = vm_host.state(spec.name) or "undefined"
        table.add_row(spec.name, state, spec.address or "-", spec.accel, str(spec.vcpus),
                      str(spec.memory_mb))  # fmt: skip
    console.print(table)


@app.command("down")
def down(name: Annotated[str, typer.Argument(help="The VM's name.")]) -> None:
    """Stop the VM, undefine it, delete its disk, seed and files."""
    from workers import vm_host

    files = vm_host.VmFiles.of(_root(), name)
    if not files.spec_path.exists():
        raise _fail(f"no VM {name!r} under {files.folder.parent}")
    try:
        vm_host.destroy(files.spec())
    except vm_host.VmHostError as exc:
        raise _fail(str(exc), code=1) from exc
    shutil.rmtree(files.folder)
    console.print(f"{name} removed", highlight=False)


@app.command("console")
def console_(name: Annotated[str, typer.Argument(help="The VM's name.")]) -> None:
    """The VM's serial console (`virsh console`; Ctrl-] leaves)."""
    from workers import vm_host

    virsh = shutil.which("virsh")
    if virsh is None:
        raise _fail("virsh not found: install libvirt-clients")
    os.execv(virsh, ["virsh", "-c", vm_host.URI, "console", name])
