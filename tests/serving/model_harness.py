"""One way for tests to start the deterministic model server (`serving.deterministic`): as
`autovibe up` starts it with `model_server: deterministic`, on the settings' model port."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from common.processes import stop
from contracts.config import load_models
from contracts.settings import Settings
from proxy.launch import wait_ready
from serving.launch import server_argv


@contextmanager
def deterministic_server(
    settings: Settings, outputs: Sequence[str] = (), log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """The server answering for the catalogue's CPU models on `settings.model_port` with
    `outputs` (in order, the last repeated; none: its default), until the block ends."""
    argv = server_argv(
        settings.model_copy(update={"model_server": "deterministic"}), load_models(settings.configs)
    )
    for output in outputs:
        argv += ["--output", output]
    log_path = log or settings.data / "deterministic-model.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_ready(settings.host, settings.model_port, timeout=30, process=process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}: {log_path.read_text()[-2000:]}") from exc
        yield process
    finally:
        stop(process)
