// Parameters for the plain Azure CLI path (docs/DEPLOY.md, "Option 2"):
//   az deployment group create -g "$RG" -f infra/main.bicep -p infra/az.bicepparam
// Values come from environment variables with the same names azd uses, so one set of `export` lines
// serves both paths. A required variable that is not set stops the build with its name
// (readEnvironmentVariable without a default: learn.microsoft.com/azure/azure-resource-manager/bicep/bicep-functions-parameters-file).
// readEnvironmentVariable returns a string, so bool and int parameters wrap it in bool()/int(): a bare
// string for an int parameter is error BCP033 (Azure/bicep#18103). For @allowed parameters the value
// read is checked against the allowed list when az builds the file.
// Not named main.bicepparam on purpose: azd would pick that up instead of main.parameters.json.
using './main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME')
param syncClientId = readEnvironmentVariable('SYNC_CLIENT_ID', '')
param bcEnvironment = readEnvironmentVariable('BC_ENVIRONMENT')
param bcCompanyId = readEnvironmentVariable('BC_COMPANY_ID')
param useFederatedCredential = bool(readEnvironmentVariable('USE_FEDERATED_CREDENTIAL', 'false'))
param syncClientSecret = readEnvironmentVariable('SYNC_CLIENT_SECRET', '')
param pythonVersion = readEnvironmentVariable('PYTHON_VERSION', '3.11')
param keyVaultCreateMode = readEnvironmentVariable('KEY_VAULT_CREATE_MODE', 'default')
param deployAppRegistration = bool(readEnvironmentVariable('DEPLOY_APP_REGISTRATION', 'false'))
param grantAppPermissions = bool(readEnvironmentVariable('GRANT_APP_PERMISSIONS', 'false'))
param contactsPermission = readEnvironmentVariable('CONTACTS_PERMISSION', 'exchangeRbac')
param adminPageRedirectUri = readEnvironmentVariable('ADMIN_PAGE_REDIRECT_URI', '')
param alertEmail = readEnvironmentVariable('ALERT_EMAIL', '')
param staleUserHours = int(readEnvironmentVariable('STALE_USER_HOURS', '24'))
