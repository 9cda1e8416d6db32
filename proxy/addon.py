"""The script given to `mitmdump -s`: the proxy's addons, in the order their hooks must run.

Identity first (it refuses strangers), then routing (`auto` → the local pair), then the egress
policy (it refuses destinations a worker may not reach, and raw TCP), then metering
(it refuses what it cannot price and reads usage), then capture, budget and injection. Capture
has no request hook: budget reserves, and injection puts the real provider key in last, only
on calls that will be forwarded. When a flow ends, capture spools it (redacted) before budget
settles it, so a proxy killed between the two leaves a spooled flow whose reservation the
orphan sweeper settles at the spooled cost — never spend that the spool, and so the ledger,
does not know of. Then the indexer and the metrics. `Lean`, right after the JSON log, takes
mitmproxy's own unused built-ins out of the chain once the proxy runs, and `Dispatch` has
mitmproxy call each event's hooks from a plan instead of searching the addon tree for them;
`Coalesce` has each connection's bytes of one event leave in one write.
"""

from proxy.addons.budget import Budget
from proxy.addons.capture import Capture
from proxy.addons.coalesce import Coalesce
from proxy.addons.dispatch import Dispatch
from proxy.addons.egress import Egress
from proxy.addons.identity import Identity
from proxy.addons.indexer import Indexer
from proxy.addons.injection import Injection
from proxy.addons.jsonlog import JsonLog
from proxy.addons.lean import Lean
from proxy.addons.metering import Metering
from proxy.addons.metrics import Metrics
from proxy.addons.routing import AutoRouting

addons = [
    JsonLog(),
    Lean(),
    Dispatch(),
    Coalesce(),
    Identity(),
    AutoRouting(),
    Egress(),
    Metering(),
    Capture(),
    Budget(),
    Injection(),
    Indexer(),
    Metrics(),
]
