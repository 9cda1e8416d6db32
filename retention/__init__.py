"""Retention plane: how long each part of the data root is kept, and deleting what has expired.

`policy` (the policy file's model), `apply` (plan and delete), `render` (logrotate, cron,
systemd and Elasticsearch ILM files from the same policy), `cli` (`autovibe retention …`).
"""
