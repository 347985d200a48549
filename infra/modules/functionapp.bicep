// The Flex Consumption (FC1) Linux function app and its app settings. Runtime, memory and scale live in
// functionAppConfig on Flex (no FUNCTIONS_WORKER_RUNTIME or FUNCTIONS_EXTENSION_VERSION settings), and the
// deployment package goes to a blob container the app reads with its user-assigned identity.
// learn.microsoft.com/azure/azure-functions/functions-infrastructure-as-code (Flex Consumption tab).

@description('Name of the function app.')
param name string

@description('Name of the Flex Consumption plan.')
param planName string

@description('Region of the plan and the app.')
param location string

@description('Tags for the plan and the app; the app also gets the azd service tag.')
param tags object

@description('Python version of the Functions runtime.')
@allowed([
  '3.11'
  '3.12'
])
param pythonVersion string

@description('Upper bound of instances the plan scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory per instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

@description('Blob endpoint of the storage account (https://<account>.blob.<suffix>/).')
param blobEndpoint string

@description('Queue endpoint of the storage account.')
param queueEndpoint string

@description('Table endpoint of the storage account.')
param tableEndpoint string

@description('URL of the blob container for deployment packages.')
param deploymentContainerUrl string

@description('Application Insights connection string.')
param appInsightsConnectionString string

@description('True: secretless mode (the identity is a federated credential of the app registration).')
param useFederatedCredential bool

@description('Key Vault holding the client secret (client-secret mode only).')
param keyVaultName string = ''

@description('Name of the client-secret secret in the vault.')
param clientSecretName string = ''

@description('SYNC_TENANT_ID: tenant id or primary domain of the app registration.')
param syncTenantId string

@description('SYNC_CLIENT_ID: application (client) id of the app registration. Checked here, at the module boundary, because main.bicep lets it be empty when it creates the registration itself.')
@minLength(36)
@maxLength(36)
param syncClientId string

@description('SYNC_AUTHORITY_HOST')
param syncAuthorityHost string

@description('BC_API_BASE_URL')
param bcApiBaseUrl string

@description('BC_ENVIRONMENT')
param bcEnvironment string

@description('BC_COMPANY_ID')
param bcCompanyId string

@description('GRAPH_BASE_URL')
param graphBaseUrl string

@description('SYNC_TABLE_PREFIX')
param syncTablePrefix string

@description('SYNC_SCHEDULE (NCRONTAB, six fields)')
param syncSchedule string

@description('SYNC_CHANGE_POLL_SCHEDULE (NCRONTAB, six fields): the change poll, BEHAVIOUR §8.1')
param syncChangePollSchedule string

@description('SYNC_PUBLIC_URL: the address Graph and Business Central send change notifications to (BEHAVIOUR §8.2, §8.3); empty: https://<name>.azurewebsites.net')
param syncPublicUrl string = ''

@description('SYNC_BC_WEBHOOKS: true to use Business Central contacts webhooks where the tenant offers them (BEHAVIOUR §8.3)')
@allowed([
  'true'
  'false'
])
param syncBcWebhooks string

@description('SYNC_INLINE_BUDGET_SECONDS')
param syncInlineBudgetSeconds int

@description('SYNC_NOTIFY_DEBOUNCE_SECONDS: how long a change notification\'s run waits to gather a burst')
param syncNotifyDebounceSeconds int = 5

@description('SYNC_SAFETY_NET_MINUTES: how often a user with live notifications still gets a scheduled run')
param syncSafetyNetMinutes int = 60

@description('SYNC_FULL_SYNC_HOURS')
param syncFullSyncHours int

@description('SYNC_API_AUDIENCE: audience of people\'s access tokens (v2.0 tokens carry the client id)')
param syncApiAudience string = syncClientId

// Settings read by the Functions host and the app in both modes. The names must match shared/config.py
// (tests/test_infra.py checks them); the host-owned ones are listed there with the reason for each.
var baseAppSettings = {
  // Host storage over the identity (learn.microsoft.com/azure/azure-functions/functions-reference,
  // "Connecting to host storage with an identity"); the app reads the table/queue URIs and client id too.
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  AzureWebJobsStorage__blobServiceUri: blobEndpoint
  AzureWebJobsStorage__queueServiceUri: queueEndpoint
  AzureWebJobsStorage__tableServiceUri: tableEndpoint
  // Telemetry with Entra ID auth as the user-assigned identity
  // (learn.microsoft.com/azure/azure-monitor/app/azure-ad-authentication).
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identityClientId}'
  SYNC_TENANT_ID: syncTenantId
  SYNC_CLIENT_ID: syncClientId
  SYNC_AUTHORITY_HOST: syncAuthorityHost
  BC_API_BASE_URL: bcApiBaseUrl
  BC_ENVIRONMENT: bcEnvironment
  BC_COMPANY_ID: bcCompanyId
  GRAPH_BASE_URL: graphBaseUrl
  SYNC_TABLE_PREFIX: syncTablePrefix
  SYNC_SCHEDULE: syncSchedule
  SYNC_CHANGE_POLL_SCHEDULE: syncChangePollSchedule
  // The app's own default host name (no unique-hostname label scope is set, so it is <name>.azurewebsites.net);
  // Graph and Business Central must reach it from the internet (BEHAVIOUR §8.2, §8.3).
  SYNC_PUBLIC_URL: empty(syncPublicUrl) ? 'https://${name}.azurewebsites.net' : syncPublicUrl
  SYNC_BC_WEBHOOKS: syncBcWebhooks
  SYNC_INLINE_BUDGET_SECONDS: string(syncInlineBudgetSeconds)
  SYNC_FULL_SYNC_HOURS: string(syncFullSyncHours)
  SYNC_API_AUDIENCE: syncApiAudience
  SYNC_NOTIFY_DEBOUNCE_SECONDS: string(syncNotifyDebounceSeconds)
  SYNC_SAFETY_NET_MINUTES: string(syncSafetyNetMinutes)
}

// Client-secret mode: a Key Vault reference, resolved by the platform with keyVaultReferenceIdentity
// (learn.microsoft.com/azure/app-service/app-service-key-vault-references). No version: the latest is used.
var secretAppSettings = {
  SYNC_CLIENT_SECRET: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=${clientSecretName})'
}

// Secretless mode: the app gets an assertion for api://AzureADTokenExchange from this identity and
// presents it to Entra ID instead of a secret; no secret exists anywhere.
var federatedAppSettings = {
  SYNC_MANAGED_IDENTITY_CLIENT_ID: identityClientId
}

var appSettings = union(baseAppSettings, useFederatedCredential ? federatedAppSettings : secretAppSettings)

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy on Flex keeps at least two always-ready instances billed per function group (learn.microsoft.com/azure/reliability/reliability-functions); a scheduled sync tolerates a zone outage.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:Power Automate cloud flows call the HTTP API over the public endpoint; every call needs a function key (authLevel function) over HTTPS.
  // checkov:skip=CKV_AZURE_17:Callers authenticate with function keys; client certificates would add a second secret to every Power Automate flow.
  // checkov:skip=CKV_AZURE_212:Flex Consumption scales to zero; always-ready instances would bill around the clock for a job that runs every 15 minutes.
  // checkov:skip=CKV_AZURE_213:Flex Consumption has no platform health check (and nothing always-on to evict); failed runs surface in the run reports.
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'app'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      appSettings: [
        for setting in items(appSettings): {
          name: setting.key
          value: setting.value
        }
      ]
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// No FTP and no basic-auth (publishing profile) deployments: code goes in with an Entra token (azd deploy,
// func azure functionapp publish) and lands in the deployment container.
resource ftpPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = app.name
output id string = app.id
output defaultHostName string = app.properties.defaultHostName
