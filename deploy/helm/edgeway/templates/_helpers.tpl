{{- define "edgeway.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edgeway.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "edgeway.labels" -}}
app.kubernetes.io/name: {{ include "edgeway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "edgeway.selector" -}}
app.kubernetes.io/name: {{ include "edgeway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{/* Where REDIS_URL comes from: an existing Secret, the chart's Secret, the in-cluster Redis, or nowhere. */}}
{{- define "edgeway.redisMode" -}}
{{- if .Values.redis.existingSecret -}}existing
{{- else if .Values.redis.url -}}chart
{{- else if .Values.redis.inCluster.enabled -}}incluster
{{- else -}}none
{{- end -}}
{{- end -}}

{{- define "edgeway.redisPasswordSecret" -}}
{{- .Values.redis.inCluster.passwordSecret | default (printf "%s-redis" (include "edgeway.fullname" .)) -}}
{{- end -}}
