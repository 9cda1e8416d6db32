"""The crypto method: pays a native coin or an ERC-20 token from a key held in the secret store.

Talks to an Ethereum JSON-RPC node through web3.py (`rpc_url`: `http(s)://…`, or
`eth-tester://<name>` for a chain registered in this process with `register_chain`, a
development chain as Hardhat's in-process network is). The wallet's key is read from the secret
store only when charging. Before sending, the wallet must hold the amount and the most the gas
can cost; a short wallet is a failed attempt with nothing sent. The signed transaction is sent,
its receipt awaited: a mined transaction with status 1 is paid, with its hash, block and fee
(gas used × effective gas price, in the chain's coin); a reverted one is a failed attempt that
still paid its fee.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contracts.secrets import SecretStore, SecretStoreError
from ledger.methods import Charge, Fee, PaymentFailed, Receipt, mask_address, validated

# py_ecc (under eth_account and web3) raises the whole process's recursion limit to 100000 when
# imported. In the control API that serves purchases, json.loads of a deeply nested request
# would then overflow the C stack and kill the process (a segfault) instead of raising
# RecursionError, which the API answers as a bad request: the limit is put back.
_RECURSION_LIMIT = sys.getrecursionlimit()
from eth_account import Account  # noqa: E402
from web3 import Web3  # noqa: E402
from web3.exceptions import TimeExhausted, Web3Exception  # noqa: E402
from web3.providers import BaseProvider  # noqa: E402

sys.setrecursionlimit(_RECURSION_LIMIT)

TESTER_SCHEME = "eth-tester://"
NATIVE_GAS = 21_000
"""Gas of a plain coin transfer."""
ERC20_ABI: list[dict[str, Any]] = json.loads(
    (Path(__file__).with_name("erc20.abi.json")).read_text(encoding="utf-8")
)
"""The EIP-20 functions and events this method calls and reads."""

_chains: dict[str, BaseProvider] = {}


def register_chain(name: str, provider: BaseProvider) -> None:
    """Make `eth-tester://<name>` reach `provider` (an `EthereumTesterProvider`) in this process."""
    _chains[name] = provider


class CryptoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpc_url: str = Field(min_length=1)
    """The node's JSON-RPC URL, or `eth-tester://<name>` for a chain in this process."""
    token: str | None = None
    """The ERC-20 contract paid with; absent: the chain's native coin."""
    decimals: int = Field(default=18, ge=0, le=36)
    """The token's (or coin's) decimals: 6 for USDC, 18 for ETH."""
    coin: str = "ETH"
    """The chain's native coin, in which gas is paid."""
    gas_limit: int = Field(default=100_000, gt=0)
    """Gas allowed to a token transfer (a plain coin transfer takes 21,000)."""
    timeout_s: float = Field(default=120, gt=0)
    """How long to wait for the receipt."""


class CryptoMethod:
    def __init__(self, settings: CryptoSettings) -> None:
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CryptoMethod:
        return cls(validated(CryptoSettings, settings, "crypto"))

    def web3(self) -> Web3:
        url = self.settings.rpc_url
        if url.startswith(TESTER_SCHEME):
            name = url.removeprefix(TESTER_SCHEME)
            if name not in _chains:
                raise PaymentFailed(f"no in-process chain {name!r} is registered")
            return Web3(_chains[name])
        timeout = {"timeout": self.settings.timeout_s}
        return Web3(Web3.HTTPProvider(url, request_kwargs=timeout))

    def charge(
        self, charge: Charge, secrets: SecretStore | None, secret_path: str | None
    ) -> Receipt:
        if secrets is None or secret_path is None:
            raise PaymentFailed("the crypto method needs `secret`: the wallet key's path")
        if not charge.pay_to or not Web3.is_address(charge.pay_to):
            raise PaymentFailed("pay_to is not an Ethereum address (0x and 40 hex digits)")
        units = charge.amount.scaleb(self.settings.decimals)
        if units != units.to_integral_value():
            raise PaymentFailed(f"{charge.amount} has more than {self.settings.decimals} decimals")
        try:
            account = Account.from_key(secrets.get(secret_path))
        except SecretStoreError as exc:
            raise PaymentFailed(f"wallet key unavailable: {exc}") from exc
        except ValueError as exc:  # the message would quote the key
            raise PaymentFailed(f"the secret at {secret_path!r} is not a private key") from exc
        to = Web3.to_checksum_address(charge.pay_to)
        try:
            return self._send(charge, account, to, int(units))
        except (Web3Exception, ConnectionError, OSError) as exc:
            raise PaymentFailed(f"the node at {self._where()} failed: {exc}") from exc

    def _send(self, charge: Charge, account: Any, to: str, units: int) -> Receipt:
        s = self.settings
        w3 = self.web3()
        gas_price = w3.eth.gas_price
        base: dict[str, Any] = {
            "from": account.address,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
            "gasPrice": gas_price,
            "chainId": w3.eth.chain_id,
        }
        coin = w3.eth.get_balance(account.address)
        if s.token is None:
            tx: Any = {**base, "to": to, "value": units, "gas": NATIVE_GAS}
            need = units + NATIVE_GAS * gas_price
            if coin < need:
                raise PaymentFailed(self._short(account.address, coin, need, s.coin, 18))
        else:
            token = w3.eth.contract(address=Web3.to_checksum_address(s.token), abi=ERC20_ABI)
            held = token.functions.balanceOf(account.address).call()
            if held < units:
                raise PaymentFailed(
                    self._short(account.address, held, units, charge.currency, s.decimals)
                )
            gas_cost = s.gas_limit * gas_price
            if coin < gas_cost:
                raise PaymentFailed(self._short(account.address, coin, gas_cost, s.coin, 18))
            params: Any = {**base, "gas": s.gas_limit}
            tx = token.functions.transfer(to, units).build_transaction(params)
        signed = account.sign_transaction(tx)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        try:
            mined = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=s.timeout_s)
        except TimeExhausted as exc:
            raise PaymentFailed(
                f"no receipt within {s.timeout_s:g} s; the transaction may still be mined",
                evidence={"tx_hash": tx_hash.to_0x_hex()},
            ) from exc
        fee = Fee(
            (Decimal(mined["gasUsed"]) * Decimal(mined["effectiveGasPrice"])).scaleb(-18),
            s.coin,
        )
        evidence = {
            "tx_hash": tx_hash.to_0x_hex(),
            "block": str(mined["blockNumber"]),
            "from": mask_address(account.address),
        }
        if mined["status"] != 1:
            raise PaymentFailed(
                f"the transfer reverted in block {mined['blockNumber']}",
                fee=fee,
                evidence=evidence,
            )
        return Receipt(
            receipt_id=tx_hash.to_0x_hex(),
            charged=True,
            fee=fee,
            destination=mask_address(to),
            evidence=evidence,
        )

    def _where(self) -> str:
        url = self.settings.rpc_url
        return url.split("@")[-1] if "@" in url else url  # no credentials of a node URL

    @staticmethod
    def _short(address: str, has: int, needs: int, unit: str, decimals: int) -> str:
        return (
            f"insufficient funds: wallet {mask_address(address)} holds "
            f"{Decimal(has).scaleb(-decimals):f} {unit}, needs {Decimal(needs).scaleb(-decimals):f}"
        )
