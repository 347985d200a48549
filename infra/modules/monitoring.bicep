// Log Analytics workspace and workspace-based Application Insights with local (instrumentation key)
// authentication disabled: telemetry is accepted only with an Entra token, which the Functions host gets
// from the app's identity through APPLICATIONINSIGHTS_AUTHENTICATION_STRING
// (learn.microsoft.com/azure/azure-monitor/app/azure-ad-authentication).

@description('Name of the Log Analytics workspace.')
param logAnalyticsName string

@description('Name of the Application Insights component.')
param applicationInsightsName string

@description('Region of both resources.')
param location string

@description('Tags for both resources.')
param tags object

@description('Days the workspace keeps logs.')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    retentionInDays: retentionInDays
    sku: {
      name: 'PerGB2018'
    }
    features: {
      disableLocalAuth: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: applicationInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

output applicationInsightsName string = appInsights.name
output applicationInsightsId string = appInsights.id
// The connection string is not a credential once local auth is off: it only says where to send telemetry.
output connectionString string = appInsights.properties.ConnectionString
