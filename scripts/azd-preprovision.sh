#!/bin/sh
# azd preprovision hook (azure.yaml). After `azd down` the environment's Key Vault is soft-deleted and
# keeps its name for the retention period (purge protection forbids purging it), so a new deployment of
# the same environment would fail on the name. Recover it instead: the deployment then updates it, and the
# client secret in it survives. KEY_VAULT_NAME is the previous provision's output, kept in the azd
# environment after `azd down`. The plain az path does the same with keyVaultCreateMode=recover
# (docs/DEPLOY.md, "Deploy again after removing").
set -eu
name="${KEY_VAULT_NAME:-}"
if [ -z "$name" ]; then
  exit 0 # first provision of this environment, or the secretless mode: no vault
fi
if az keyvault show --name "$name" --query id --output tsv >/dev/null 2>&1; then
  exit 0 # the vault exists: nothing to recover
fi
if az keyvault show-deleted --name "$name" --query id --output tsv >/dev/null 2>&1; then
  echo "Key Vault $name is soft-deleted (azd down); recovering it so this deployment can reuse the name."
  # A vault is recovered into its old resource group, which `azd down` deleted.
  az group create --name "${AZURE_RESOURCE_GROUP:?set AZURE_RESOURCE_GROUP}" \
    --location "${AZURE_LOCATION:?set AZURE_LOCATION}" --output none
  az keyvault recover --name "$name" --output none
fi
