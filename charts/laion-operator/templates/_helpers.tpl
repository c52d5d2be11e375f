{{/* Chart name, or nameOverride. */}}
{{- define "laion-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless the release name holds it. */}}
{{- define "laion-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "laion-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "laion-operator.labels" -}}
helm.sh/chart: {{ include "laion-operator.chart" . }}
{{ include "laion-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: laion-operator
{{- end }}

{{/* Labels that select the operator pods. */}}
{{- define "laion-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "laion-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "laion-operator.serviceAccountName" -}}
{{- default (include "laion-operator.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "laion-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Ray worker image; the default rayJobTemplate refers to it. */}}
{{- define "laion-operator.rayWorkerImage" -}}
{{- printf "%s:%s" .Values.rayWorkerImage.repository (default .Chart.AppVersion .Values.rayWorkerImage.tag) }}
{{- end }}

{{- define "laion-operator.peeringName" -}}
{{- default (include "laion-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* "true" when the operator watches every namespace (no watchNamespaces). */}}
{{- define "laion-operator.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The rules for handling parts, granted cluster-wide (ClusterRole) when watching all namespaces or in
each watched namespace (Role). tests/control/test_chart.py holds the same list: a rule added here fails the
tests until it is added there, with the reason.
*/}}
{{- define "laion-operator.partRules" -}}
# kopf: watch the parts, patch their finalizers and handler progress; the operator: create a
# dataset's parts, set their spec from its template, and delete those a shrunk range leaves outside.
- apiGroups: [laion-operator.io]
  resources: [laionparts]
  verbs: [get, list, watch, patch, update, create, delete]
# kopf: watch the datasets, patch their finalizers and handler progress.
- apiGroups: [laion-operator.io]
  resources: [laiondatasets]
  verbs: [get, list, watch, patch, update]
# The operator: write each dataset's status.
- apiGroups: [laion-operator.io]
  resources: [laiondatasets/status]
  verbs: [get, patch, update]
# The operator: parts name their dataset as owner with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
- apiGroups: [laion-operator.io]
  resources: [laiondatasets/finalizers]
  verbs: [update]
# The operator: write each part's status.
- apiGroups: [laion-operator.io]
  resources: [laionparts/status]
  verbs: [get, patch, update]
# kopf and the operator: post events about the parts.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.credentialsSecrets }}
# The operator: read the parts' object storage credentials (these Secret names only).
- apiGroups: [""]
  resources: [secrets]
  resourceNames: {{ toJson .Values.credentialsSecrets }}
  verbs: [get]
{{- end }}
{{- if eq .Values.operator.config.mode "kuberay" }}
# kuberay mode: one RayJob per part, owned by the part.
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [create, get, list, watch, patch, delete]
# kuberay mode: set blockOwnerDeletion on the RayJobs' ownerReferences to their part.
- apiGroups: [laion-operator.io]
  resources: [laionparts/finalizers]
  verbs: [update]
{{- end }}
{{- end }}
