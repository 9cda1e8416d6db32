"""The proxy's logs as JSON lines on stderr (`common.logs`), in place of mitmdump's own.

mitmdump's terminal log (`TermLog`) prints plain text to stdout; this addon takes its handler
off the root logger and puts a JSON one in its place, so the addons' records and mitmproxy's
own reach Filebeat in the same shape as the API's and the workers'. `termlog_verbosity` keeps
its meaning: it sets the JSON handler's level, and the root logger's. mitmproxy sets the root
logger to DEBUG, so every record below the verbosity was still made, formatted for the
deprecated `add_log` event and offered to every addon, then dropped by the handler: a streamed
response's "Streaming response from …" cost about 5 % of the proxy's CPU (py-spy, bench.proxy's
event streams). List it first in the addon script.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader
from mitmproxy.addons.termlog import TermLogHandler

from common.logs import json_handler


class JsonLog:
    def __init__(self) -> None:
        self.handler = json_handler()
        self.handler.setLevel(logging.INFO)

    def load(self, loader: Loader) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, TermLogHandler):
                root.removeHandler(handler)
        if self.handler not in root.handlers:
            root.addHandler(self.handler)

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated:
            level = ctx.options.termlog_verbosity.upper()
            self.handler.setLevel(level)
            logging.getLogger().setLevel(level)

    def done(self) -> None:
        # A reloaded script builds a new JsonLog: the old handler must not print twice.
        logging.getLogger().removeHandler(self.handler)
