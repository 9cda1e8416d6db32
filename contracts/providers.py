"""The cloud providers a trial may name as `<provider>/<model>` (configs/providers.yaml).

Each provider is where its `/v1/…` endpoints live and the wire formats it speaks. The proxy
reads it for the hosts it meters and puts keys on (the key is the secret store's
`providers/<name>`); the orchestrator for what a trial may name and which agent can speak to
it. The proxy does not translate between wire formats: an agent that speaks none of a
provider's is refused at submission.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

Wire = Literal["openai", "anthropic"]
WIRE_NAMES: dict[Wire, str] = {
    "openai": "OpenAI chat/completions",
    "anthropic": "Anthropic Messages",
}
"""What each wire format is, for a person reading a refusal."""
SECRET_PREFIX = "providers/"
"""A provider's key is the secret store's `providers/<name>` (`autovibe secrets set …`)."""
PLACEHOLDER_KEY = "autovibe-machine-credential"
"""The API key workers hold; the proxy replaces it with the provider's own."""
ProviderName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
DEFAULT_PORTS = {"https": 443, "http": 80}


class Provider(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """Where the provider's `/v1/…` endpoints live, without `/v1`: `https://api.openai.com`,
    `https://openrouter.ai/api`. Agents get `<url>/v1` (OpenAI) or `<url>` (Anthropic)."""
    wire: list[Wire] = Field(min_length=1)
    """The wire formats it speaks: `openai` (chat/completions), `anthropic` (Messages)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.query or parts.fragment or value.endswith("/") or parts.path.endswith("/v1"):
            raise ValueError(
                f"{value!r}: give the root the provider's /v1/… endpoints live under, without "
                "/v1, a trailing slash, query or fragment (e.g. https://openrouter.ai/api)"
            )
        return value

    @property
    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or DEFAULT_PORTS[parts.scheme]

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def prefix(self) -> str:
        """The path before `/v1` in every call (`/api` for OpenRouter; empty for most)."""
        return urlsplit(self.url).path

    def api_path(self, path: str) -> str:
        """A request's path as the endpoint tables name it (`/v1/…`), the prefix taken off;
        a path outside the prefix is returned whole (no endpoint matches it)."""
        if self.prefix and path.startswith(self.prefix + "/"):
            return path[len(self.prefix) :]
        return path

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL agents are given (`…/v1`); Anthropic clients use its
        origin, which is `url`."""
        return f"{self.url}/v1"


PUBLIC: dict[str, Provider] = {
    "openai": Provider(url="https://api.openai.com", wire=["openai"]),
    "anthropic": Provider(url="https://api.anthropic.com", wire=["anthropic"]),
}
"""The providers known without a providers.yaml."""


class ProvidersCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: dict[ProviderName, Provider] = Field(default_factory=lambda: dict(PUBLIC))

    def at(self, host: str, port: int) -> str | None:
        """The provider whose API is at `host:port`; None for any other destination. A TLS
        provider's host is that provider on any port, so a call to it in clear is known (and
        refused its key)."""
        host = host.lower()
        return next(
            (n for n, p in self.providers.items() if p.host == host and (p.tls or p.port == port)),
            None,
        )

    def over_tls(self, host: str) -> bool:
        """Whether `host` is a provider reached only over TLS (its key never goes in clear)."""
        host = host.lower()
        return any(p.host == host and p.tls for p in self.providers.values())


def key_path(provider: str) -> str:
    """Where the provider's key is in the secret store."""
    return SECRET_PREFIX + provider


def split_model(name: str) -> tuple[str, str] | None:
    """`openrouter/qwen/qwen3-coder` → (`openrouter`, `qwen/qwen3-coder`); None for a local
    pair's name (no `/`)."""
    provider, sep, model = name.partition("/")
    return (provider, model) if sep and provider and model else None


def load_providers(configs: Path) -> ProvidersCatalog:
    """configs/providers.yaml; without one, the public providers (OpenAI, Anthropic)."""
    # Imported here: the agents (so every runner) import this module for `Wire`, and the trial
    # config's models are a sixth of a runner's start.
    from contracts.config import load_catalog

    path = configs / "providers.yaml"
    return load_catalog(path, ProvidersCatalog) if path.exists() else ProvidersCatalog()
