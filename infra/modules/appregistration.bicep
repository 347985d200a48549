// The Entra app registration of BC Contact Sync as code, with the Microsoft Graph Bicep extension
// (learn.microsoft.com/graph/templates/bicep/reference/overview; alias in infra/bicepconfig.json):
// - the application: the API's Application ID URI, the delegated scope `access_as_user` and the app role
//   `ContactSync.Admin` that the self-service page needs, the page's redirect URI, and the application
//   permissions it requests (requiredResourceAccess only *requests*; it grants nothing);
// - its service principal (the enterprise application);
// - the federated identity credential that lets the function app's user-assigned managed identity act as
//   the app without a secret (msgraph-bicep-types quickstart-templates/msi-as-a-fic-secretless);
// - optionally the admin consent, as app role assignments on the resource service principals
//   (Microsoft.Graph/appRoleAssignedTo), which needs a privileged deployer.
// main.bicep deploys this module only with deployAppRegistration = true.
extension microsoftGraphV1

@description('Stable, tenant-unique key of the application (Graph `uniqueName`), so redeploys update the same app.')
@minLength(1)
@maxLength(120)
param uniqueName string

@description('Display name shown in Entra ID and in Business Central.')
param displayName string

@description('Principal (object) id of the user-assigned managed identity to trust as a federated credential. Empty: no federated credential (client-secret mode).')
param managedIdentityPrincipalId string = ''

@description('Redirect URI of the self-service page (a single-page app that signs in with access_as_user). Empty: none.')
param adminPageRedirectUri string = ''

@description('Grant the requested application permissions (admin consent). Needs Privileged Role Administrator or Global Administrator.')
param grantPermissions bool = false

@description('Request (and with grantPermissions grant) Graph Contacts.ReadWrite and MailboxSettings.ReadWrite (the sync adds its category to the master category list) in Entra ID. Leave false with Exchange RBAC for Applications: the two grants add up, and the Entra one reaches every mailbox.')
param grantContactsReadWrite bool = false

// Well-known resource app ids and app-role ids (the same table as docs/DEPLOY.md step 2; the test suite
// keeps the two equal). Microsoft Graph: learn.microsoft.com/graph/permissions-reference.
var graphAppId = '00000003-0000-0000-c000-000000000000'
var businessCentralAppId = '996def3d-b36c-4153-8607-a6fd3c01b89f'
var roleIds = {
  bcApiReadWriteAll: 'a42b0b75-311e-488d-b67e-8fe84f924341'
  graphUserReadAll: 'df021288-bdef-4463-88db-98f22de89214'
  graphContactsReadWrite: '6918b873-d17a-4dc1-b314-35f528134491'
  graphMailboxSettingsReadWrite: '6931bccd-447a-43d1-b442-00a195474933'
}
var graphRolesAlways = [
  roleIds.graphUserReadAll
]
// Both reach every mailbox when consented in Entra: with Exchange RBAC for Applications they come from
// the Exchange roles 'Application Contacts.ReadWrite' and 'Application MailboxSettings.ReadWrite' instead.
var graphRolesEntraContacts = [
  roleIds.graphContactsReadWrite
  roleIds.graphMailboxSettingsReadWrite
]
var graphRoles = grantContactsReadWrite ? concat(graphRolesAlways, graphRolesEntraContacts) : graphRolesAlways

// Ids of the app's own scope and role: derived from the unique name, so they stay the same on redeploy
// (Entra refuses to change the id of an existing scope or role in place).
var accessAsUserId = guid(uniqueName, 'access_as_user')
var adminRoleId = guid(uniqueName, 'ContactSync.Admin')

// The token exchange audience and issuer of a managed identity as a federated credential
// (learn.microsoft.com/entra/workload-id/workload-identity-federation-config-app-trust-managed-identity).
var issuer = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'

resource app 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMyOrg'
  // api://<tenantId>/<string> is one of the formats the default identifier URI policy allows
  // (learn.microsoft.com/entra/identity-platform/identifier-uri-restrictions); api://<appId> cannot be
  // written in the same declaration that creates the appId.
  identifierUris: [
    'api://${tenant().tenantId}/${uniqueName}'
  ]
  api: {
    requestedAccessTokenVersion: 2
    oauth2PermissionScopes: [
      {
        id: accessAsUserId
        value: 'access_as_user'
        // User: each salesperson may consent for themselves where the tenant allows user consent.
        type: 'User'
        isEnabled: true
        adminConsentDisplayName: 'Use BC Contact Sync as the signed-in user'
        adminConsentDescription: 'Lets the self-service page call the BC Contact Sync API for the signed-in user.'
        userConsentDisplayName: 'Use BC Contact Sync'
        userConsentDescription: 'Lets the self-service page call BC Contact Sync for you.'
      }
    ]
  }
  appRoles: [
    {
      id: adminRoleId
      value: 'ContactSync.Admin'
      displayName: 'BC Contact Sync administrator'
      description: 'Manage every salesperson\'s sync settings on the self-service page.'
      allowedMemberTypes: [
        'User'
      ]
      isEnabled: true
    }
  ]
  spa: {
    redirectUris: empty(adminPageRedirectUri) ? [] : [
      adminPageRedirectUri
    ]
  }
  requiredResourceAccess: [
    {
      resourceAppId: businessCentralAppId
      resourceAccess: [
        {
          id: roleIds.bcApiReadWriteAll
          type: 'Role'
        }
      ]
    }
    {
      resourceAppId: graphAppId
      resourceAccess: [
        for role in graphRoles: {
          id: role
          type: 'Role'
        }
      ]
    }
  ]
}

// The managed identity as a credential of the app: the subject is its principal (object) id, the
// audience the public cloud's token exchange audience.
resource managedIdentityCredential 'Microsoft.Graph/applications/federatedIdentityCredentials@v1.0' = if (!empty(managedIdentityPrincipalId)) {
  name: '${app.uniqueName}/function-app-identity'
  description: 'User-assigned managed identity of the BC Contact Sync function app'
  issuer: issuer
  subject: managedIdentityPrincipalId
  audiences: [
    'api://AzureADTokenExchange'
  ]
}

resource servicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: app.appId
}

// Resource service principals, found by their well-known app id. Business Central's exists in every
// tenant that has used it; without it the grant fails with a clear "not found".
resource graph 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: graphAppId
}

resource businessCentral 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: businessCentralAppId
}

// Admin consent for application permissions is an app role assignment to the client's service principal
// (learn.microsoft.com/graph/api/serviceprincipal-post-approleassignedto).
resource bcGrant 'Microsoft.Graph/appRoleAssignedTo@v1.0' = if (grantPermissions) {
  appRoleId: roleIds.bcApiReadWriteAll
  principalId: servicePrincipal.id
  resourceId: businessCentral.id
}

resource graphGrants 'Microsoft.Graph/appRoleAssignedTo@v1.0' = [
  for role in graphRoles: if (grantPermissions) {
    appRoleId: role
    principalId: servicePrincipal.id
    resourceId: graph.id
  }
]

output appId string = app.appId
output servicePrincipalId string = servicePrincipal.id
output identifierUri string = app.identifierUris[0]
output accessAsUserScope string = '${app.identifierUris[0]}/access_as_user'
