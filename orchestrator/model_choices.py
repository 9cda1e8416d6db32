"""Which models a trial can run, and the evidence: a local pair must be in models.yaml, priced
and served; a provider's model (`<provider>/<model>`) must have its provider in
providers.yaml, a price and a key in the secret store; and every agent of the trial must speak
one of the model's wire formats. `ModelChoices` is the validation context's `models`
(`contracts.config.ModelChoices`); `autovibe models ls` prints the same facts.

CPU pairs are served by the stack's own model server (`autovibe up` starts it and the
scheduler restarts it), so they are not refused while it restarts; GPU pairs are served only
if the model plane lists them (`GET <model_url>/models`), asked once per submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import httpx

from contracts.config import ModelsCatalog, PriceCatalog
from contracts.providers import WIRE_NAMES, ProvidersCatalog, Wire, key_path, split_model
from contracts.secrets import SecretStoreError
from contracts.settings import Settings
from workers.agents import SPEAKS

LOCAL_WIRES: dict[str, frozenset[Wire]] = {
    "cpu": frozenset({"openai", "anthropic"}),  # the CPU server translates Messages itself
    "gpu": frozenset({"openai", "anthropic"}),  # Ray's OpenAI app + serving.messages_front
}
"""The wire formats the model plane serves a pair in, by device."""
PLANE_TIMEOUT_S = 3.0


class ModelRefused(Exception):
    """The model cannot run; the message names it and says why."""


@dataclass(frozen=True)
class Evidence:
    ok: bool
    why: str


def plane_listing(model_url: str) -> tuple[frozenset[str] | None, str]:
    """The names the model plane serves (`GET <model_url>/models`), or None and why not."""
    url = f"{model_url.rstrip('/')}/models"
    try:
        response = httpx.get(url, timeout=PLANE_TIMEOUT_S, trust_env=False)
        data = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return None, f"GET {url} got no answer ({type(exc).__name__}: {exc})"
    if not isinstance(data, list):
        return None, f"GET {url} answered HTTP {response.status_code} without a model list"
    names = frozenset(str(m.get("id")) for m in data if isinstance(m, dict))
    return names, f"GET {url} lists {', '.join(sorted(names)) or 'nothing'}"


def wire_names(wires: frozenset[Wire]) -> str:
    return " and ".join(WIRE_NAMES[w] for w in sorted(wires)) or "no wire format we serve"


class ModelChoices:
    """The server's answer to "can this trial run this model with these agents?"; reads the
    secret store and the model plane at most once each, and only when a name needs it."""

    def __init__(
        self,
        models: ModelsCatalog,
        prices: PriceCatalog,
        providers: ProvidersCatalog,
        settings: Settings,
    ) -> None:
        self.models = models
        self.prices = prices
        self.providers = providers
        self.settings = settings

    @cached_property
    def plane(self) -> tuple[frozenset[str] | None, str]:
        return plane_listing(self.settings.model_url)

    @cached_property
    def stored_keys(self) -> frozenset[str] | SecretStoreError:
        from secretstore import store_from_env  # the adapters load only when a key is asked

        try:
            return frozenset(store_from_env(settings=self.settings).list("providers"))
        except SecretStoreError as exc:
            return exc

    def local_names(self) -> list[str]:
        return self.models.served_names()

    def served(self, name: str) -> Evidence:
        """Whether the local pair model `name` is served, and the evidence."""
        pair = self.models.pairs[name.split(":")[0]]
        listed, seen = self.plane if pair.device == "gpu" else (None, "")
        if pair.device == "cpu":
            return Evidence(
                True,
                f"a CPU pair: the stack's model server ({self.settings.model_server}, "
                f"{self.settings.model_url}) serves it",
            )
        if listed is not None and name in listed:
            return Evidence(True, seen)
        return Evidence(False, seen)

    def key(self, provider: str) -> Evidence:
        path = key_path(provider)
        keys = self.stored_keys
        if isinstance(keys, SecretStoreError):
            return Evidence(False, f"the secret store could not be read: {keys}")
        if path in keys:
            return Evidence(True, f"{path} is in the secret store")
        return Evidence(
            False,
            f"no key at {path} in the secret store; set it with `autovibe secrets set {path}`",
        )

    def wires(self, name: str) -> frozenset[Wire]:
        """The wire formats `name` is served in, once it is known, priced, keyed and served;
        `ModelRefused` says which of these it is not."""
        split = split_model(name)
        if split is None:
            if name not in self.local_names():
                known = ", ".join(self.providers.providers)
                raise ModelRefused(
                    f"unknown model pair {name!r}; allowed: {', '.join(self.local_names())}, "
                    f"or <provider>/<model> with a provider of configs/providers.yaml ({known})"
                )
            if self.prices.price("local", name) is None:
                raise ModelRefused(
                    f"{name!r} has no price in configs/prices.yaml (local: "
                    f"{name.split(':')[0]}); an unpriced model is refused at submission"
                )
            served = self.served(name)
            if not served.ok:
                raise ModelRefused(f"{name!r} is not being served: {served.why}")
            return LOCAL_WIRES[self.models.pairs[name.split(":")[0]].device]
        provider_name, model = split
        provider = self.providers.providers.get(provider_name)
        if provider is None:
            raise ModelRefused(
                f"{name!r}: no provider {provider_name!r} in configs/providers.yaml; known: "
                f"{', '.join(self.providers.providers)} (an OpenAI- or Anthropic-compatible "
                "endpoint can be added there)"
            )
        if self.prices.price(provider_name, model) is None:
            priced = ", ".join(sorted(self.prices.providers.get(provider_name, {}))) or "none"
            raise ModelRefused(
                f"{name!r} has no price in configs/prices.yaml (providers: {provider_name}: "
                f"{model}); an unpriced model is refused at submission, not at its first call; "
                f"priced for {provider_name}: {priced}"
            )
        key = self.key(provider_name)
        if not key.ok:
            raise ModelRefused(f"{name!r}: provider {provider_name!r} has no key: {key.why}")
        return frozenset(provider.wire)

    def refusal(self, model: str, agents: list[str]) -> str | None:
        """Why the trial cannot run `model` with `agents`; None: it can."""
        try:
            served_in = self.wires(model)
        except ModelRefused as exc:
            return str(exc)
        problems = []
        for agent in agents:
            speaks = SPEAKS.get(agent)
            if speaks is None or speaks & served_in:
                continue
            problems.append(
                f"agent {agent!r} cannot speak to {model!r}: the agent speaks "
                f"{wire_names(speaks)}, the model is served in {wire_names(served_in)}, and "
                "the proxy does not translate between them"
            )
        return "; ".join(problems) or None
