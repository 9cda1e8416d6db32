"""The `autovibe_data` option, shared by every addon that reads or writes the data root."""

from __future__ import annotations

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from contracts.dataroot import DataRoot
from contracts.settings import Settings

OPTION = "autovibe_data"


def add_option(loader: Loader) -> None:
    """Declare `autovibe_data`; mitmproxy accepts the same declaration from several addons."""
    loader.add_option(
        name=OPTION,
        typespec=str,
        default=str(Settings.model_fields["data"].default),
        help="autovibe data root: machine-credential key, traffic spool and traffic index.",
    )


def current() -> DataRoot:
    """The data root named by the option; an empty value is refused."""
    value: str = getattr(ctx.options, OPTION)
    if not value.strip():
        raise exceptions.OptionsError(f"{OPTION} must name a folder, got {value!r}")
    return DataRoot.at(value)
