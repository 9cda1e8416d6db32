"""`autovibe ledger …` and `autovibe payments …`: reconcile, P&L, Fava, revenue, approvals."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from contracts.config import load_prices
from contracts.dataroot import DataRoot
from contracts.secrets import SecretStoreError
from contracts.settings import Settings

# The ledger modules load beancount and the traffic stores: each command imports what it uses,
# so that `autovibe --help` and the other planes' commands do not pay for them.
if TYPE_CHECKING:
    from budget import CounterStore
    from ledger.book import Ledger
    from ledger.payments import Broker
    from ledger.pnl import Row
    from ledger.reconcile import Line, PaymentLine

app = typer.Typer(
    help="The project ledgers: reconcile, profit and loss, Fava.", no_args_is_help=True
)
revenue_app = typer.Typer(help="Record income.", no_args_is_help=True)
app.add_typer(revenue_app, name="revenue")
payments_app = typer.Typer(help="Payments agents asked for.", no_args_is_help=True)


console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _root(settings: Settings) -> DataRoot:
    return DataRoot.at(settings.data)


def _ledger(root: DataRoot, project: str) -> Ledger:
    from ledger.book import Ledger

    ledger = Ledger.of(root, project)
    if not ledger.path.exists():
        raise _fail(f"no ledger for project {project!r} at {ledger.path}")
    return ledger


@app.command("reconcile")
def reconcile_cmd(project: str) -> None:
    """Prove the ledger equals metered usage to the cent, and its payments the attempt log;
    exit 1 on any difference."""
    from ledger.book import LedgerError
    from ledger.payments import TRANSACTIONS_FILE, TransactionLog
    from ledger.reconcile import reconcile
    from traffic.stores import metered_flows_for

    settings = Settings()
    root = _root(settings)
    ledger = _ledger(root, project)
    DataRoot.ensure(root.traffic_logs)
    attempts = TransactionLog(root.financial(project) / TRANSACTIONS_FILE).entries()
    with contextlib.closing(metered_flows_for(settings)) as index:
        index.catch_up(root.traffic_logs)
        try:
            result = reconcile(ledger, index, project, attempts)
        except LedgerError as exc:
            raise _fail(str(exc)) from exc
    lines: list[Line | PaymentLine] = [*result.lines, *result.payments]
    for line in lines:
        mark = "[green]ok[/green]  " if line.kind == "match" else "[red]DIFF[/red]"
        console.print(f"{mark} {line.describe(result.currency)}", highlight=False)
    if not result.ok:
        raise _fail(f"{len(result.mismatches)} difference(s) in {project}'s ledger")
    console.print(
        f"{project}: {len(result.lines)} assignment(s), ledger = metered usage; "
        f"{len(result.payments)} payment(s), ledger = attempt log"
    )


@app.command()
def post(project: Annotated[str | None, typer.Argument()] = None) -> None:
    """Post metered usage not yet in the ledger, every hour up to now (all projects by default)."""
    from ledger.book import Ledger, LedgerError
    from ledger.posting import agents_from_artifacts, post_usage
    from traffic.stores import metered_flows_for

    settings = Settings()
    root = _root(settings)
    if project is not None:
        projects = [project]
        _ledger(root, project)
    else:
        projects = sorted(
            p.parent.name for p in (root.root / "financial").glob("*/ledger.beancount")
        )
    DataRoot.ensure(root.traffic_logs)
    with contextlib.closing(metered_flows_for(settings)) as index:
        index.catch_up(root.traffic_logs)
        for name in projects:
            try:
                done = post_usage(
                    Ledger.of(root, name), index, name, agent_of=agents_from_artifacts(root, name)
                )
            except LedgerError as exc:
                raise _fail(str(exc)) from exc
            console.print(
                f"{name}: {done.transactions} transaction(s), {done.flows} flow(s), "
                f"{done.usd:f} USD posted"
            )


@app.command()
def pnl(project: Annotated[str | None, typer.Argument()] = None) -> None:
    """Profit and loss per project, machine and agent."""
    from ledger.book import Ledger, LedgerError, ledger_projects
    from ledger.pnl import profit_and_loss

    root = _root(Settings())
    if project is not None:
        ledgers = [(project, _ledger(root, project))]
    else:
        ledgers = [(name, Ledger.of(root, name)) for name in ledger_projects(root)]
    try:
        report = profit_and_loss(ledgers)
    except LedgerError as exc:
        raise _fail(str(exc)) from exc
    console.print(_table("Projects", "project", {(r.project, ""): r for r in report.by_project}))
    console.print(_table("Machines", "machine", report.by_machine))
    console.print(_table("Agents", "agent", report.by_agent))


def _table(title: str, what: str, rows: dict[tuple[str, str], Row]) -> Table:
    table = Table(title=title)
    columns = ["project"] if what == "project" else ["project", what]
    for column in columns:
        table.add_column(column)
    for column in ("revenue", "expenses", "profit"):
        table.add_column(column, justify="right")
    table.add_column("currency")
    for (project, name), row in rows.items():
        cells = [project] if what == "project" else [project, name]
        money = [_money(v) for v in (row.revenue, row.expenses, row.profit)]
        table.add_row(*cells, *money, row.currency)
    return table


def _money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01')):f}"


def fava_command(ledger_path: Path, host: str, port: int) -> list[str]:
    """Fava on the ledger, read-only: every write goes through `Ledger` (atomic, validated)."""
    fava = Path(sys.executable).parent / "fava"
    return [str(fava), "--read-only", "--host", host, "--port", str(port), str(ledger_path)]


@app.command()
def ui(
    project: str,
    port: Annotated[int, typer.Option(help="Port Fava listens on.")] = 5000,
    host: Annotated[str, typer.Option(help="Address Fava binds to.")] = "127.0.0.1",
) -> None:
    """Serve the project's ledger with Fava (read-only) until interrupted."""
    ledger = _ledger(_root(Settings()), project)
    console.print(f"Fava on http://{host}:{port}/ for {ledger.path}")
    try:
        raise typer.Exit(subprocess.call(fava_command(ledger.path, host, port)))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@revenue_app.command("import")
def revenue_import(
    file: Path,
    project: Annotated[str, typer.Option(help="Project whose ledger records the income.")],
) -> None:
    """Record each row of a CSV (date,source,amount,currency[,description][,id]) as income."""
    from ledger.book import LedgerError
    from ledger.payments import PaymentError, read_revenue_csv, record_revenue

    settings = Settings()
    root = _root(settings)
    _ledger(root, project)
    fx = load_prices(settings.configs).fx
    try:
        events = read_revenue_csv(file)
        for event in events:
            revenue_id, posted = record_revenue(root, project, event, fx)
            state = "posted" if posted else "already posted"
            console.print(
                f"{revenue_id}: {event.amount:f} {event.currency} from {event.source}: {state}"
            )
    except (PaymentError, LedgerError, KeyError, OSError) as exc:
        raise _fail(str(exc)) from exc


def broker(settings: Settings) -> Broker:
    """The broker as the CLI runs it: same policy, counters, rates and secret store as the API."""
    from budget import open_counters
    from ledger.payments import PAYMENTS_FILE, Broker, PaymentPolicy
    from secretstore import store_from_env

    root = _root(settings)

    def counters() -> CounterStore:
        return open_counters(
            settings.budget_store, path=root.budget_counters, url=settings.budget_redis_url
        )

    return Broker(
        root,
        PaymentPolicy.load(settings.configs / PAYMENTS_FILE),
        counters=counters,
        fx=load_prices(settings.configs).fx,
        secrets=lambda: store_from_env(settings=settings),
    )


@payments_app.command()
def approve(payment_id: str) -> None:
    """Execute a payment that waits for operator approval."""
    from ledger.payments import PaymentError

    b = broker(Settings())
    try:
        project, _ = b.find(payment_id)
        entry = b.approve(project, payment_id)
    except PaymentError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"{payment_id}: {entry['status']} {entry.get('detail') or ''}", highlight=False)
    if entry["status"] != "completed":
        raise typer.Exit(1)


REVEAL_HELP = "Decrypt receipts and destinations (needs the field key, or Vault transit decrypt)."


@payments_app.command("ls")
def ls_payments(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    reveal: Annotated[bool, typer.Option("--reveal", help=REVEAL_HELP)] = False,
) -> None:
    """Every payment in its latest state, with the reason given and the free alternatives
    considered; receipts and destinations masked unless --reveal."""
    from ledger.payments import PaymentError

    try:
        entries = broker(Settings()).history(project=project, reveal=reveal)
    except (PaymentError, SecretStoreError) as exc:
        raise _fail(str(exc)) from exc
    for e in {e["id"]: e for e in entries}.values():  # the latest entry of each payment
        fee = f"  fee {e['fee']} {e['fee_currency']}" if e.get("fee") else ""
        free = "; ".join(e.get("free_alternatives_considered") or []) or "none stated"
        console.print(
            f"{e['id']}  {e['project']}  {e.get('machine') or '-'}  {e['status']}  "
            f"{e['amount']} {e['currency']}  {e['item']}  method={e.get('method')}{fee}  "
            f"pay_to={e.get('pay_to')}  receipt={e.get('receipt')}\n"
            f"    why: {e['justification']}  free alternatives: {free}",
            markup=False,  # "[encrypted]" is text, not a style
            highlight=False,
            soft_wrap=True,
        )


@payments_app.command()
def show(
    payment_id: str,
    reveal: Annotated[bool, typer.Option("--reveal", help=REVEAL_HELP)] = False,
) -> None:
    """Every recorded step of one payment as JSON; sensitive fields masked unless --reveal."""
    from ledger.payments import PaymentError

    try:
        entries = broker(Settings()).history(payment_id, reveal=reveal)
    except (PaymentError, SecretStoreError) as exc:
        raise _fail(str(exc)) from exc
    if not entries:
        raise _fail(f"no payment {payment_id!r}")
    sys.stdout.write(json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
