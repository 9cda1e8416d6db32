# autovibe metering proxy: reads provider keys to inject them, verifies machine credentials.
# Read-only: it can neither change a key nor see payment data or platform credentials.

path "secret/metadata/" {
  capabilities = ["list"]
}

path "secret/data/providers/*" {
  capabilities = ["read"]
}
# Listing lets it load every provider key once, for injection and for redaction.
path "secret/metadata/providers/*" {
  capabilities = ["list"]
}

path "transit/verify/autovibe-machine-credentials" {
  capabilities = ["update"]
}
path "transit/verify/autovibe-machine-credentials/*" {
  capabilities = ["update"]
}
