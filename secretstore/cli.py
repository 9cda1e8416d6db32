"""`autovibe secrets …`: set, show, list and remove secrets in the configured store.

The store is `$AUTOVIBE_SECRET_STORE` (`file` by default, in the data root; `vault` with
`VAULT_ADDR` and `VAULT_TOKEN` or `VAULT_ROLE_ID`/`VAULT_SECRET_ID`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from contracts.adapters import UnknownAdapter
from contracts.dataroot import DataRoot
from contracts.secrets import SecretStore, SecretStoreError, mask
from contracts.settings import Settings
from secretstore import cipher_from_env, store_from_env
from secretstore.fields import TRANSIT_KEY_PREFIX, EmbeddedFieldCipher

app = typer.Typer(
    help="Provider keys and credentials in the secret store ($AUTOVIBE_SECRET_STORE).",
    no_args_is_help=True,
)
console = Console(highlight=False, soft_wrap=True)  # never wrap a path or a message
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _store() -> SecretStore:
    try:
        return store_from_env()
    except (SecretStoreError, UnknownAdapter) as exc:
        raise _fail(str(exc)) from exc


def _read_value() -> str:
    """The value from stdin: hidden prompt on a terminal, else the whole input."""
    if sys.stdin.isatty():
        value: str = typer.prompt("value", hide_input=True)
        return value
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text  # `echo` and heredocs add one


@app.command("set")
def set_(
    path: Annotated[str, typer.Argument(help="Where, e.g. providers/openai.")],
    value: Annotated[
        str | None, typer.Argument(help="The secret; read from stdin when omitted (safer).")
    ] = None,
) -> None:
    """Store a secret (replacing any value at PATH)."""
    store = _store()
    secret = _read_value() if value is None else value
    if not secret.strip():
        raise _fail(f"refusing to store an empty value at {path}", 2)
    try:
        store.put(path, secret)
    except SecretStoreError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"stored {path} ({mask(secret)})")


@app.command("get")
def get(
    path: str,
    reveal: Annotated[bool, typer.Option("--reveal", help="Print the value itself.")] = False,
) -> None:
    """Show a secret, masked unless --reveal."""
    try:
        value = _store().get(path)
    except SecretStoreError as exc:  # SecretNotFound included
        raise _fail(str(exc)) from exc
    if reveal:
        sys.stdout.write(value + "\n")
    else:
        console.print(mask(value))


@app.command("ls")
def ls(prefix: Annotated[str, typer.Argument(help="A folder, e.g. providers.")] = "") -> None:
    """Paths of the secrets below PREFIX (all when omitted); values are never shown."""
    try:
        paths = _store().list(prefix)
    except SecretStoreError as exc:
        raise _fail(str(exc)) from exc
    for path in paths:
        console.print(path)


@app.command("rm")
def rm(path: str) -> None:
    """Delete a secret (every version of it, in Vault)."""
    try:
        _store().delete(path)
    except SecretStoreError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"removed {path}")


@app.command("rotate-key")
def rotate_key() -> None:
    """Start a new version of the field-encryption key; values made before stay readable."""
    try:
        cipher = cipher_from_env(DataRoot.at(Settings().data))
        if not isinstance(cipher, EmbeddedFieldCipher):
            raise _fail(
                "Vault transit keys rotate in Vault: "
                f"`vault write -f transit/keys/{TRANSIT_KEY_PREFIX}payments/rotate`"
            )
        version = cipher.rotate()
    except SecretStoreError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"{cipher.key_path}: new fields are encrypted with key v{version}")
