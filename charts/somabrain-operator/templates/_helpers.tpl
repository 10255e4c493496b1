{{/*
Names and labels shared by every object of the release.
*/}}

{{/* The objects' name: fullnameOverride, else the release name when it already holds
the chart's name, else <release>-<chart>; 63 characters at most (a label value). */}}
{{- define "somabrain-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* What selects the operator's pods; never changes across upgrades (a Deployment's
selector is immutable). */}}
{{- define "somabrain-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "somabrain-operator.labels" -}}
{{ include "somabrain-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: somabrain
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "somabrain-operator.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "somabrain-operator.fullname" .) -}}
{{- end -}}

{{- define "somabrain-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
