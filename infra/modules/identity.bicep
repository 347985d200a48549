// The one user-assigned managed identity of the app. User-assigned rather than system-assigned so that its
// role assignments (rbac.bicep) and its Key Vault access exist *before* the function app starts, and so
// that the secretless mode can register it as a federated credential of the app registration.

@description('Name of the user-assigned managed identity.')
param name string

@description('Region of the identity.')
param location string

@description('Tags for the identity.')
param tags object

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
