"""Small utilities every plane may use that are not contracts between planes: process-group
helpers (`common.processes`), JSON-lines logging (`common.logs`), file locks (`common.locks`)
and the commands' error line and exit (`common.cli`)."""
