"""Small utilities every plane may use that are not contracts between planes: process-group
helpers (`common.processes`) and JSON-lines logging (`common.logs`)."""
