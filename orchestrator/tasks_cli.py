"""`autovibe tasks`: import benchmark task sets into the data root, validate and list them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from contracts.config import ConfigError
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from contracts.tasksets import TaskVerdict
from orchestrator import harborimport, taskimport, taskvalidate
from orchestrator.tasksets import DEFAULT_TEST_COMMAND
from orchestrator.taskstore import TaskSetError, TaskStore
from workers import swebench_logs

app = typer.Typer(help="Task sets: import, validate, list.", no_args_is_help=True)
import_app = typer.Typer(help="Import a benchmark into a task set.", no_args_is_help=True)
app.add_typer(import_app, name="import")
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


@import_app.command("swebench")
def import_swebench(
    file: Path,
    name: Annotated[
        str | None, typer.Option("--name", help="Set name (default: the file's stem).")
    ] = None,
    repos: Annotated[
        Path | None,
        typer.Option("--repos", help="Offline: folder of <owner>__<name> repositories."),
    ] = None,
    test_command: Annotated[
        str | None,
        typer.Option(
            help="Test command of instances with neither test_cmd nor eval_script (default: "
            f"{DEFAULT_TEST_COMMAND}, for repositories swebench reads with pytest's parser)."
        ),
    ] = None,
    timeout_s: Annotated[int, typer.Option(help="Each task's agent timeout.")] = 600,
    replace: Annotated[bool, typer.Option(help="Replace a set of that name.")] = False,
) -> None:
    """Import a SWE-bench dataset file (JSONL or JSON) as a task set under $AUTOVIBE_DATA/tasks/."""
    settings = Settings()
    context = {"task_roots": settings.allowed_task_roots, "parsers": swebench_logs.names()}
    started = time.monotonic()
    try:
        taskset = taskimport.import_swebench(
            file, DataRoot.at(settings.data), name=name, repos=repos, context=context,
            test_command=test_command, timeout_s=timeout_s, replace=replace,
        )  # fmt: skip
    except ConfigError as exc:
        raise _fail(f"{file} was not imported:\n{exc}", 2) from exc
    except TaskSetError as exc:
        raise _fail(str(exc), 2) from exc
    console.print(
        f"imported {len(taskset.entries)} tasks as set {taskset.name} in "
        f"{time.monotonic() - started:.1f} s; next: autovibe tasks validate {taskset.name}"
    )


@import_app.command("harbor")
def import_harbor(
    folder: Path,
    name: Annotated[
        str | None, typer.Option("--name", help="Set name (default: the folder's name).")
    ] = None,
    replace: Annotated[bool, typer.Option(help="Replace a set of that name.")] = False,
) -> None:
    """Import a Harbor (Terminal-Bench) task folder, or a folder of them, as a task set."""
    settings = Settings()
    started = time.monotonic()
    try:
        imported = harborimport.import_harbor(
            folder, DataRoot.at(settings.data), name=name, replace=replace
        )
    except ConfigError as exc:
        raise _fail(f"{folder} was not imported:\n{exc}", 2) from exc
    except TaskSetError as exc:
        raise _fail(str(exc), 2) from exc
    for note in imported.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    taskset = imported.taskset
    console.print(
        f"imported {len(taskset.entries)} tasks as set {taskset.name} in "
        f"{time.monotonic() - started:.1f} s; next: autovibe tasks validate {taskset.name}"
    )


@app.command("validate")
def validate(
    name: str,
    jobs: Annotated[int, typer.Option(help="Tasks validated at once.")] = 2,
    unsandboxed: Annotated[
        bool, typer.Option(help="Run without bubblewrap (needs AUTOVIBE_ALLOW_UNSANDBOXED=1).")
    ] = False,
) -> None:
    """Run the oracle (gold patch, or solution/solve.sh) and the empty agent on every task of
    a set; a task is valid when the oracle resolves it and the empty agent does not. Exit 1
    when any is invalid."""
    settings = Settings()
    if unsandboxed and not settings.allow_unsandboxed:
        raise _fail("--unsandboxed needs AUTOVIBE_ALLOW_UNSANDBOXED=1 on this machine", 2)
    started = time.monotonic()

    def show(verdict: TaskVerdict) -> None:
        mark = "[green]valid[/green]" if verdict.valid else "[red]invalid[/red]"
        why = f": {escape(verdict.reason)}" if verdict.reason else ""
        console.print(f"{verdict.task:40} {mark} ({verdict.wall_s:.1f} s){why}")

    try:
        result = taskvalidate.validate(
            name, settings, jobs=jobs, sandboxed=not unsandboxed, progress=show
        )
    except TaskSetError as exc:
        raise _fail(str(exc), 2) from exc
    invalid = result.invalid()
    console.print(
        f"{len(result.verdicts) - len(invalid)} of {len(result.verdicts)} tasks valid in "
        f"{time.monotonic() - started:.1f} s; invalid tasks are left out of trials"
    )
    if invalid:
        raise typer.Exit(1)


@app.command("ls")
def ls() -> None:
    """The imported task sets, with how many tasks are valid."""
    store = TaskStore(DataRoot.at(Settings().data))
    for set_name in store.names():
        taskset = store.load(set_name)
        validation = store.validation(set_name)
        state = (
            "not validated"
            if validation is None
            else f"{len(validation.verdicts) - len(validation.invalid())} valid"
        )
        console.print(f"{set_name:32} {len(taskset.entries):5} tasks  {state}")
