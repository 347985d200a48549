// Role assignments of the app's user-assigned identity: data-plane roles only (management roles such as
// Owner or Contributor do not grant data access and are not given), each at the narrowest scope that works.
// Role ids: learn.microsoft.com/azure/role-based-access-control/built-in-roles.

@description('Principal (object) id of the user-assigned managed identity.')
param principalId string

@description('Name of the storage account (dedicated to this app).')
param storageAccountName string

@description('Name of the Application Insights component.')
param applicationInsightsName string

@description('Name of the Key Vault.')
param keyVaultName string

@description('False in the secretless mode, where no vault exists.')
param grantKeyVaultAccess bool

var roles = {
  // Functions host storage over an identity: read/write blobs and create its containers
  // (azure-webjobs-hosts, azure-webjobs-secrets); also covers the Flex deployment container.
  // MicrosoftDocs/azure-docs includes/functions-azurewebjobsstorage-permissions.md
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  // Queue trigger (read, process) plus the app's own enqueue and the host's poison-queue handling
  // (includes/functions-queue-permissions.md lists Contributor for output bindings).
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  // The app's state tables (read, write, create if missing).
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  // Send telemetry to Application Insights with Entra ID auth (local auth is disabled).
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  // Read secret values, for the Key Vault reference of SYNC_CLIENT_SECRET.
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = if (grantKeyVaultAccess) {
  name: keyVaultName
}

// The storage roles are scoped to the account, not to single containers, queues or tables: the host creates
// its own containers and the poison queue at run time, and creating a table or queue is authorized on the
// account. The account holds nothing but this app's data, so account scope is app scope.
resource blobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, principalId, roles.storageBlobDataOwner)
  scope: storage
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
  }
}

resource queueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, principalId, roles.storageQueueDataContributor)
  scope: storage
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
  }
}

resource tableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, principalId, roles.storageTableDataContributor)
  scope: storage
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
  }
}

resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, principalId, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
  }
}

// Vault scope rather than secret scope: the secret may be put in after the deployment (keyvault.bicep
// writes it only when a value is passed), and a role assignment cannot target a secret that does not exist
// yet. The vault is dedicated to this one secret.
resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (grantKeyVaultAccess) {
  name: guid(vault.id, principalId, roles.keyVaultSecretsUser)
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
  }
}
