// BC Contact Sync: everything the app needs, in one resource group. Resource-group scope so that both
// `azd up` (which asks for or creates the group) and `az deployment group create -g RG` deploy it as is.
// Deploy steps: docs/DEPLOY.md.
targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------------
// Deployment
// ---------------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('Environment name (azd: AZURE_ENV_NAME). Seeds the unique suffix of every resource name.')
param environmentName string

@description('Region of all resources; must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
param location string = resourceGroup().location

@description('Python version of the function app.')
@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@description('Upper bound of Flex Consumption instances.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Purge protection of the Key Vault (recommended; cannot be turned off once on).')
param keyVaultPurgeProtection bool = true

@description('default: create (or update) the vault. recover: bring back the soft-deleted vault of the same name, with its secret, after `azd down` or `az group delete` (docs/DEPLOY.md, "Deploy again after removing").')
@allowed([
  'default'
  'recover'
])
param keyVaultCreateMode string = 'default'

@description('Tags added to every resource.')
param tags object = {}

// ---------------------------------------------------------------------------------------------------
// Sign-in of the app (BEHAVIOUR §6)
// ---------------------------------------------------------------------------------------------------

@description('SYNC_TENANT_ID: tenant of the app registration (GUID or primary domain). Default: this subscription\'s tenant.')
param syncTenantId string = tenant().tenantId

@description('SYNC_CLIENT_ID: application (client) id of an existing app registration. Leave empty when deployAppRegistration creates it; otherwise required (the function app module checks its length).')
@maxLength(36)
param syncClientId string = ''

@description('Secretless mode: no client secret and no Key Vault; the managed identity must be added as a federated credential of the app registration (docs/DEPLOY.md).')
param useFederatedCredential bool = false

@description('SYNC_CLIENT_SECRET value, stored in Key Vault (client-secret mode). Empty keeps the stored secret.')
@secure()
param syncClientSecret string = ''

@description('SYNC_AUTHORITY_HOST: Entra authority host (another value only for sovereign clouds).')
param syncAuthorityHost string = 'https://login.microsoftonline.com'

// ---------------------------------------------------------------------------------------------------
// The app registration as code (Microsoft Graph Bicep extension; modules/appregistration.bicep)
// ---------------------------------------------------------------------------------------------------

@description('Create the app registration, its service principal and (secretless mode) the federated credential of the managed identity with the Microsoft Graph Bicep extension. Needs Application Administrator or Cloud Application Administrator (or Application Developer) for the deployer.')
param deployAppRegistration bool = false

@description('Also grant the application permissions (app role assignments = admin consent): BC API.ReadWrite.All and Graph User.Read.All, plus Graph Contacts.ReadWrite and MailboxSettings.ReadWrite when contactsPermission is entraConsent. Needs Privileged Role Administrator (or Global Administrator) for the deployer. Only with deployAppRegistration.')
param grantAppPermissions bool = false

@description('exchangeRbac (recommended): Contacts.ReadWrite comes from Exchange Online RBAC for Applications, scoped to the salespeople, so the app registration must NOT hold the tenant-wide Graph permission. entraConsent: the Graph permission is requested (and granted with grantAppPermissions) and limited by an application access policy (docs/DEPLOY.md step 3).')
@allowed([
  'exchangeRbac'
  'entraConsent'
])
param contactsPermission string = 'exchangeRbac'

@description('Redirect URI of the self-service admin page (single-page app), the URL the page is served from. Empty: none.')
param adminPageRedirectUri string = ''

// ---------------------------------------------------------------------------------------------------
// Operations (modules/operations.bicep)
// ---------------------------------------------------------------------------------------------------

@description('E-mail address that receives the alerts (failed runs, poison queue, users not synced). Empty: the alerts fire without a receiver (add one to the action group later).')
param alertEmail string = ''

@description('Hours an enabled user may go without a successful sync before the alert fires.')
@minValue(1)
@maxValue(47)
param staleUserHours int = 24

// ---------------------------------------------------------------------------------------------------
// Business Central, Graph and the sync itself
// ---------------------------------------------------------------------------------------------------

@description('BC_ENVIRONMENT: Business Central environment name, e.g. production.')
@minLength(1)
@maxLength(30)
param bcEnvironment string

@description('BC_COMPANY_ID: id (GUID) of the default Business Central company.')
@minLength(36)
@maxLength(36)
param bcCompanyId string

@description('BC_API_BASE_URL')
param bcApiBaseUrl string = 'https://api.businesscentral.dynamics.com/v2.0'

@description('GRAPH_BASE_URL')
param graphBaseUrl string = 'https://graph.microsoft.com/v1.0'

@description('SYNC_TABLE_PREFIX: prefix of the Table Storage tables (letters and digits).')
param syncTablePrefix string = 'ContactSync'

@description('SYNC_SCHEDULE: NCRONTAB schedule of the timer (six fields, seconds first).')
param syncSchedule string = '0 */15 * * * *'

@description('SYNC_CHANGE_POLL_SCHEDULE: NCRONTAB schedule of the change poll, one BC request per company (six fields).')
param syncChangePollSchedule string = '0 * * * * *'

@description('SYNC_PUBLIC_URL: the function app\'s public https address, which Graph and Business Central must reach to deliver change notifications (BEHAVIOUR §8.2, §8.3). Empty: https://<app name>.azurewebsites.net. Set it for a custom domain.')
param syncPublicUrl string = ''

@description('SYNC_BC_WEBHOOKS: true to subscribe to Business Central contacts webhooks where the tenant offers them (the change poll then skips that company); false to always poll.')
@allowed([
  'true'
  'false'
])
param syncBcWebhooks string = 'true'

@description('SYNC_NOTIFY_DEBOUNCE_SECONDS: how long a change notification\'s run waits so a burst is one run.')
@minValue(0)
@maxValue(60)
param syncNotifyDebounceSeconds int = 5

@description('SYNC_SAFETY_NET_MINUTES: with live notifications, a user\'s scheduled run happens only this often.')
@minValue(15)
@maxValue(1440)
param syncSafetyNetMinutes int = 60

@description('SYNC_INLINE_BUDGET_SECONDS: how long POST /api/sync waits before answering 202.')
@minValue(1)
@maxValue(230)
param syncInlineBudgetSeconds int = 90

@description('SYNC_FULL_SYNC_HOURS: hours between automatic full reconciles per user (0 = never).')
@minValue(0)
@maxValue(744)
param syncFullSyncHours int = 24

// ---------------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var allTags = union(tags, {
  'azd-env-name': environmentName
})
// The queue the timer and the HTTP function hand per-user jobs to; the Functions host moves messages that
// fail five times to '<queue>-poison'. Both exist up front so the identity needs no queue-creation rights.
var workerQueueName = 'contact-sync-jobs'
var syncTableSuffixes = [
  'Settings'
  'Links'
  'State'
  'Runs'
  'Leases'
]
var clientSecretName = 'sync-client-secret'
// Stable per environment, so that redeploys update the same vault. After `azd down` the name is held by
// the soft-deleted vault for its retention period: the azd preprovision hook recovers it, and the plain
// `az` path passes keyVaultCreateMode=recover (docs/DEPLOY.md).
var keyVaultName = 'kv-${resourceToken}'
var appUniqueName = 'bc-contact-sync-${resourceToken}'

// ---------------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------------

module identity './modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: allTags
  }
}

module monitoring './modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: allTags
  }
}

module storage './modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: allTags
    deploymentContainerName: 'app-package'
    queueNames: [
      workerQueueName
      '${workerQueueName}-poison'
    ]
    tableNames: [for suffix in syncTableSuffixes: '${syncTablePrefix}${suffix}']
  }
}

module keyVault './modules/keyvault.bicep' = if (!useFederatedCredential) {
  name: 'keyvault'
  params: {
    name: keyVaultName
    location: location
    tags: allTags
    secretName: clientSecretName
    secretValue: syncClientSecret
    enablePurgeProtection: keyVaultPurgeProtection
    createMode: keyVaultCreateMode
  }
}

module appRegistration './modules/appregistration.bicep' = if (deployAppRegistration) {
  name: 'appregistration'
  params: {
    uniqueName: appUniqueName
    displayName: 'BC Contact Sync (${environmentName})'
    managedIdentityPrincipalId: useFederatedCredential ? identity.outputs.principalId : ''
    adminPageRedirectUri: adminPageRedirectUri
    grantPermissions: grantAppPermissions
    grantContactsReadWrite: contactsPermission == 'entraConsent'
  }
}

// ARM evaluates only the branch the condition picks, so the output of the skipped module is never read.
var clientId = deployAppRegistration ? appRegistration.outputs.appId : syncClientId

module rbac './modules/rbac.bicep' = {
  name: 'rbac'
  params: {
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    keyVaultName: keyVaultName
    grantKeyVaultAccess: !useFederatedCredential
  }
  dependsOn: [
    keyVault
  ]
}

module functionApp './modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: 'func-${resourceToken}'
    planName: 'plan-${resourceToken}'
    location: location
    tags: allTags
    pythonVersion: pythonVersion
    maximumInstanceCount: maximumInstanceCount
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    blobEndpoint: storage.outputs.blobEndpoint
    queueEndpoint: storage.outputs.queueEndpoint
    tableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    appInsightsConnectionString: monitoring.outputs.connectionString
    useFederatedCredential: useFederatedCredential
    keyVaultName: useFederatedCredential ? '' : keyVaultName
    clientSecretName: useFederatedCredential ? '' : clientSecretName
    syncTenantId: syncTenantId
    syncClientId: clientId
    syncAuthorityHost: syncAuthorityHost
    bcApiBaseUrl: bcApiBaseUrl
    bcEnvironment: bcEnvironment
    bcCompanyId: bcCompanyId
    graphBaseUrl: graphBaseUrl
    syncTablePrefix: syncTablePrefix
    syncSchedule: syncSchedule
    syncChangePollSchedule: syncChangePollSchedule
    syncPublicUrl: syncPublicUrl
    syncBcWebhooks: syncBcWebhooks
    syncNotifyDebounceSeconds: syncNotifyDebounceSeconds
    syncSafetyNetMinutes: syncSafetyNetMinutes
    syncInlineBudgetSeconds: syncInlineBudgetSeconds
    syncFullSyncHours: syncFullSyncHours
  }
  // The app must not start before its identity can read storage, telemetry and the secret.
  dependsOn: [
    rbac
  ]
}

module operations './modules/operations.bicep' = {
  name: 'operations'
  params: {
    location: location
    tags: allTags
    resourceToken: resourceToken
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    alertEmail: alertEmail
    staleUserHours: staleUserHours
    poisonQueueName: '${workerQueueName}-poison'
  }
}

// ---------------------------------------------------------------------------------------------------
// Outputs (azd stores them as environment values)
// ---------------------------------------------------------------------------------------------------

output AZURE_LOCATION string = location
output FUNCTION_APP_NAME string = functionApp.outputs.name
output FUNCTION_APP_ID string = functionApp.outputs.id
output SYNC_CLIENT_ID string = clientId
output FUNCTION_APP_HOST_NAME string = functionApp.outputs.defaultHostName
output MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output MANAGED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output KEY_VAULT_NAME string = useFederatedCredential ? '' : keyVaultName
output STORAGE_ACCOUNT_NAME string = storage.outputs.name
output WORKBOOK_ID string = operations.outputs.workbookId
