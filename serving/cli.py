"""`autovibe models …`: check the weights of the model pairs, render the serving configs, serve."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.table import Table

from common.cli import err, fail
from common.processes import stop
from contracts.config import ConfigError, ModelsCatalog, load_models
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from serving import check as check_mod
from serving import rayserve, rayserve_cpu
from serving.llamacpp import server_argv, server_config
from serving.probe import ProbeFailed, cpu_served_names, prove
from serving.weights import WeightsMissing

app = typer.Typer(help="Model pairs: weights on disk, memory needed, serving configs.")
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for weight paths
    console = Console(width=180)


def _catalog(settings: Settings) -> ModelsCatalog:
    try:
        return load_models(settings.configs)
    except ConfigError as exc:
        raise fail(str(exc), 2) from exc


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _table(reports: list[check_mod.PairCheck]) -> Table:
    table = Table(title="Model pairs", title_justify="left")
    for col in ("pair", "model", "state", "on disk", "weights", "KV @ context", "per GPU"):
        table.add_column(col, justify="right" if col not in ("pair", "model", "state") else "left")
    table.add_column("detail", overflow="fold")
    colour = {"complete": "green", "placeable": "cyan"}
    for r in reports:
        for m in r.models:
            mem = m.memory
            table.add_row(
                r.pair,
                m.served_name,
                f"[{colour.get(m.state, 'red')}]{m.state}[/]",
                decimal(m.size),
                _gib(mem.weights) if mem else "?",
                f"{_gib(mem.kv)} @ {mem.context}" if mem else "?",
                f"{_gib(mem.per_gpu)} x{mem.tensor_parallel}" if mem and r.device == "gpu" else "—",
                m.detail,
            )
        need = _gib(r.memory_total)
        where = f"{r.gpus} GPU(s)" if r.device == "gpu" else "CPU RAM"
        table.add_row(
            r.pair,
            "[b]pair[/b]",
            "ready" if r.ready else "[red]not ready[/]",
            "",
            "",
            "",
            "",
            f"needs {need} on {where}",
        )
        table.add_section()
    return table


@app.command("check")
def check(
    pair: Annotated[
        list[str] | None,
        typer.Option("--pair", help="Only this pair (repeatable); fail if not ready."),
    ] = None,
    hashes: Annotated[
        bool, typer.Option("--hashes/--no-hashes", help="Verify SHA-256 where known.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per pair: are the weights present and whole, and how much memory does the pair need."""
    settings = Settings()
    catalog = _catalog(settings)
    root = DataRoot.at(settings.data)
    try:
        reports = check_mod.check_pairs(root, catalog, pair, hashes=hashes)
    except check_mod.UnknownPair as exc:
        raise fail(str(exc.args[0]), 2) from exc
    if as_json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        console.print(_table(reports))
        console.print(f"{check_mod.KV_FORMULA}\n{check_mod.MEMORY_FORMULA}", highlight=False)
    if pair:
        broken = [r for r in reports if not r.ready]
        if broken:
            lines = [
                f"pair {r.pair}: {m.served_name} is {m.state}: {m.detail}"
                for r in broken
                for m in r.models
                if m.state not in check_mod.READY
            ]
            raise fail(
                "weights not ready (nothing is downloaded at run time):\n" + "\n".join(lines)
            )


@app.command("render")
def render(
    dest: Annotated[Path, typer.Argument(help="File, or folder to write serve-<profile> into.")],
    profile: Annotated[
        str, typer.Option(help="gpu (Ray Serve + vLLM) or cpu (llama.cpp).")
    ] = "gpu",
    pair: Annotated[
        list[str] | None, typer.Option("--pair", help="Only this pair (repeatable); GPU profile.")
    ] = None,
    accelerator: Annotated[
        str | None, typer.Option(help="Ray accelerator type for every model (H100, A100, L4…).")
    ] = None,
) -> None:
    """Write the serving config: a Ray Serve app (gpu) or llama.cpp's server config (cpu)."""
    if profile not in ("gpu", "cpu"):
        raise fail(f"--profile {profile!r}: allowed: gpu, cpu", 2)
    settings = Settings()
    catalog = _catalog(settings)
    root = DataRoot.at(settings.data)
    if profile == "gpu":
        try:
            config = rayserve.gpu_app(
                root,
                catalog,
                pairs=pair,
                host=settings.host,
                port=settings.model_port,
                accelerator_type=accelerator,
            )
        except rayserve.RenderError as exc:
            raise fail(str(exc), 2) from exc
        path = rayserve.write(config, dest)
    else:
        try:
            cpu = server_config(settings, catalog)
        except WeightsMissing as exc:
            raise fail(str(exc)) from exc
        path = dest / "llamacpp-server.json" if dest.is_dir() else dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cpu, indent=2) + "\n")
    console.print(f"wrote {path}", highlight=False)


@app.command("serve")
def serve(
    profile: Annotated[
        str, typer.Option(help="cpu (llama.cpp replicas behind Ray Serve); gpu: see render.")
    ] = "cpu",
    replicas: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Ray Serve replicas, each its own llama.cpp server; 0 = the bare server. "
            "Default: AUTOVIBE_MODEL_REPLICAS, else 1.",
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Default: AUTOVIBE_MODEL_PORT.")] = None,
) -> None:
    """Serve the CPU pairs in the foreground until SIGTERM / Ctrl-C (what `autovibe up` runs)."""
    if profile == "gpu":
        raise fail(
            "the GPU profile is served by Ray's own CLI: `autovibe models render --profile gpu "
            "DEST`, then `serve run DEST/serve-gpu.yaml` on the GPU cluster",
            2,
        )
    if profile != "cpu":
        raise fail(f"--profile {profile!r}: allowed: cpu, gpu", 2)
    settings = Settings()
    if port is not None:
        settings = settings.model_copy(update={"model_port": port})
    count = replicas if replicas is not None else max(1, settings.model_replicas)
    if count == 0:
        catalog = _catalog(settings)
        try:
            argv = server_argv(settings, catalog)
        except WeightsMissing as exc:
            raise fail(str(exc)) from exc
        raise typer.Exit(_serve_bare(argv, settings.model_url, cpu_served_names(catalog)))
    rayserve_cpu.main(["--replicas", str(count), "--port", str(settings.model_port)])


def _serve_bare(argv: list[str], url: str, models: list[str], timeout_s: float = 180) -> int:
    """Run the bare server, say `serving` once every model completed a token, then pass
    SIGTERM/SIGINT on until it exits; its exit status (1 when it never proved itself)."""
    server = subprocess.Popen(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: server.send_signal(signum))
    deadline = time.monotonic() + timeout_s
    while not _answers(f"{url}/models"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            err.print(f"[red]error:[/red] the model server did not start (exit {server.poll()})")
            return 1
        time.sleep(0.2)
    try:
        prove(url, models)
    except ProbeFailed as exc:
        stop(server)
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 1
    console.print(f"serving {url}: {', '.join(models)} each completed a token", highlight=False)
    return server.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    app()
