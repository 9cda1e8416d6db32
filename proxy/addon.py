"""The script given to `mitmdump -s`: the proxy's addons, in the order their hooks must run.

Identity first (it refuses strangers), then routing (`auto` → the local pair), then metering
(it refuses what it cannot price and reads usage), then budget, then injection (the real
provider key goes in last, only on calls that will be forwarded), then capture (it records,
redacted, what they decided), then the indexer.
"""

from proxy.addons.budget import Budget
from proxy.addons.capture import Capture
from proxy.addons.identity import Identity
from proxy.addons.indexer import Indexer
from proxy.addons.injection import Injection
from proxy.addons.jsonlog import JsonLog
from proxy.addons.metering import Metering
from proxy.addons.metrics import Metrics
from proxy.addons.routing import AutoRouting

addons = [
    JsonLog(),
    Identity(),
    AutoRouting(),
    Metering(),
    Budget(),
    Injection(),
    Capture(),
    Indexer(),
    Metrics(),
]
