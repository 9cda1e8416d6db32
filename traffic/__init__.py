"""The traffic plane: everything the proxy captured, from the spool to the stores that answer
questions about it.

- `traffic.spool`: the JSON-lines spool the proxy's capture addon writes, the source of truth.
- `traffic.sqlite_store`: the embedded store (SQLite, full-text search), fed from the spool.
- `traffic.elasticsearch_store`: the cluster store (Elasticsearch), fed from the spool, read
  through its search API.
- `traffic.stores`: the store port and the registry that picks a store by short name, and
  `MeteredFlows`, the read port the ledger, the scheduler and the reports use.
- `traffic.indexer`: the process (or mitmdump addon) that keeps a store caught up.
- `traffic.cli`: `autovibe traffic …`.

The proxy (`proxy/`) writes the spool; nothing here runs inside mitmdump but the spool writer
and the in-process indexer the proxy's addon drives.
"""
