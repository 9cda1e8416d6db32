"""The `autovibe` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import TypeAdapter
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from contracts.config import ConfigError, TrialConfig, load_trial
from contracts.dataroot import DataRoot
from contracts.reports import TrialReport
from contracts.settings import Settings
from ledger.cli import app as ledger_app
from ledger.cli import payments_app
from orchestrator import report as report_mod
from orchestrator import stack, tasksets
from orchestrator import top as top_cmd
from orchestrator.catalog import Catalog
from orchestrator.client import ApiError, Client
from orchestrator.dashboards_cli import app as dashboards_app
from orchestrator.intake.cli import app as intake_app
from orchestrator.intake.cli import ask
from orchestrator.models_cli import ls as models_ls
from orchestrator.tasks_cli import app as tasks_app
from orchestrator.tokens_cli import app as tokens_app
from retention import backup_cli
from retention.checkpoints_cli import app as checkpoints_app
from retention.cli import app as retention_app
from secretstore.cli import app as secrets_app
from serving.cli import app as models_app
from traffic.cli import app as traffic_app
from workers.agents_cli import app as agents_app
from workers.operator_cli import app as worker_app
from workers.vm_cli import app as vm_app

app = typer.Typer(
    help="autovibe: run coding agents unattended, accounted to the cent.", no_args_is_help=True
)
trial_app = typer.Typer(help="Submit, follow and report trials.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration files and their schema.", no_args_is_help=True)
app.add_typer(trial_app, name="trial")
app.add_typer(config_app, name="config")
app.add_typer(agents_app, name="agents")
app.add_typer(secrets_app, name="secrets")
app.add_typer(models_app, name="models")
models_app.command("ls")(models_ls)
app.add_typer(retention_app, name="retention")
app.add_typer(checkpoints_app, name="checkpoints")
app.command("backup")(backup_cli.backup)
app.command("restore")(backup_cli.restore)
app.command("top")(top_cmd.top)
app.add_typer(tokens_app, name="tokens")
app.add_typer(worker_app, name="worker")
app.add_typer(vm_app, name="vm")
app.add_typer(ledger_app, name="ledger")
app.add_typer(traffic_app, name="traffic")
app.add_typer(payments_app, name="payments")
app.add_typer(dashboards_app, name="dashboards")
app.add_typer(tasks_app, name="tasks")
app.add_typer(intake_app, name="intake")
app.command("ask")(ask)

console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for the report table
    console = Console(width=160)
# soft_wrap: a path in an error is printed whole, to be copied, never broken across lines.
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _client(settings: Settings) -> Client:
    try:
        return Client(settings)
    except ApiError as exc:
        raise _fail(str(exc.detail)) from exc


# -- stack -----------------------------------------------------------------------------------


@app.command()
def up(
    only: Annotated[
        list[str] | None, typer.Option(help="Start only these: model, indexer, proxy, api.")
    ] = None,
) -> None:
    """Start the model server, the proxy and the control API in the background."""
    settings = Settings()
    try:
        stack.up(settings, only)
    except stack.StackError as exc:
        raise _fail(str(exc)) from exc
    root = DataRoot.at(settings.data)
    console.print(
        f"up: API {settings.api_url} · proxy {settings.proxy_url} · "
        f"model server {settings.model_url} · data root {root.root}"
    )
    token_log = root.run / "api.log"
    if token_log.exists() and "operator token created" in token_log.read_text():
        console.print(f"operator token: {root.operator_token}")


@app.command()
def down() -> None:
    """Stop what `autovibe up` started."""
    stopped = stack.down(Settings())
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status() -> None:
    """Which services run, with their pids."""
    for name, pid in stack.status(Settings()).items():
        console.print(f"{name:6} {'running (pid ' + str(pid) + ')' if pid else 'stopped'}")


# -- trials ----------------------------------------------------------------------------------


@trial_app.command("submit")
def submit(
    file: Path,
    watch_: Annotated[bool, typer.Option("--watch/--no-watch", help="Follow it.")] = False,
) -> None:
    """Validate a trial file and submit it; prints the trial id."""
    settings = Settings()
    try:
        config = load_trial(file, Catalog.load(settings).validation_context())
    except ConfigError as exc:
        raise _fail(f"{file} is not a valid trial:\n{exc}", 2) from exc
    except FileNotFoundError as exc:
        raise _fail(f"{file}: no such file", 2) from exc
    client = _client(settings)
    try:
        created = client.submit(config.model_dump(mode="json"))
    except ApiError as exc:
        raise _fail(_api_problem(exc), 2 if exc.status in (409, 422) else 1) from exc
    console.print(f"submitted trial {created['name']}: id {created['id']}")
    if watch_:
        _watch(client, created["id"])
        _fail_on_infra_errors(TrialReport.model_validate(client.report(created["id"])))


def _api_problem(exc: ApiError) -> str:
    return "\n".join(exc.problems())


@trial_app.command("list")
def list_trials() -> None:
    """Every trial, newest first."""
    for t in _client(Settings()).trials():
        console.print(f"{t['id']}  {t['status']:10} {t['name']}  ({t['project']})")


@trial_app.command("show")
def show(trial_id: str) -> None:
    """A trial's assignments, their states and the spend so far, as JSON."""
    console.print_json(json.dumps(_client(Settings()).trial(trial_id)))


@trial_app.command("watch")
def watch(trial_id: str) -> None:
    """Follow a trial live until it ends."""
    _watch(_client(Settings()), trial_id)


ENDINGS = ("assignment_finished", "assignment_failed", "assignment_cancelled")
"""Events that end an assignment; `assignment_requeued`, `_retried` and `_deferred` do not."""


def _watch(client: Client, trial_id: str) -> None:
    """Follow a trial to its end; each assignment counts once, however often its ending is
    seen (the stream is replayed from the start, and resumed after an API restart)."""
    trial = client.trial(trial_id)
    total = len(trial["assignments"])
    ended = {
        a["id"] for a in trial["assignments"] if a["state"] in ("finished", "failed", "cancelled")
    }
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(f"trial {trial['name']}", total=total, completed=len(ended))
        if trial["status"] in ("finished", "cancelled"):
            return
        for kind, data in client.events(trial_id):
            assignment = data.get("assignment")
            if kind == "assignment_started":
                progress.console.print(
                    f"  ▶ {assignment} {data['task']} · {data['agent']} · "
                    f"{data['model']} on {data['machine']} (attempt {data.get('attempt', 1)})"
                )
            elif kind in ENDINGS:
                if assignment in ended:
                    continue
                ended.add(assignment)
                progress.update(bar, completed=len(ended))
                detail = f": {data['detail']}" if data.get("detail") else ""
                progress.console.print(
                    f"  ■ {assignment} {data.get('status') or kind.split('_')[1]} "
                    f"({data.get('exit_cause')}) cost {data.get('cost', '?')} "
                    f"{data.get('currency', '')}{detail}",
                    markup=False,
                )
            elif kind == "assignment_retried":
                progress.console.print(
                    f"  ↻ {assignment} run again after {data.get('cause')}: {data.get('detail')}",
                    markup=False,
                )
            elif kind in ("assignment_requeued", "assignment_deferred"):
                progress.console.print(f"  ↻ {assignment} {kind.split('_')[1]}")
            elif kind in ("model_server_restarted", "model_server_down"):
                progress.console.print(
                    f"  ⚠ model server {data.get('detail')}", style="yellow", markup=False
                )


def _fail_on_infra_errors(report: TrialReport) -> None:
    """Exit non-zero when the platform failed any assignment: a green run must mean it ran."""
    errors = report.infra_errors
    if errors:
        raise _fail(
            f"{len(errors)} assignment(s) ended in infra_error: the platform, not the agent, "
            "failed them:\n"
            + "\n".join(f"  {e.assignment}: {e.cause}: {e.detail}" for e in errors),
            1,
        )


@trial_app.command("report")
def report(
    trial_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the report files into this folder.")
    ] = None,
    formats: Annotated[
        str, typer.Option("--format", help="With --out: comma-separated json, csv, md, png.")
    ] = ",".join(report_mod.FORMATS),
    curve: Annotated[
        bool,
        typer.Option("--curve", help="With --out: add the learning curve of the trial's project."),
    ] = False,
) -> None:
    """Per agent × model pair: success with its 95 % interval, cost per resolved task, time,
    error causes, and whether differences between agents and pairs are significant."""
    client = _client(Settings())
    data = TrialReport.model_validate(client.report(trial_id))
    if as_json:
        sys.stdout.write(json.dumps(data.to_json(), indent=2) + "\n")
    else:
        report_mod.render(data, console)
    if out is None:
        return
    learning = None
    if curve:
        reports = [
            TrialReport.model_validate(client.report(t["id"]))
            for t in client.trials()
            if t["project"] == data.project
        ]
        learning = report_mod.curve_from_reports(reports, data.project)
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    try:
        written = report_mod.write_outputs(data, out, wanted, curve=learning)
    except ValueError as exc:
        raise _fail(str(exc), 2) from exc
    for path in (p for paths in written.values() for p in paths):
        err.print(f"wrote {path}", highlight=False)


@trial_app.command("cancel")
def cancel(trial_id: str) -> None:
    """Stop a trial: running assignments are killed, queued ones never start."""
    t = _client(Settings()).cancel(trial_id)
    console.print(f"trial {t['name']} is {t['status']}")


@trial_app.command("export")
def export(
    trial_id: str,
    out: Annotated[Path, typer.Option("--out", help="Folder for <assignment>.patch files.")],
    branch: Annotated[
        str | None,
        typer.Option(help="Also commit each result on a branch <NAME>/<assignment> (--repo)."),
    ] = None,
    repo: Annotated[
        Path | None, typer.Option(help="Repository the branches are made in (with --branch).")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Results flagged for review too, not only accepted.")
    ] = False,
) -> None:
    """Export a trial's accepted results as patches (and git branches); reads the state DB and
    the worker artifacts of this data root."""
    from orchestrator import export as export_mod
    from orchestrator.state import Store, state_url

    if (branch is None) != (repo is None):
        raise _fail("--branch and --repo go together", 2)
    try:
        settings = Settings()
        done = export_mod.export_trial(
            Store(state_url(settings)),
            DataRoot.at(settings.data),
            trial_id,
            out,
            branch=branch,
            repo=repo,
            include_review=all_,
        )
    except LookupError as exc:
        raise _fail(str(exc), 2) from exc
    for e in done:
        console.print(f"{e.assignment} {e.task}: {e.outcome} {e.detail}", highlight=False)
    if not done:
        console.print("nothing to export (no accepted results; --all adds those under review)")
    if any(e.outcome == "skipped" for e in done):
        raise typer.Exit(1)


# -- config and agents -----------------------------------------------------------------------


@config_app.command("schema")
def schema(
    check: Annotated[bool, typer.Option(help="Fail if the committed schema is stale.")] = False,
) -> None:
    """Write configs/trial.schema.json from the TrialConfig model."""
    path = Settings().configs / "trial.schema.json"
    text = json.dumps(TypeAdapter(TrialConfig).json_schema(), indent=2) + "\n"
    if check:
        if not path.exists() or path.read_text() != text:
            raise _fail(f"{path} is stale: run `autovibe config schema`")
        console.print(f"{path} is up to date")
        return
    path.write_text(text)
    console.print(f"wrote {path}")


@config_app.command("swebench")
def swebench_tasks(
    file: Path,
    repos: Annotated[
        Path, typer.Option("--repos", help="Folder holding <owner>__<name> repositories.")
    ],
    test_command: Annotated[
        str, typer.Option(help="Test command run in each workspace.")
    ] = tasksets.DEFAULT_TEST_COMMAND,
    at_head: Annotated[
        bool,
        typer.Option(
            "--at-head", help="Use each repository as it is, not checked out at base_commit."
        ),
    ] = False,
) -> None:
    """Check a SWE-bench task set (JSON/JSONL, repos on disk) and print its `tasks:` as YAML."""
    try:
        instances = tasksets.load_swebench(file, repos, test_command=test_command, at_head=at_head)
    except ConfigError as exc:
        raise _fail(f"{file} is not a usable task set:\n{exc}", 2) from exc
    stale = [i.instance_id for i in instances if not i.at_base_commit]
    if stale:
        err.print(
            f"[yellow]warning:[/yellow] with --at-head the workspace copies the working tree, "
            "which is not at "
            f"base_commit for: {', '.join(stale)}",
            highlight=False,
        )
    tasks = [i.task.model_dump(mode="json", exclude_defaults=True) for i in instances]
    sys.stdout.write(yaml.safe_dump({"tasks": tasks}, sort_keys=False, allow_unicode=True))


@config_app.command("check")
def check_trial(file: Path) -> None:
    """Validate a trial file without submitting it."""
    try:
        config = load_trial(file, Catalog.load(Settings()).validation_context())
    except ConfigError as exc:
        raise _fail(f"{file} is not a valid trial:\n{exc}", 2) from exc
    console.print(
        f"{file}: valid ({len(config.tasks)} tasks, agents {', '.join(config.agents)}, "
        f"pairs {', '.join(config.model_pairs)})"
    )


# -- demo ------------------------------------------------------------------------------------


@app.command()
def demo(
    file: Annotated[Path, typer.Option(help="Trial file.")] = Path("configs/trials/demo.yaml"),
) -> None:
    """Start the stack, run the demo trial through the API, watch it and print the report."""
    import time

    settings = Settings()
    root = DataRoot.at(settings.data)
    console.print("[bold]autovibe demo[/bold]: starting model server, proxy and API …")
    started = time.monotonic()
    up()
    try:
        config = load_trial(file, Catalog.load(settings).validation_context())
    except ConfigError as exc:
        raise _fail(str(exc), 2) from exc
    client = _client(settings)
    payload = config.model_dump(mode="json")
    payload["name"] = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    created = client.submit(payload)
    console.print(
        f"submitted trial {created['name']} (id {created['id']}) through "
        f"POST {settings.api_url}/v1/trials"
    )
    _watch(client, created["id"])
    trial_report = TrialReport.model_validate(client.report(created["id"]))
    report_mod.render(trial_report, console)
    console.print(f"\nwall time {time.monotonic() - started:.1f} s")
    console.print(f"ledger        {root.ledger(config.project)}")
    console.print(f"traffic logs  {root.traffic_logs / config.project}")
    console.print(
        f"artifacts     {root.root / 'worker-artifacts' / config.project / created['id']}"
    )
    console.print(f"API           {settings.api_url}/docs (token in {root.operator_token})")
    console.print("stop the stack with `autovibe down`")
    _fail_on_infra_errors(trial_report)
