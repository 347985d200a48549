// Operations: an Azure Monitor workbook over the app's run logs in Application Insights, and log alert
// rules with one action group. The queries live in infra/monitoring/ (loaded at compile time), so the
// test suite can parse them and check every field against what the app really logs
// (tests/test_infra_monitoring.py).
// Workbook resource: learn.microsoft.com/azure/azure-monitor/visualize/workbooks-automate (ARM/Bicep: the
// name is a GUID, kind 'shared', the gallery JSON in serializedData, sourceId = the resource it opens on).
// Log alerts: learn.microsoft.com/azure/templates/microsoft.insights/scheduledqueryrules (2023-12-01).

@description('Region of the workbook, the alert rules and the action group.')
param location string

@description('Tags for every resource.')
param tags object

@description('Unique suffix of the deployment (names of the alert rules and the action group).')
param resourceToken string

@description('Name of the Application Insights component the app logs to.')
param applicationInsightsName string

@description('E-mail address of the alert receiver. Empty: an action group without receivers.')
param alertEmail string = ''

@description('Hours an enabled user may go without a successful sync before the alert fires.')
@minValue(1)
@maxValue(47)
param staleUserHours int = 24

@description('Name of the poison queue of the worker queue (the host moves failed jobs there).')
param poisonQueueName string

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appInsights.id, 'bc-contact-sync-runs')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'BC Contact Sync runs'
    category: 'workbook'
    sourceId: appInsights.id
    serializedData: replace(loadTextContent('../monitoring/run-history.workbook.json'), '__APP_INSIGHTS_ID__', appInsights.id)
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${resourceToken}'
  location: 'global'
  tags: tags
  properties: {
    // At most 12 characters: the short name is what an SMS or e-mail subject shows.
    groupShortName: 'ContactSync'
    enabled: true
    emailReceivers: empty(alertEmail) ? [] : [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

// Evaluated every 15 minutes, like the default timer; a failed run shows within one tick.
resource failedRunsAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-failed-runs-${resourceToken}'
  location: location
  tags: tags
  properties: {
    displayName: 'BC Contact Sync: failed runs'
    description: 'A sync run ended with status failed. The run report (GET /api/sync/runs/{runId}) says why.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: loadTextContent('../monitoring/alert-failed-runs.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource poisonQueueAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-poison-queue-${resourceToken}'
  location: location
  tags: tags
  properties: {
    displayName: 'BC Contact Sync: job moved to the poison queue'
    description: 'A sync job failed on every attempt and the Functions host moved it to ${poisonQueueName}. Its run report says why; fix the cause, then run the user again.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: replace(loadTextContent('../monitoring/alert-poison-queue.kql'), '__POISON_QUEUE__', poisonQueueName)
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

// Graph subscriptions that keep failing (BEHAVIOUR §8.2): two or more failures within an hour (four timer
// ticks), so one transient error does not page anyone.
resource subscriptionsAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-subscriptions-${resourceToken}'
  location: location
  tags: tags
  properties: {
    displayName: 'BC Contact Sync: Graph change notifications keep failing'
    description: 'The timer could not create or renew Graph subscriptions. Check that Microsoft Graph can reach SYNC_PUBLIC_URL over HTTPS and that the app still has Contacts.ReadWrite. Users fall back to the regular schedule meanwhile.'
    severity: 3
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: loadTextContent('../monitoring/alert-subscriptions-failing.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

// Hourly, over the last two days (the longest query range a log alert takes): users the timer still queues
// whose last successful sync is older than staleUserHours.
resource staleUsersAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-stale-users-${resourceToken}'
  location: location
  tags: tags
  properties: {
    displayName: 'BC Contact Sync: users not synced for ${staleUserHours} hours'
    description: 'An enabled user has had no successful sync for ${staleUserHours} hours. The workbook shows the user\'s runs; the validate endpoint (POST /api/users/{user}/validate) says what is wrong.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT1H'
    overrideQueryTimeRange: 'P2D'
    criteria: {
      allOf: [
        {
          query: replace(loadTextContent('../monitoring/alert-stale-users.kql'), '__STALE_USER_HOURS__', string(staleUserHours))
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output workbookId string = workbook.id
output actionGroupId string = actionGroup.id
