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

{{/* The admin API's objects: <fullname>-admin, 63 characters at most. */}}
{{- define "somabrain-operator.admin.fullname" -}}
{{- printf "%s-admin" (include "somabrain-operator.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}

{{/* What selects the admin API's pods: a name of its own, so that the operator's
selector (name and instance) never matches them. */}}
{{- define "somabrain-operator.admin.selectorLabels" -}}
app.kubernetes.io/name: somabrain-admin
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "somabrain-operator.admin.labels" -}}
{{ include "somabrain-operator.admin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: admin
app.kubernetes.io/part-of: somabrain
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The Secret whose DATABASE_URL the admin API reads: publishers' by default. */}}
{{- define "somabrain-operator.admin.connectionSecret" -}}
{{- .Values.admin.connectionSecret | default .Values.publisher.connectionSecret -}}
{{- end -}}
