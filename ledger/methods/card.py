"""The card method: pays on a merchant's checkout page by driving Chromium with Playwright.

No payment-processor API: the card (a JSON secret `{number, expiry, cvc, name}`, read from the
secret store only now) is typed into the merchant's own form by a headless Chromium (Debian's
`/usr/bin/chromium`, no browser download), following the merchant's flow from configuration:
steps (fill a field with a card part or a text, click, wait for), the selector of the total
(checked against the approved amount before anything is typed), and the selectors that say
success (its text: the order id) or decline (its text: the reason). The checkout URL is the
payment's `pay_to`; its host names the flow.

The card never leaves this process except into the merchant's page: it is not in any error
(Playwright's messages are scrubbed of it), the receipt keeps the final URL without its query
and a screenshot of the outcome with every input and the flow's `mask` selectors painted over.
"""

from __future__ import annotations

import json
import os
import re
import secrets as random
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contracts.secrets import SecretStore, SecretStoreError
from ledger.methods import Charge, PaymentFailed, Receipt, validated

CardPart = Literal["number", "expiry", "cvc", "name"]
ALWAYS_MASKED = ("input", "textarea", "select")
"""Painted over on every receipt screenshot, whatever the flow names."""
SCREENSHOT_TIMEOUT_MS = 15_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(_Strict):
    """One thing done on the page: `fill` a field (with a `card` part or a `text`), `click`,
    or `wait_for` a selector."""

    fill: str | None = None
    card: CardPart | None = None
    text: str | None = None
    click: str | None = None
    wait_for: str | None = None

    @model_validator(mode="after")
    def one_action(self) -> Step:
        actions = [a for a in (self.fill, self.click, self.wait_for) if a is not None]
        if len(actions) != 1:
            raise ValueError("a step is exactly one of fill, click, wait_for")
        if self.fill is not None and (self.card is None) == (self.text is None):
            raise ValueError("a fill step takes either card (number|expiry|cvc|name) or text")
        return self


class MerchantFlow(_Strict):
    steps: list[Step] = Field(min_length=1)
    success: str
    """Shown when the order went through; its text is the order id."""
    decline: str
    """Shown when the card was refused; its text is the reason."""
    total: str | None = None
    """Where the page states the amount due; checked against the approved amount first."""
    mask: list[str] = Field(default_factory=list)
    """More selectors to paint over on the receipt screenshot (a card summary, an address)."""


class CardSettings(_Strict):
    browser: str = "/usr/bin/chromium"
    """The Chromium to drive; Playwright's own browser downloads are not used."""
    chromium_sandbox: bool = True
    """Chromium's own sandbox; off where it cannot start (a container without user
    namespaces). Always off as root, where Chromium refuses it."""
    timeout_s: float = Field(default=60, gt=0)
    """For each step, and for the outcome after the last one."""
    merchants: dict[str, MerchantFlow]
    """Checkout host (`shop.example.com`, or `host:port`) → its flow."""


class Card(_Strict):
    number: str = Field(pattern=r"^[0-9 ]{12,23}$")
    expiry: str
    cvc: str = Field(pattern=r"^[0-9]{3,4}$")
    name: str = ""


class CardMethod:
    def __init__(self, settings: CardSettings) -> None:
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CardMethod:
        return cls(validated(CardSettings, settings, "card"))

    def charge(
        self, charge: Charge, secrets: SecretStore | None, secret_path: str | None
    ) -> Receipt:
        if secrets is None or secret_path is None:
            raise PaymentFailed("the card method needs `secret`: the card's path")
        url = charge.pay_to or ""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PaymentFailed("pay_to is not a checkout URL (http:// or https://)")
        flow = self.settings.merchants.get(parts.netloc) or self.settings.merchants.get(
            parts.hostname or ""
        )
        if flow is None:
            known = ", ".join(sorted(self.settings.merchants)) or "none"
            raise PaymentFailed(f"no checkout flow for {parts.netloc}; configured: {known}")
        try:
            card = Card.model_validate_json(secrets.get(secret_path))
        except SecretStoreError as exc:
            raise PaymentFailed(f"card unavailable: {exc}") from exc
        except ValidationError as exc:  # its message would quote the card
            fields = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
            raise PaymentFailed(f"the secret at {secret_path!r} is not a card ({fields})") from exc
        checkout = Checkout(self.settings, flow, card, charge)
        try:
            return checkout.run(url, parts.netloc)
        except PlaywrightError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PaymentFailed(checkout.scrub(f"the browser failed: {first}")) from exc


class Checkout:
    """One payment on one merchant's page."""

    def __init__(self, settings: CardSettings, flow: MerchantFlow, card: Card, charge: Charge):
        self.settings, self.flow, self.card, self.charge = settings, flow, card, charge
        digits = card.number.replace(" ", "")
        self._secret_values = [v for v in {card.number, digits, card.cvc} if v]

    def run(self, url: str, merchant: str) -> Receipt:
        timeout_ms = self.settings.timeout_s * 1000
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=self.settings.browser,
                headless=True,
                chromium_sandbox=self.settings.chromium_sandbox and os.geteuid() != 0,
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(timeout_ms)
                page.goto(url)
                self._check_total(page)
                for step in self.flow.steps:
                    self._do(page, step)
                outcome = f"{self.flow.success}, {self.flow.decline}"
                try:
                    page.wait_for_selector(outcome, state="visible", timeout=timeout_ms)
                except PlaywrightError as exc:
                    evidence = self._evidence(page)
                    raise PaymentFailed(
                        f"no outcome on the page within {self.settings.timeout_s:g} s",
                        evidence=evidence,
                    ) from exc
                evidence = self._evidence(page)
                declined = page.locator(self.flow.decline)
                if declined.count() and declined.first.is_visible():
                    reason = self.scrub(declined.first.inner_text().strip())
                    raise PaymentFailed(f"declined: {reason}", evidence=evidence)
                order = self.scrub(page.locator(self.flow.success).first.inner_text().strip())
            finally:
                browser.close()
        return Receipt(
            receipt_id=order,
            charged=True,
            destination=merchant,
            evidence={**evidence, "order_id": order},
        )

    def scrub(self, text: str) -> str:
        """`text` without the card number or code in it (a page or an error may echo them)."""
        for value in self._secret_values:
            if len(value) >= 8:
                text = text.replace(value, "[card]")
            else:  # the code: a number of its own, not three digits inside another (a port)
                text = re.sub(rf"(?<!\d){re.escape(value)}(?!\d)", "[card]", text)
        return re.sub(r"\b\d(?:[ -]?\d){11,18}\b", "[card]", text)

    def _check_total(self, page: Page) -> None:
        if self.flow.total is None:
            return
        shown = page.locator(self.flow.total).first.inner_text()
        number = re.sub(r"[^0-9.]", "", shown.replace(",", ""))
        try:
            due = Decimal(number)
        except InvalidOperation as exc:
            raise PaymentFailed(f"the page's total {shown!r} is not an amount") from exc
        if due != self.charge.amount:
            raise PaymentFailed(
                f"the page asks {due} {self.charge.currency}, "
                f"{self.charge.amount} was approved: nothing paid"
            )

    def _do(self, page: Page, step: Step) -> None:
        if step.fill is not None:
            value = step.text if step.card is None else getattr(self.card, step.card)
            page.fill(step.fill, value or "")
        elif step.click is not None:
            # The outcome is awaited below, with the flow's timeout, not a navigation here.
            page.click(step.click, no_wait_after=True)
        elif step.wait_for is not None:
            page.wait_for_selector(step.wait_for, state="visible")

    def _evidence(self, page: Page) -> dict[str, str]:
        """The final URL (no query, no fragment) and a masked screenshot of the page."""
        parts = urlsplit(page.url)
        final = self.scrub(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
        evidence = {"final_url": final}
        folder = self.charge.receipts
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{self.charge.payment_id}-{random.token_hex(3)}.png"
            masked = [page.locator(s) for s in (*ALWAYS_MASKED, *self.flow.mask)]
            try:  # a page still loading may take a while to draw: not the flow's timeout
                page.screenshot(
                    path=str(path), mask=masked, full_page=True, timeout=SCREENSHOT_TIMEOUT_MS
                )
                evidence["screenshot"] = str(path)
            except PlaywrightError as exc:
                evidence["screenshot_error"] = self.scrub(str(exc).strip().splitlines()[0])
        return evidence


def card_json(number: str, expiry: str, cvc: str, name: str = "") -> str:
    """A card as the secret store keeps it for this method."""
    return json.dumps({"number": number, "expiry": expiry, "cvc": cvc, "name": name})
