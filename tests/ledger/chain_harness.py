"""An in-process Ethereum chain for the crypto method: py-evm through eth-tester and web3.py.

`DevChain` starts a fresh chain, deploys the MiniToken ERC-20 (fixtures/MiniToken.sol, compiled
with solc 0.8.26 into fixtures/MiniToken.json: solc cannot be downloaded here) and funds a new
payer wallet with coin and tokens; the chain is registered as `eth-tester://<name>` for the
crypto method's `rpc_url`.
"""

from __future__ import annotations

import json
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3
from web3.providers.eth_tester import EthereumTesterProvider
from web3.types import Wei

from ledger.methods.crypto import register_chain

FIXTURES = Path(__file__).with_name("fixtures")
TOKEN_DECIMALS = 6


class DevChain:
    def __init__(self, *, coin: str = "1", tokens: str = "1000") -> None:
        self.name = "test-" + secrets.token_hex(4)
        provider = EthereumTesterProvider()
        register_chain(self.name, provider)
        self.w3 = Web3(provider)
        self.owner = self.w3.eth.accounts[0]
        compiled = json.loads((FIXTURES / "MiniToken.json").read_text())
        contract = self.w3.eth.contract(abi=compiled["abi"], bytecode=compiled["bytecode"])
        supply = 10**6 * 10**TOKEN_DECIMALS
        deployed = contract.constructor("Test USD Coin", "USDC", TOKEN_DECIMALS, supply).transact(
            {"from": self.owner}
        )
        self.token_address = self.w3.eth.wait_for_transaction_receipt(deployed)["contractAddress"]
        self.token = self.w3.eth.contract(address=self.token_address, abi=compiled["abi"])
        self.payer = Account.create()
        self.payer_key = self.payer.key.hex()
        self.fund(coin=coin, tokens=tokens)

    @property
    def url(self) -> str:
        return f"eth-tester://{self.name}"

    def fund(self, *, coin: str = "0", tokens: str = "0") -> None:
        if Decimal(coin):
            sent = self.w3.eth.send_transaction(
                {"from": self.owner, "to": self.payer.address, "value": Wei(_units(coin, 18))}
            )
            self.w3.eth.wait_for_transaction_receipt(sent)
        if Decimal(tokens):
            self.token.functions.transfer(
                self.payer.address, _units(tokens, TOKEN_DECIMALS)
            ).transact({"from": self.owner})

    def tokens_of(self, address: str) -> Decimal:
        return Decimal(self.token.functions.balanceOf(address).call()).scaleb(-TOKEN_DECIMALS)

    def coin_of(self, address: str) -> Decimal:
        return Decimal(self.w3.eth.get_balance(Web3.to_checksum_address(address))).scaleb(-18)

    def receipt(self, tx_hash: str) -> Any:
        return self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]

    def method(self, name: str, asset: str, *, token: bool, secret: str = "wallets/eth") -> dict:
        """A payments.yaml method entry that pays on this chain."""
        settings: dict[str, Any] = {"rpc_url": self.url}
        if token:
            settings |= {"token": self.token_address, "decimals": TOKEN_DECIMALS}
        return {
            "name": name,
            "kind": "crypto",
            "adapter": "crypto",
            "asset": asset,
            "secret": secret,
            "max_fee": "1",
            "settings": settings,
        }


def _units(amount: str, decimals: int) -> int:
    return int(Decimal(amount).scaleb(decimals))


def new_wallet() -> str:
    return str(Account.create().address)
