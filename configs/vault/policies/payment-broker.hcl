# autovibe payment broker: the only holder of payment methods (cards, wallets).
# Transit lets it keep card data encrypted inside KV values: a KV read alone never yields a card.

path "secret/metadata/" {
  capabilities = ["list"]
}

path "secret/data/payments/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/payments/*" {
  capabilities = ["list", "read", "delete"]
}

path "transit/encrypt/autovibe-payments" {
  capabilities = ["update"]
}
path "transit/decrypt/autovibe-payments" {
  capabilities = ["update"]
}
