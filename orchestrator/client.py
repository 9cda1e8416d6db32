"""A small client of the control API, used by the CLI, the demo and the benchmarks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx

from contracts.dataroot import DataRoot
from contracts.settings import Settings


class ApiError(Exception):
    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}")

    def problems(self) -> list[str]:
        """One line per problem: a 422's `field.path: message`, else `HTTP status: detail`."""
        if isinstance(self.detail, list):
            return [
                f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                if isinstance(e, dict) and "loc" in e
                else str(e)
                for e in self.detail
            ]
        return [f"HTTP {self.status}: {self.detail}"]


class Client:
    def __init__(self, settings: Settings, token: str | None = None):
        token = token or os.environ.get("AUTOVIBE_TOKEN")
        if token is None:
            path = DataRoot.at(settings.data).operator_token
            if not path.exists():
                raise ApiError(0, f"no operator token at {path}: start the API (`autovibe up`)")
            token = path.read_text().strip()
        self.http = httpx.Client(
            base_url=settings.api_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30, read=None),
            trust_env=False,
        )

    @classmethod
    def over(cls, http: httpx.Client) -> Client:
        """A client speaking through `http`, already pointed at the API with its token."""
        client = cls.__new__(cls)
        client.http = http
        return client

    def _json(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ApiError(resp.status_code, detail)
        return resp.json()

    def submit(self, config: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.http.post("/v1/trials", json=config))

    def concierge(self, request: str) -> dict[str, Any]:
        """A draft trial for `request` in plain language, with its problems; not submitted."""
        return self._json(self.http.post("/v1/concierge", json={"request": request}))

    def trials(self) -> list[dict[str, Any]]:
        return self._json(self.http.get("/v1/trials"))

    def trial(self, trial_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/trials/{trial_id}"))

    def report(self, trial_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/trials/{trial_id}/report"))

    def cancel(self, trial_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/trials/{trial_id}/cancel"))

    def events(
        self, trial_id: str, reconnect_s: float = 60.0
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event kind, data) from the trial's SSE stream until the trial ends.

        A stream cut by an API restart is resumed from the last event seen (`Last-Event-ID`),
        for up to `reconnect_s` of failed attempts, so no event is lost or seen twice.
        """
        final = {"trial_finished", "trial_cancelled"}
        last, deadline = "", None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self.http.stream(
                    "GET", f"/v1/trials/{trial_id}/events", headers=headers
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        self._json(resp)
                    deadline = None
                    kind, data, event_id = "message", "", ""
                    for line in resp.iter_lines():
                        if line.startswith("id:"):
                            event_id = line.removeprefix("id:").strip()
                        elif line.startswith("event:"):
                            kind = line.removeprefix("event:").strip()
                        elif line.startswith("data:"):
                            data += line.removeprefix("data:").strip()
                        elif not line and data:
                            last = event_id or last
                            yield kind, json.loads(data)
                            if kind in final:
                                return
                            kind, data = "message", ""
                return
            except httpx.TransportError:
                deadline = deadline or time.monotonic() + reconnect_s
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
