"""Demo-trial wall time, and what the proxy adds to one LLM call (direct vs through autovibe).

Starts its own stack (model server, proxy, API) on free ports with a fresh data root, so it
never touches a running `make demo`. Medians over interleaved requests; the machine is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench.report import publish
from budget import open_ample
from contracts.credentials import MachineIdentity, load_or_create_key, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from orchestrator import stack
from orchestrator.client import Client

ROOT = Path(__file__).resolve().parent.parent


def per_call(settings: Settings, n: int) -> list[dict[str, object]]:
    """Same small completion, direct and through the proxy, interleaved."""
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, "bench", ["m1"], currency="CAD")
    token = mint(key, MachineIdentity("bench", "bench", "bench-000", "m1", time.time() + 3600))
    proxied = httpx.Client(
        proxy=proxy_url(settings.host, settings.proxy_port, "m1", token),
        timeout=60,
        trust_env=False,
    )
    direct = httpx.Client(timeout=60, trust_env=False)
    body = {
        "model": "tiny",
        "prompt": "def add(a, b):\n    return",
        "max_tokens": 4,
        "temperature": 0,
    }
    url = f"{settings.model_url}/completions"
    times: dict[str, list[float]] = {"direct": [], "autovibe": []}
    for client in (direct, proxied):  # warm both paths once
        client.post(url, json=body).raise_for_status()
    for _ in range(n):
        for name, client in (("direct", direct), ("autovibe", proxied)):
            t0 = time.perf_counter()
            client.post(url, json=body).raise_for_status()
            times[name].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(times["direct"])
    rows: list[dict[str, object]] = []
    for name, values in times.items():
        p50 = statistics.median(values)
        rows.append(
            {
                "system": name,
                "what": "one LLM call (4 tokens)",
                "n": n,
                "p50_ms": round(p50, 2),
                "p90_ms": round(statistics.quantiles(values, n=10)[-1], 2),
                "added_p50_ms": round(p50 - base, 2),
                "ratio": round(p50 / base, 3),
            }
        )
    return rows


def trial(settings: Settings, per_task: int) -> dict[str, object]:
    data = yaml.safe_load((ROOT / "configs/trials/demo.yaml").read_text())
    for task in data["tasks"]:
        task["repo"] = str((ROOT / "configs/trials" / task["repo"]).resolve())
    data["name"] = f"bench-{int(time.time())}"
    data["assignment"]["trials_per_task"] = per_task
    client = Client(settings)
    t0 = time.perf_counter()
    trial_id = client.submit(data)["id"]
    for _ in client.events(trial_id):
        pass
    wall = time.perf_counter() - t0
    report = client.report(trial_id)
    row = report["rows"][0]
    return {
        "system": "autovibe",
        "what": f"demo trial ({row['assignments']} assignments, 2 machines)",
        "wall_s": round(wall, 1),
        "resolved": row["resolved"],
        "llm_calls": row["llm_calls"],
        "tokens": row["tokens"],
        "cost_cad": row["cost"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls, one run per task")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="autovibe-bench-") as tmp:
        settings = Settings(
            data=Path(tmp),
            configs=ROOT / "configs",
            api_port=free_port(),
            proxy_port=free_port(),
            model_port=free_port(),
        )
        stack.up(settings)
        try:
            rows = per_call(settings, 10 if args.quick else 40)
            rows.append(trial(settings, 1 if args.quick else 2))
        finally:
            stack.down(settings)
    command = "python -m bench.demo" + (" --quick" if args.quick else "")
    publish(
        "demo",
        command,
        rows,
        notes=(
            "`direct` posts to the llama.cpp server; `autovibe` sends the same request through "
            "the metering proxy (machine credential check, pricing, spool write). `added_p50_ms` "
            "is the proxy's median overhead per LLM call. The trial row is the demo trial "
            "end to end "
            "through the control API (submit → all assignments graded), warm model weights."
        ),
    )
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
