"""The cloud providers as the addons see them: configs/providers.yaml (`contracts.providers`)
from the folder `autovibe_configs` names (declared by metering), and the stand-ins of
`autovibe_provider_hosts` (declared by injection) that take a provider's place at another
address (tests, an operator's relay)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import ctx, exceptions

from contracts.config import ConfigError
from contracts.providers import Provider, ProvidersCatalog, load_providers

SEEN_MAX = 4096
OPTIONS = frozenset({"autovibe_configs", "autovibe_provider_hosts"})
"""An addon reloads its `Providers` when one of these changes."""


def parse_provider_hosts(value: str) -> dict[tuple[str, int], str]:
    """`host:port=provider,…` → {(host, port): provider}; ValueError names the bad entry."""
    hosts = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        where, sep, provider = entry.partition("=")
        host, colon, port = where.rpartition(":")
        if not sep or not provider or not colon or not host or not port.isdigit():
            raise ValueError(f"{entry!r} is not host:port=provider")
        hosts[(host.strip("[]").lower(), int(port))] = provider.strip()
    return hosts


@dataclass(frozen=True)
class Providers:
    catalog: ProvidersCatalog = field(default_factory=ProvidersCatalog)
    stand_ins: dict[tuple[str, int], str] = field(default_factory=dict)
    _seen: dict[tuple[str, int], str | None] = field(default_factory=dict, compare=False)
    """Answers of `at` so far: several addons ask it on every request, and the catalogue
    (URLs parsed per provider) does not change while this object lives; bounded."""

    def at(self, host: str, port: int) -> str | None:
        """The provider a call to `host:port` goes to; None: no provider."""
        key = (host.lower(), port)
        try:
            return self._seen[key]
        except KeyError:
            pass
        found = self.stand_ins.get(key) or self.catalog.at(*key)
        if len(self._seen) < SEEN_MAX:
            self._seen[key] = found
        return found

    def of(self, name: str) -> Provider | None:
        return self.catalog.providers.get(name)

    def api_path(self, provider: str, path: str) -> str:
        """The call's path as the endpoint tables name it (`/v1/…`)."""
        known = self.of(provider)
        return known.api_path(path) if known is not None else path

    def where(self, provider: str) -> tuple[str, str, int] | None:
        """(scheme, host, port) a call to `provider` is sent to: its stand-in, else its URL."""
        for (host, port), name in self.stand_ins.items():
            if name == provider:
                return ("https" if port == 443 else "http", host, port)
        known = self.of(provider)
        if known is None:
            return None
        return ("https" if known.tls else "http", known.host, known.port)

    def hosts(self) -> frozenset[tuple[str, int]]:
        """Every provider's host and port, stand-ins included (the egress policy allows them)."""
        public = {(p.host, p.port) for p in self.catalog.providers.values()}
        return frozenset(public | set(self.stand_ins))


def from_options() -> Providers:
    """The providers the current options name; `OptionsError` names a bad file or entry."""
    configs = getattr(ctx.options, "autovibe_configs", "")
    try:
        catalog = load_providers(Path(configs)) if configs else ProvidersCatalog()
    except ConfigError as exc:
        raise exceptions.OptionsError(f"autovibe_configs: {exc}") from exc
    try:
        stand_ins = parse_provider_hosts(getattr(ctx.options, "autovibe_provider_hosts", ""))
    except ValueError as exc:
        raise exceptions.OptionsError(f"autovibe_provider_hosts: {exc}") from exc
    return Providers(catalog, stand_ins)
