"""The worker's placeholder API key is swapped for the real one as a call leaves the proxy.

Known providers (api.openai.com, api.anthropic.com, and `autovibe_provider_hosts`) take their
key from the secret store at `providers/<name>`. The worker never holds it; a call to a known
provider without a stored key is refused (502), not forwarded with the placeholder.

Only calls the proxy meters get the key (the LLM APIs of `proxy.usage.API_PATHS`), and the
few endpoints that cost nothing (`FREE_ENDPOINTS`): embeddings, images, audio, batches, files
and the like are billed to the organisation while no counter moves, so they are refused (403
`endpoint_not_metered`) until they have a pricing rule. The public providers' hosts get their
key only over TLS; an operator's own `autovibe_provider_hosts` entry may be plain HTTP.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from contracts.secrets import SecretNotFound, SecretStoreError
from proxy.addons import dataroot
from proxy.addons.identity import identity_of
from proxy.addons.metering import CLOUD_HOSTS, llm_api, parse_provider_hosts
from proxy.addons.redaction import SecretCache, open_store
from proxy.addons.refusal import fail_closed, refuse
from proxy.usage import API_PATHS

log = logging.getLogger(__name__)

OPTION = "autovibe_provider_hosts"
FREE_ENDPOINTS = ("GET /v1/models", "GET /v1/models/<id>", "POST /v1/messages/count_tokens")
"""Provider endpoints that cost nothing, keyed without metering; every other endpoint that is
not a metered LLM call is refused before the key is put in."""


def free_endpoint(method: str, path: str) -> bool:
    if method == "GET":
        return path == "/v1/models" or (path.startswith("/v1/models/") and path.count("/") == 3)
    return method == "POST" and path == "/v1/messages/count_tokens"


SECRET_PREFIX = "providers/"


class Injection:
    def __init__(self) -> None:
        self.extra_hosts: dict[tuple[str, int], str] = {}
        self.cache: SecretCache | None = None

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)
        loader.add_option(
            name=OPTION,
            typespec=str,
            default="",
            help="Comma-separated host:port=provider of more providers whose key the proxy "
            "injects from the secret store (providers/<provider>).",
        )

    def configure(self, updated: set[str]) -> None:
        if OPTION in updated:
            try:
                self.extra_hosts = parse_provider_hosts(getattr(ctx.options, OPTION))
            except ValueError as exc:
                raise exceptions.OptionsError(f"{OPTION}: {exc}") from exc
        if dataroot.OPTION in updated:
            try:
                self.cache = SecretCache(open_store(dataroot.current()))
            except SecretStoreError as exc:
                raise exceptions.OptionsError(f"secret store: {exc}") from exc

    def provider(self, host: str, port: int) -> str | None:
        host = host.lower()
        return self.extra_hosts.get((host, port)) or CLOUD_HOSTS.get(host)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or identity_of(flow) is None:
            return
        provider = self.provider(flow.request.host, flow.request.port)
        if provider is None:
            return
        method, path = flow.request.method, urlsplit(flow.request.path).path
        if llm_api(flow) is None and not free_endpoint(method, path):
            # Billed to the organisation while no counter moves: no key, no call.
            refuse(
                flow,
                403,
                {
                    "error": "endpoint_not_metered",
                    "provider": provider,
                    "endpoint": f"{method} {path}",
                    "detail": f"{method} {path} at {provider} has no pricing rule, so the proxy "
                    "refuses it and never sends the key with it; metered: POST "
                    f"{', '.join(sorted(API_PATHS))}; free: {', '.join(FREE_ENDPOINTS)}",
                },
            )
            return
        if flow.request.host.lower() in CLOUD_HOSTS and flow.request.scheme != "https":
            refuse(
                flow,
                403,
                {
                    "error": "key_over_cleartext",
                    "provider": provider,
                    "detail": f"{flow.request.host} is reached only over TLS: its key is never "
                    "sent in the clear",
                },
            )
            return
        assert self.cache is not None
        try:
            key = self.cache.get(SECRET_PREFIX + provider)
        except SecretNotFound:
            refuse(
                flow,
                502,
                {
                    "error": "no_provider_key",
                    "provider": provider,
                    "detail": f"no key at {SECRET_PREFIX}{provider} in the secret store; "
                    f"set it with `autovibe secrets set {SECRET_PREFIX}{provider}`",
                },
            )
            return
        headers = flow.request.headers
        if "x-api-key" in headers or (provider == "anthropic" and "authorization" not in headers):
            headers["x-api-key"] = key
            headers.pop("authorization", None)
        else:
            headers["authorization"] = f"Bearer {key}"
