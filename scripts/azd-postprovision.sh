#!/bin/sh
# azd postprovision hook (azure.yaml). In the client-secret mode the app setting SYNC_CLIENT_SECRET is a
# Key Vault reference. On a first deployment the app can start before its identity's Key Vault Secrets
# User role has propagated; App Service then keeps the unresolved reference and fetches it again only
# every 24 hours. Ask it to fetch now, and repeat until the reference resolves (role assignments take a
# few minutes). Endpoint: "Use Key Vault references as app settings", section "Rotation",
# https://learn.microsoft.com/azure/app-service/app-service-key-vault-references
set -eu
if [ -z "${KEY_VAULT_NAME:-}" ]; then
  exit 0 # secretless mode: no reference to resolve
fi
base="https://management.azure.com${FUNCTION_APP_ID:?}/config/configreferences/appsettings"
api="api-version=2022-03-01"
attempt=1
while :; do
  az rest --method post --url "$base/refresh?$api" --output none || true
  status=$(az rest --method get --url "$base/SYNC_CLIENT_SECRET?$api" --query properties.status --output tsv 2>/dev/null || echo unknown)
  if [ "$status" = "Resolved" ]; then
    echo "SYNC_CLIENT_SECRET: the Key Vault reference is resolved."
    exit 0
  fi
  if [ "$attempt" -ge 20 ]; then
    echo "WARNING: SYNC_CLIENT_SECRET is still '$status' after 10 minutes. Is the secret in vault $KEY_VAULT_NAME?"
    echo "Run this hook again (azd hooks run postprovision) once it is; see docs/DEPLOY.md, 'Secret not resolved'."
    exit 0 # the infrastructure is fine; the connection check names the problem too
  fi
  echo "SYNC_CLIENT_SECRET: '$status' (attempt $attempt of 20); the role assignment may still be propagating, retrying in 30 s."
  attempt=$((attempt + 1))
  sleep 30
done
