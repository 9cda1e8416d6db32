#!/usr/bin/env bash
# Prepare a fresh Vault for autovibe: KV v2, AppRole and transit, one least-privilege policy and
# AppRole per service (orchestrator, proxy, payment-broker).
#
#   VAULT_ADDR=https://vault:8200 VAULT_TOKEN=<admin token> configs/vault/setup.sh [OUT_DIR]
#
# Needs the `vault` CLI and a token that may mount engines and write policies. Safe to re-run:
# engines and keys are created once, policies and roles are rewritten, and each run mints a new
# secret_id per role. Each service's credentials go to OUT_DIR/<service>.env (mode 0600;
# default $AUTOVIBE_DATA/vault-secrets/approle); hand each file only to its service, and run
# that service with AUTOVIBE_SECRET_STORE=vault. AUTOVIBE_VAULT_MOUNT picks the KV mount
# (default secret).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mount="${AUTOVIBE_VAULT_MOUNT:-secret}"
out="${1:-${AUTOVIBE_DATA:-./var}/vault-secrets/approle}"
services=(orchestrator proxy payment-broker)

: "${VAULT_ADDR:?set VAULT_ADDR, e.g. https://vault.internal:8200}"
: "${VAULT_TOKEN:?set VAULT_TOKEN to a token that may mount engines and write policies}"
command -v vault >/dev/null || { echo "setup.sh: the vault CLI is not on PATH" >&2; exit 1; }

listed() { # listed "secrets|auth" PATH/ : is PATH/ mounted?
  vault "$1" list | awk '{print $1}' | grep -qx "$2"
}

if listed secrets "$mount/"; then
  vault kv enable-versioning "$mount/" >/dev/null # upgrades a v1 mount, no-op on v2
else
  vault secrets enable -path="$mount" -version=2 kv
fi
listed auth approle/ || vault auth enable approle
listed secrets transit/ || vault secrets enable transit

# Transit keys are created once; an existing key is left as it is.
for key in autovibe-machine-credentials autovibe-payments; do
  vault read "transit/keys/$key" >/dev/null 2>&1 || vault write -f "transit/keys/$key"
done

umask 077
mkdir -p "$out"
for service in "${services[@]}"; do
  role="autovibe-$service"
  sed "s|\"secret/|\"$mount/|" "$here/policies/$service.hcl" | vault policy write "$role" -
  # The payment broker gets the shortest-lived tokens. secret_id_num_uses=0: the adapter logs in
  # again with the same secret_id whenever its token expires.
  ttl=1h max_ttl=24h
  if [[ $service == payment-broker ]]; then ttl=15m max_ttl=1h; fi
  vault write "auth/approle/role/$role" \
    token_policies="$role" token_ttl="$ttl" token_max_ttl="$max_ttl" \
    secret_id_ttl=720h secret_id_num_uses=0
  role_id="$(vault read -field=role_id "auth/approle/role/$role/role-id")"
  secret_id="$(vault write -f -field=secret_id "auth/approle/role/$role/secret-id")"
  printf 'AUTOVIBE_SECRET_STORE=vault\nAUTOVIBE_VAULT_MOUNT=%s\nVAULT_ADDR=%s\nVAULT_ROLE_ID=%s\nVAULT_SECRET_ID=%s\n' \
    "$mount" "$VAULT_ADDR" "$role_id" "$secret_id" >"$out/$service.env"
  # The same two values as files, for docker compose `secrets:` (mounted under /run/secrets).
  mkdir -p -m 0700 "$out/$service"
  printf '%s' "$role_id" >"$out/$service/role_id"
  printf '%s' "$secret_id" >"$out/$service/secret_id"
  chmod 0444 "$out/$service/role_id" "$out/$service/secret_id"
  echo "$role: policy and AppRole written; credentials in $out/$service.env"
done
echo "secret_ids expire in 30 days: re-run this script (or write auth/approle/role/<role>/secret-id) before then."
