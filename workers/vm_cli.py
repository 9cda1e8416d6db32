"""`autovibe vm …`: render the files of a worker VM from `vm-templates/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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


@app.command("render")
def render(
    template: Annotated[str, typer.Argument(help="worker, gpu-worker or base.")],
    out: Annotated[Path, typer.Option("--out", help="Folder the files are written to.")],
    var: Annotated[
        list[str] | None,
        typer.Option(
            "--var",
            help="NAME=VALUE; a VmSpec field (vcpus, memory_mb, disk_gb, gpus, …) or a template "
            "variable. VALUE @FILE reads a file, [..] / {..} is JSON.",
        ),
    ] = None,
    vars_file: Annotated[
        Path | None, typer.Option("--vars", help="YAML mapping of variables; --var wins.")
    ] = None,
) -> None:
    """Write user-data, meta-data, domain.xml, nomad-client.hcl and vm.json for one VM."""
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
    table = Table("variable", "default", "meaning", title=f"{template}: template variables")
    for name in needed:
        table.add_row(name, "required", Text(vm.VARIABLES.get(name, "")))
    console.print(table)
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
    console.print(table)
    console.print(f"example: {vm.EXAMPLE_VARS}", highlight=False, soft_wrap=True)


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
    bubblewrap) unless the cache holds it; print its folder."""
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
