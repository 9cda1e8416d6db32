"""A stand-in for Vault's documented HTTP API (KV v2, transit, AppRole login), for contract tests.

Vault cannot run here. This server accepts only the requests the API docs describe —
method, path, `X-Vault-Token`, JSON body shape — records each one, and answers with the
documented response JSON (fixtures/*.json, shaped after developer.hashicorp.com/vault/api-docs).
Anything else is a contract violation: answered 400 and listed in `violations`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import secrets
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

from tests.http_double import HttpDouble, JsonRequest, read_json, reply

FIXTURES = Path(__file__).parent / "fixtures"
ROOT_TOKEN = "hvs.root-token-for-tests"
ROLE_ID = "59d6d1ca-47bb-4e7e-a40b-8be3bc5a0ba8"
SECRET_ID = "84896a0c-1347-aa90-a4f6-aca8b7558780"


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


@dataclass
class VaultDouble(HttpDouble):
    methods: ClassVar[tuple[str, ...]] = ("GET", "POST", "DELETE", "LIST", "PUT", "PATCH")
    mount: str = "secret"
    approle_mount: str = "approle"
    transit_mount: str = "transit"
    kv: dict[str, dict[str, Any]] = field(default_factory=dict)
    """KV v2 entries: path → {"data": {...}, "version": n}."""
    tokens: set[str] = field(default_factory=lambda: {ROOT_TOKEN})
    denied: set[str] = field(default_factory=set)
    """Folders (ending in '/') that every token is refused, as a policy would."""
    transit: dict[str, dict[str, str]] = field(default_factory=dict)
    """Transit keys (created on first encrypt, as Vault upserts them): ciphertext → plaintext."""
    requests: list[JsonRequest] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    logins: int = 0

    def revoke_tokens(self) -> None:
        """Every token stops working, as when a token's TTL runs out."""
        self.tokens.clear()

    # -- routing -----------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        req = read_json(h, "X-Vault-Token")
        self.requests.append(req)
        status, answer = self._route(req)
        if answer is None:
            reply(h, status, b"", None)
        else:
            reply(h, status, json.dumps(answer).encode(), "application/json")

    def _violation(self, req: JsonRequest, why: str) -> tuple[int, dict[str, Any]]:
        self.violations.append(f"{req.method} {req.path}: {why}")
        return 400, {"errors": [f"contract violation: {why}"]}

    def _route(self, req: JsonRequest) -> tuple[int, dict[str, Any] | None]:
        if req.path == f"/v1/auth/{self.approle_mount}/login":
            return self._login(req)
        transit = f"/v1/{self.transit_mount}/"
        if req.path.startswith(transit):
            return self._transit(req, req.path[len(transit) :])
        data_prefix = f"/v1/{self.mount}/data/"
        meta_prefix = f"/v1/{self.mount}/metadata/"
        if req.path == meta_prefix.rstrip("/"):  # hvac strips the slash of a root LIST
            route, key = "metadata", ""
        elif req.path.startswith(data_prefix):
            route, key = "data", req.path[len(data_prefix) :]
        elif req.path.startswith(meta_prefix):
            route, key = "metadata", req.path[len(meta_prefix) :]
        else:
            return self._violation(req, "not a KV v2 or AppRole login endpoint")
        if req.method == "LIST" and key and not key.endswith("/"):
            key += "/"  # Vault treats a LIST path as a folder either way
        if req.token not in self.tokens or any(key.startswith(d) for d in self.denied):
            return 403, fixture("error_permission_denied")
        handler = {
            ("data", "GET"): self._read,
            ("data", "POST"): self._write,
            ("metadata", "LIST"): self._list,
            ("metadata", "GET"): self._read_metadata,
            ("metadata", "DELETE"): self._delete_metadata,
        }.get((route, req.method))
        if handler is None:
            return self._violation(req, f"{req.method} is not used on /{route}/ here")
        if (route == "data" or req.method != "LIST") and (not key or key.endswith("/")):
            return self._violation(req, f"{key!r} is a folder, not a secret path")
        return handler(req, key)

    # -- endpoints ---------------------------------------------------------------------------

    def _login(self, req: JsonRequest) -> tuple[int, dict[str, Any] | None]:
        if req.method != "POST":
            return self._violation(req, "login is POST")
        if not isinstance(req.body, dict) or set(req.body) != {"role_id", "secret_id"}:
            return self._violation(req, f"login body must be {{role_id, secret_id}}: {req.body}")
        if req.body != {"role_id": ROLE_ID, "secret_id": SECRET_ID}:
            return 400, fixture("error_invalid_secret_id")
        answer = fixture("approle_login")
        self.logins += 1
        if self.logins > 1:  # a fresh token on each login, so tests can tell them apart
            answer["auth"]["client_token"] += f"-{self.logins}"
        self.tokens.add(answer["auth"]["client_token"])
        return 200, answer

    def _read(self, req: JsonRequest, key: str) -> tuple[int, dict[str, Any] | None]:
        if req.body is not None or set(req.query) - {"version"}:
            return self._violation(req, "read takes no body and only ?version=")
        if key not in self.kv:
            return 404, fixture("error_not_found")
        answer = fixture("kv2_read_secret_version")
        answer["data"]["data"] = copy.deepcopy(self.kv[key]["data"])
        answer["data"]["metadata"]["version"] = self.kv[key]["version"]
        return 200, answer

    def _write(self, req: JsonRequest, key: str) -> tuple[int, dict[str, Any] | None]:
        body = req.body
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            return self._violation(req, f"write body must be {{'data': {{...}}}}: {body}")
        if set(body) - {"data", "options"} or not isinstance(body.get("options", {}), dict):
            return self._violation(req, f"write body has only 'data' and 'options': {body}")
        entry = self.kv.setdefault(key, {"version": 0})
        entry["data"] = body["data"]
        entry["version"] += 1
        answer = fixture("kv2_create_or_update_secret")
        answer["data"]["version"] = entry["version"]
        return 200, answer

    def _list(self, req: JsonRequest, folder: str) -> tuple[int, dict[str, Any] | None]:
        if req.body is not None:
            return self._violation(req, "list takes no body")
        keys = {
            rest.split("/")[0] + "/" if "/" in rest else rest
            for rest in (k[len(folder) :] for k in self.kv if k.startswith(folder))
        }
        if not keys:
            return 404, fixture("error_not_found")
        answer = fixture("kv2_list_secrets")
        answer["data"]["keys"] = sorted(keys)
        return 200, answer

    def _read_metadata(self, req: JsonRequest, key: str) -> tuple[int, dict[str, Any] | None]:
        if key not in self.kv:
            return 404, fixture("error_not_found")
        answer = fixture("kv2_read_secret_metadata")
        answer["data"]["current_version"] = self.kv[key]["version"]
        return 200, answer

    def _delete_metadata(self, req: JsonRequest, key: str) -> tuple[int, dict[str, Any] | None]:
        self.kv.pop(key, None)
        return 204, None

    # -- transit (developer.hashicorp.com/vault/api-docs/secret/transit) ----------------------

    def _transit(self, req: JsonRequest, rest: str) -> tuple[int, dict[str, Any] | None]:
        action, _, name = rest.partition("/")
        if action not in ("encrypt", "decrypt") or not name or "/" in name:
            return self._violation(req, "only /transit/encrypt/:name and /decrypt/:name are used")
        if req.method != "POST":
            return self._violation(req, f"{action} is POST")
        if req.token not in self.tokens:
            return 403, fixture("error_permission_denied")
        field_name = "plaintext" if action == "encrypt" else "ciphertext"
        body = req.body
        if not isinstance(body, dict) or set(body) != {field_name}:
            return self._violation(req, f"{action} body must be {{{field_name!r}: ...}}: {body}")
        value = body[field_name]
        if not isinstance(value, str):
            return self._violation(req, f"{field_name} must be a string: {value!r}")
        if action == "encrypt":
            try:
                base64.b64decode(value, validate=True)
            except binascii.Error:
                return self._violation(req, "plaintext must be base64-encoded")
            ciphertext = "vault:v1:" + base64.b64encode(secrets.token_bytes(24)).decode()
            self.transit.setdefault(name, {})[ciphertext] = value
            answer = fixture("transit_encrypt")
            answer["data"]["ciphertext"] = ciphertext
            return 200, answer
        if name not in self.transit:
            return 400, {"errors": ["encryption key not found"]}
        if not value.startswith("vault:"):
            return 400, {"errors": ["invalid ciphertext: no prefix"]}
        if value not in self.transit[name]:
            return 400, {"errors": ["cipher: message authentication failed"]}
        answer = fixture("transit_decrypt")
        answer["data"]["plaintext"] = self.transit[name][value]
        return 200, answer
