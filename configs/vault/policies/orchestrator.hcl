# autovibe orchestrator (and the operator's `autovibe secrets` CLI): manages provider keys and
# platform credentials, mints machine credentials. Never sees payment data.
# KV v2 mounted at secret/: values under secret/data/, listing and deletion under secret/metadata/.

# Top-level folder names only (providers/, platform/, payments/), so `autovibe secrets ls` can walk.
path "secret/metadata/" {
  capabilities = ["list"]
}

path "secret/data/providers/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/providers/*" {
  capabilities = ["list", "read", "delete"]
}

path "secret/data/platform/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/platform/*" {
  capabilities = ["list", "read", "delete"]
}

# Machine credentials are HMACs made by transit; the key itself never leaves Vault.
path "transit/hmac/autovibe-machine-credentials" {
  capabilities = ["update"]
}
path "transit/hmac/autovibe-machine-credentials/*" {
  capabilities = ["update"]
}
