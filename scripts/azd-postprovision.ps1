# Windows twin of scripts/azd-postprovision.sh (read that file for the why): make App Service fetch the
# SYNC_CLIENT_SECRET Key Vault reference again until it resolves.
$ErrorActionPreference = 'Continue'
if (-not $env:KEY_VAULT_NAME) { exit 0 }
$base = "https://management.azure.com$($env:FUNCTION_APP_ID)/config/configreferences/appsettings"
$api = 'api-version=2022-03-01'
for ($attempt = 1; $attempt -le 20; $attempt++) {
  az rest --method post --url "$base/refresh?$api" --output none
  $status = az rest --method get --url "$base/SYNC_CLIENT_SECRET?$api" --query properties.status --output tsv
  if ($status -eq 'Resolved') { Write-Host 'SYNC_CLIENT_SECRET: the Key Vault reference is resolved.'; exit 0 }
  Write-Host "SYNC_CLIENT_SECRET: '$status' (attempt $attempt of 20); retrying in 30 s."
  Start-Sleep -Seconds 30
}
Write-Host "WARNING: SYNC_CLIENT_SECRET is still unresolved. See docs/DEPLOY.md, 'Secret not resolved'."
exit 0
