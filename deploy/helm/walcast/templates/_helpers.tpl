{{- define "walcast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "walcast.fullname" -}}
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

{{- define "walcast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "walcast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "walcast.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "walcast.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding the admin token, or "" without a token. */}}
{{- define "walcast.tokenSecret" -}}
{{- if .Values.admin.token.existingSecret }}
{{- .Values.admin.token.existingSecret }}
{{- else if .Values.admin.token.value }}
{{- printf "%s-admin-token" (include "walcast.fullname" .) }}
{{- end }}
{{- end }}

{{/* http or https for the probes and the ServiceMonitor. */}}
{{- define "walcast.scheme" -}}
{{- if .Values.admin.tls.existingSecret }}https{{ else }}http{{ end }}
{{- end }}

{{/* Refuses contradictory config sources. */}}
{{- define "walcast.validate" -}}
{{- if and .Values.config.existingConfigMap .Values.config.existingSecret }}
{{- fail "config: set existingConfigMap or existingSecret, not both" }}
{{- end }}
{{- if and (not .Values.config.existingConfigMap) (not .Values.config.existingSecret) (not .Values.config.toml) }}
{{- fail "config: give the walcast.toml as config.toml, or name config.existingConfigMap or config.existingSecret" }}
{{- end }}
{{- if and .Values.admin.token.value (lt (len .Values.admin.token.value) 16) }}
{{- fail "admin.token.value: the token must be 16 characters or more (walcast refuses shorter ones)" }}
{{- end }}
{{- if and .Values.admin.token.value .Values.admin.token.existingSecret }}
{{- fail "admin.token: set existingSecret or value, not both" }}
{{- end }}
{{- if not (has .Values.standby.antiAffinity (list "preferred" "required")) }}
{{- fail "standby.antiAffinity: preferred or required" }}
{{- end }}
{{- end }}
