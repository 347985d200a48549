# Windows twin of scripts/azd-preprovision.sh (read that file for the why): recover the environment's
# soft-deleted Key Vault after `azd down`, so this deployment can reuse its name and its secret.
$ErrorActionPreference = 'Stop'
$name = $env:KEY_VAULT_NAME
if (-not $name) { exit 0 }
az keyvault show --name $name --query id --output tsv 2>$null | Out-Null
if ($LASTEXITCODE -eq 0) { exit 0 }
az keyvault show-deleted --name $name --query id --output tsv 2>$null | Out-Null
if ($LASTEXITCODE -eq 0) {
  Write-Host "Key Vault $name is soft-deleted (azd down); recovering it so this deployment can reuse the name."
  az group create --name $env:AZURE_RESOURCE_GROUP --location $env:AZURE_LOCATION --output none
  az keyvault recover --name $name --output none
}
exit 0
