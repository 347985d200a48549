// The client secret in the vault (see keyvault.bicep for why this is a module of its own).

@description('Name of the existing vault.')
param vaultName string

@description('Name of the secret.')
param name string

@description('Value of the secret.')
@secure()
param value string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41:The secret's lifetime is the end date of the app registration's credential; a second expiry here would be a clock that can disagree with it.
  parent: vault
  name: name
  properties: {
    value: value
    contentType: 'text/plain'
  }
}
