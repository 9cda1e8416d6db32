"""The worker's placeholder API key is swapped for the real one as a call leaves the proxy.

Known providers (configs/providers.yaml, `contracts.providers`, and the stand-ins of
`autovibe_provider_hosts`) take their key from the secret store at `providers/<name>`. The
worker never holds it; a call to a known provider without a stored key is refused (502), not
forwarded with the placeholder.

Only calls the proxy meters or lets through free get the key: the provider's endpoint table
(`proxy.endpoints`) decides, the one metering prices by. Metering refuses the rest first (403
`endpoint_not_metered`); the check here is the last one before the key goes in. The public
providers' hosts get their key only over TLS (an `https` URL in providers.yaml); an operator's
own `http` provider or `autovibe_provider_hosts` entry may be plain HTTP.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from mitmproxy import exceptions, http
from mitmproxy.addonmanager import Loader

from contracts.providers import SECRET_PREFIX
from contracts.secrets import SecretNotFound, SecretStoreError
from proxy.addons import dataroot, providers
from proxy.addons.identity import identity_of
from proxy.addons.metering import not_metered
from proxy.addons.providers import Providers
from proxy.addons.redaction import SecretCache, open_store
from proxy.addons.refusal import fail_closed, refuse
from proxy.endpoints import endpoint_of

log = logging.getLogger(__name__)

OPTION = "autovibe_provider_hosts"


class Injection:
    def __init__(self) -> None:
        self.providers = Providers()
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
        if providers.OPTIONS & updated:
            self.providers = providers.from_options()
        if dataroot.OPTION in updated:
            try:
                self.cache = SecretCache(open_store(dataroot.current()))
            except SecretStoreError as exc:
                raise exceptions.OptionsError(f"secret store: {exc}") from exc

    def provider(self, host: str, port: int) -> str | None:
        return self.providers.at(host, port)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or identity_of(flow) is None:
            return
        provider = self.provider(flow.request.host, flow.request.port)
        if provider is None:
            return
        method = flow.request.method
        path = self.providers.api_path(provider, urlsplit(flow.request.path).path)
        endpoint = endpoint_of(provider, method, path)
        if endpoint is None or endpoint.rule == "refused":
            # Billed to the organisation while no counter moves: no key, no call.
            refuse(flow, 403, not_metered(provider, method, path, endpoint))
            return
        if self.providers.catalog.over_tls(flow.request.host) and flow.request.scheme != "https":
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
        known = self.providers.of(provider)
        # Anthropic's own clients send x-api-key; so do clients of a Messages-only gateway.
        messages_only = provider == "anthropic" or (
            known is not None and known.wire == ["anthropic"]
        )
        if "x-api-key" in headers or (messages_only and "authorization" not in headers):
            headers["x-api-key"] = key
            headers.pop("authorization", None)
        else:
            headers["authorization"] = f"Bearer {key}"
