"""A merchant's checkout, served for real on localhost: the page the card method drives.

`GET /checkout?item=…&amount=…[&slow=S]` shows the total and a card form; `POST /review` a
confirmation step (the amount and the card's last four digits); `POST /pay` the outcome after
`slow` seconds: an order id, or a decline for the test card 4000 0000 0000 0002 (as card
networks' test numbers decline). What was charged is kept in `orders` (in memory only).
"""

from __future__ import annotations

import html
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DECLINED_CARD = "4000000000000002"

FLOW: dict[str, Any] = {
    "total": "#total",
    "steps": [
        {"fill": "#card-number", "card": "number"},
        {"fill": "#expiry", "card": "expiry"},
        {"fill": "#cvc", "card": "cvc"},
        {"fill": "#name", "card": "name"},
        {"click": "#review"},
        {"wait_for": "#confirm"},
        {"click": "#confirm"},
    ],
    "success": "#order-id",
    "decline": ".declined",
    "mask": [".card-summary"],
}
"""The stand-in's flow, as payments.yaml describes a merchant."""


@dataclass
class Merchant:
    server: ThreadingHTTPServer
    orders: list[dict[str, str]] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def checkout(self, amount: str, slow: float = 0) -> str:
        query = f"item=gpu-hour&amount={amount}" + (f"&slow={slow}" if slow else "")
        return f"http://{self.host}/checkout?{query}"


def _page(title: str, body: str) -> bytes:
    return (
        f"<!doctype html><html><head><title>{title}</title></head>"
        f"<body style='font: 16px sans-serif'><h1>{title}</h1>{body}</body></html>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    merchant: Merchant

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, page: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def _form(self) -> dict[str, str]:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        return {k: v[0] for k, v in parse_qs(raw).items()}

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/checkout":
            self._send(_page("Not found", ""), 404)
            return
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        amount, slow = html.escape(q.get("amount", "0")), html.escape(q.get("slow", "0"))
        self._send(
            _page(
                "Checkout",
                f"<p>Total: <span id='total'>{amount} USD</span></p>"
                "<form method='post' action='/review'>"
                f"<input type='hidden' name='amount' value='{amount}'>"
                f"<input type='hidden' name='slow' value='{slow}'>"
                "<input id='card-number' name='number' placeholder='Card number'>"
                "<input id='expiry' name='expiry' placeholder='MM/YY'>"
                "<input id='cvc' name='cvc' placeholder='CVC'>"
                "<input id='name' name='name' placeholder='Name on card'>"
                "<button id='review' type='submit'>Review order</button></form>",
            )
        )

    def do_POST(self) -> None:
        form = self._form()
        if self.path == "/review":
            hidden = "".join(
                f"<input type='hidden' name='{k}' value='{html.escape(v)}'>"
                for k, v in form.items()
            )
            last4 = html.escape(form.get("number", "")[-4:])
            self._send(
                _page(
                    "Confirm your order",
                    f"<p>Pay {html.escape(form.get('amount', ''))} USD with the card "
                    f"<span class='card-summary'>ending {last4}</span>?</p>"
                    f"<form method='post' action='/pay'>{hidden}"
                    "<button id='confirm' type='submit'>Pay now</button></form>",
                )
            )
        elif self.path == "/pay":
            time.sleep(float(form.get("slow", "0") or 0))
            number = form.get("number", "").replace(" ", "")
            if number == DECLINED_CARD:
                self._send(
                    _page("Payment failed", "<p class='declined'>Card declined: do not honor</p>")
                )
                return
            order = "ORD-" + secrets.token_hex(4).upper()
            self.merchant.orders.append({**form, "order": order, "number": number})
            self._send(
                _page(
                    "Thank you",
                    f"<p>Order <span id='order-id'>{order}</span> is paid.</p>"
                    f"<p class='card-summary'>Charged to the card ending {number[-4:]}</p>",
                )
            )
        else:
            self._send(_page("Not found", ""), 404)


@contextmanager
def merchant() -> Iterator[Merchant]:
    class Handler(_Handler):
        pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    shop = Merchant(server)
    Handler.merchant = shop
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield shop
    finally:
        server.shutdown()
        server.server_close()
