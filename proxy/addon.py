"""The script given to `mitmdump -s`: the proxy's addons, in the order their hooks must run.

Identity first (it refuses strangers), then metering (it refuses what it cannot price and
reads usage), then capture (it records what the two decided), then the indexer.
"""

from proxy.addons.budget import Budget
from proxy.addons.capture import Capture
from proxy.addons.identity import Identity
from proxy.addons.indexer import Indexer
from proxy.addons.metering import Metering

addons = [Identity(), Metering(), Budget(), Capture(), Indexer()]
