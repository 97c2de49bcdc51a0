// loraship: a Triton endpoint on Azure Container Apps (GPU), for people who provision by hand.
// Same resources as `loraship azure provision` (which builds them with the Azure SDK):
//   az deployment group create -g RG -f infra/provision/inference.bicep \
//     -p @infra/provision/inference.parameters.json -p apiKey=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
// The parameter names of the AI Toolkit template are kept; loraship's additions follow them.

@description('Commands run by /bin/bash -c, joined with "; ". Empty: loraship\'s Triton start command.')
param defaultCommands array = []
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 1
param location string = resourceGroup().location
@minLength(3)
@maxLength(24)
param storageAccountName string
param fileShareName string = 'loraship'
param acaEnvironmentName string = 'loraship-env'
param acaEnvironmentStorageName string = 'loraship-files'
param acaAppName string = 'loraship-triton'
param acaLogAnalyticsName string = 'loraship-logs'

@allowed(['Consumption-GPU-NC8as-T4', 'Consumption-GPU-NC24-A100', 'NC24-A100', 'NC48-A100', 'NC96-A100'])
param gpuProfileType string = 'Consumption-GPU-NC8as-T4'
@description('Dedicated profiles only: minimum node count.')
param gpuProfileMinimumCount int = 0
@minValue(0)
@maxValue(1000)
param minimumInstanceCount int = 1
@minValue(1)
@description('HTTP requests in flight per replica before another starts: the model\'s instances x in-flight batch (`loraship repo --instances --max-batch-size`).')
param scaleConcurrentRequests int = 8
param tritonImageTag string = '24.12'
param apiKeyHeader string = 'x-api-key'
param apiKeySecretName string = 'triton-api-key'
@secure()
@minLength(16)
@description('The endpoint\'s API key; stored only as an ACA secret.')
param apiKey string
@description('Triton\'s HTTP API, on the replica\'s loopback behind the frontend.')
param httpPort int = 8000
@description('The public ingress port: the OpenAI API (/v1) and Triton\'s HTTP API (/v2), behind one key.')
param frontendPort int = 8080
param grpcPort int = 8001
param metricsPort int = 8002
param mountPath string = '/mount'
param modelRepositoryDir string = 'model_repository'
param wheelsDir string = 'wheels'
@minValue(10)
@maxValue(2400)
@description('Seconds the startup probe allows for model load (period = ceil(x / 10), at most 240).')
param modelLoadSeconds int = 600

var tags = { 'managed-by': 'loraship' }
var dedicated = !startsWith(gpuProfileType, 'Consumption-')
var profileResources = {
  'Consumption-GPU-NC8as-T4': { cpu: json('8.0'), memory: '56Gi' }
  'Consumption-GPU-NC24-A100': { cpu: json('24.0'), memory: '220Gi' }
  'NC24-A100': { cpu: json('24.0'), memory: '220Gi' }
  'NC48-A100': { cpu: json('48.0'), memory: '440Gi' }
  'NC96-A100': { cpu: json('96.0'), memory: '880Gi' }
}
var restrictedApis = 'metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging:${apiKeyHeader}=\${LORASHIP_API_KEY}'
var tritonArgs = '--model-repository=${mountPath}/${modelRepositoryDir} --model-control-mode=none --http-port=${httpPort} --grpc-port=${grpcPort} --metrics-port=${metricsPort}'
var directArgs = '--model-repository=${mountPath}/${modelRepositoryDir} --model-control-mode=none --http-port=${frontendPort} --grpc-port=${grpcPort} --metrics-port=${metricsPort}'
var lorashipCommands = [
  'set -e'
  'test -n "$LORASHIP_API_KEY"'
  'if [ -f ${mountPath}/${wheelsDir}/start.sh ]; then exec sh ${mountPath}/${wheelsDir}/start.sh --frontend-port=${frontendPort} ${tritonArgs}; fi'
  'exec tritonserver ${directArgs} --http-restricted-api=${restrictedApis} --grpc-restricted-protocol=${restrictedApis}'
]
var commands = empty(defaultCommands) ? lorashipCommands : defaultCommands

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-01-01' = {
  name: storageAccountName
  location: location
  tags: tags
  sku: { name: 'Standard_LRS' }
  kind: 'StorageV2'
  properties: {
    largeFileSharesState: 'Enabled'
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    supportsHttpsTrafficOnly: true
  }
}

resource fileService 'Microsoft.Storage/storageAccounts/fileServices@2023-01-01' = {
  parent: storageAccount
  name: 'default'
  properties: {
    shareDeleteRetentionPolicy: { enabled: true, days: 7 }
  }
}

resource fileShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-01-01' = {
  parent: fileService
  name: fileShareName
  properties: {
    shareQuota: 1024
    enabledProtocols: 'SMB'
  }
}

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2022-10-01' = {
  name: acaLogAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: acaEnvironmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logAnalytics.properties.customerId
        sharedKey: logAnalytics.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      { name: 'Consumption', workloadProfileType: 'Consumption' }
      dedicated ? {
        name: 'GPU'
        workloadProfileType: gpuProfileType
        minimumCount: gpuProfileMinimumCount
        maximumCount: maximumInstanceCount
      } : {
        name: 'GPU'
        workloadProfileType: gpuProfileType
      }
    ]
  }
}

resource environmentStorage 'Microsoft.App/managedEnvironments/storages@2024-03-01' = {
  parent: environment
  name: acaEnvironmentStorageName
  properties: {
    azureFile: {
      accountName: storageAccount.name
      accountKey: storageAccount.listKeys().keys[0].value
      shareName: fileShare.name
      accessMode: 'ReadOnly'
    }
  }
}

resource app 'Microsoft.App/containerApps@2024-03-01' = {
  name: acaAppName
  location: location
  tags: tags
  dependsOn: [environmentStorage]
  properties: {
    environmentId: environment.id
    workloadProfileName: 'GPU'
    configuration: {
      activeRevisionsMode: 'Single'
      secrets: [
        { name: apiKeySecretName, value: apiKey }
      ]
      ingress: {
        external: true
        targetPort: frontendPort
        transport: 'Auto'
        allowInsecure: false
        traffic: [
          { latestRevision: true, weight: 100 }
        ]
        additionalPortMappings: [
          { external: false, targetPort: grpcPort, exposedPort: grpcPort }
        ]
      }
    }
    template: {
      containers: [
        {
          name: 'triton'
          image: 'nvcr.io/nvidia/tritonserver:${tritonImageTag}-py3'
          command: ['/bin/bash', '-c', join(commands, '; ')]
          env: [
            { name: 'LORASHIP_API_KEY', secretRef: apiKeySecretName }
          ]
          resources: profileResources[gpuProfileType]
          probes: [
            {
              type: 'Startup'
              httpGet: { path: '/v2/health/ready', port: frontendPort, scheme: 'HTTP' }
              initialDelaySeconds: 10
              periodSeconds: (modelLoadSeconds + 9) / 10
              timeoutSeconds: 5
              failureThreshold: 10
            }
            {
              type: 'Liveness'
              httpGet: { path: '/v2/health/live', port: frontendPort, scheme: 'HTTP' }
              periodSeconds: 10
              timeoutSeconds: 5
              failureThreshold: 3
            }
            {
              type: 'Readiness'
              httpGet: { path: '/v2/health/ready', port: frontendPort, scheme: 'HTTP' }
              periodSeconds: 10
              timeoutSeconds: 5
              failureThreshold: 3
            }
          ]
          volumeMounts: [
            { volumeName: 'models', mountPath: mountPath }
          ]
        }
      ]
      volumes: [
        { name: 'models', storageType: 'AzureFile', storageName: environmentStorage.name }
      ]
      scale: {
        minReplicas: minimumInstanceCount
        maxReplicas: maximumInstanceCount
        rules: [
          {
            name: 'http-concurrency'
            http: { metadata: { concurrentRequests: string(scaleConcurrentRequests) } }
          }
        ]
      }
    }
  }
}

output SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP_NAME string = resourceGroup().name
output STORAGE_ACCOUNT_NAME string = storageAccount.name
output FILE_SHARE_NAME string = fileShare.name
output ACA_APP_NAME string = app.name
output ACA_APP_ENDPOINT string = 'https://${app.properties.configuration.ingress.fqdn}'
