"""Small utilities every plane may use that are not contracts between planes: process-group
helpers (`common.processes`), JSON-lines logging (`common.logs`) and file locks (`common.locks`)."""
