"""`autovibe checkpoints …`: checkpoint assignment workspaces, show their tree, restore them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.tree import Tree

from common.cli import data_root, fail
from retention import checkpoints as ck

app = typer.Typer(
    help="Workspace checkpoints: create, show the evolution tree, restore; VM disk snapshots.",
    no_args_is_help=True,
)
console = Console()


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """A CheckpointError in the block ends the command with its message."""
    try:
        yield
    except ck.CheckpointError as exc:
        raise fail(str(exc)) from exc


def _label(c: ck.Checkpoint, trial: str) -> str:
    style = "" if c.trial == trial else "dim"
    text = (
        f"[bold]{c.id}[/bold] {c.agent} · {c.model} · {c.status} · {c.files} files "
        f"{decimal(c.bytes)} → {decimal(c.archive_bytes)} · {c.created[:19]}"
    )
    if c.trial != trial:
        text += f" (trial {c.trial})"
    return f"[{style}]{text}[/{style}]" if style else text


def _add(branch: Tree, node: ck.Node, trial: str) -> None:
    sub = branch.add(_label(node.checkpoint, trial))
    for child in node.children:
        _add(sub, child, trial)


@app.command()
def create(assignment_dir: Path) -> None:
    """Checkpoint ASSIGNMENT_DIR/workspace: manifest, metadata, parent link, LZ4 archive."""
    with _refused():
        c = ck.create(data_root(), assignment_dir)
    parent = c.parent or f"baseline {c.baseline[:12] if c.baseline else '(none)'}"
    console.print(f"checkpoint {c.id} ({c.files} files, {decimal(c.archive_bytes)}) ← {parent}")


@app.command()
def tree(trial: str) -> None:
    """The evolution tree of TRIAL's checkpoints per task, earlier trials' ancestors dimmed."""
    roots = ck.evolution(data_root(), trial)
    if not roots:
        raise fail(f"no checkpoints of trial {trial!r}")
    top = Tree(f"trial [bold]{trial}[/bold]")
    for (task, baseline), nodes in sorted(roots.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        base = top.add(f"task [bold]{task or '?'}[/bold] · baseline {(baseline or '?')[:12]}")
        for node in nodes:
            _add(base, node, trial)
    console.print(top)


@app.command()
def restore(checkpoint_id: str, dest: Path) -> None:
    """Rebuild checkpoint CHECKPOINT_ID's workspace in DEST (a new or empty folder), verified."""
    with _refused():
        c = ck.restore(data_root(), checkpoint_id, dest)
    console.print(f"restored {c.id} into {dest} ({c.files} files, manifest verified)")


@app.command("vm-snapshot")
def vm_snapshot(
    image: Path,
    name: str,
    project: Annotated[str, typer.Option(help="Project the VM worker belongs to.")],
) -> None:
    """Take internal snapshot NAME of a stopped VM worker's qcow2 IMAGE (qemu-img)."""
    with _refused():
        ck.vm_snapshot(data_root(), project, image, name)
    console.print(f"snapshot {name} of {image}")


@app.command("vm-list")
def vm_list(image: Path) -> None:
    """The internal snapshots of qcow2 IMAGE."""
    with _refused():
        names = ck.vm_snapshots(image)
    for name in names:
        console.print(name)


@app.command("vm-revert")
def vm_revert(image: Path, name: str) -> None:
    """Return a stopped VM worker's qcow2 IMAGE to snapshot NAME."""
    with _refused():
        ck.vm_revert(image, name)
    console.print(f"{image} reverted to {name}")


@app.command("vm-save")
def vm_save(
    domain: str,
    name: str,
    project: Annotated[str, typer.Option(help="Project the VM worker belongs to.")],
) -> None:
    """Snapshot NAME of a running VM worker (libvirt DOMAIN): disk and memory, in its qcow2."""
    with _refused():
        record = ck.vm_save(data_root(), project, domain, name)
    console.print(f"snapshot {name} of {domain} ({record['image']})")


@app.command("vm-restore")
def vm_restore(domain: str, name: str) -> None:
    """Return VM worker DOMAIN to snapshot NAME (disk and memory), running as it was."""
    with _refused():
        ck.vm_restore(domain, name)
    console.print(f"{domain} restored to {name}")
