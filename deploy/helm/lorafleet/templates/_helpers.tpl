{{/* Names, labels and the small pieces the templates share. */}}

{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lorafleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.coordinator" -}}
{{- printf "%s-coordinator" (include "lorafleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lorafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lorafleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.s3SecretName" -}}
{{- default (printf "%s-s3" (include "lorafleet.fullname" .)) .Values.s3.existingSecret -}}
{{- end -}}

{{- define "lorafleet.authSecretName" -}}
{{- default (printf "%s-auth" (include "lorafleet.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "lorafleet.workerTokenSecretName" -}}
{{- default (printf "%s-worker-token" (include "lorafleet.fullname" .)) .Values.auth.workerToken.existingSecret -}}
{{- end -}}

{{/* The coordinator's URL as workers see it. */}}
{{- define "lorafleet.coordinatorUrl" -}}
{{- printf "%s://%s:%d" (ternary "https" "http" .Values.tls.enabled) (include "lorafleet.coordinator" .) (int .Values.coordinator.grpcPort) -}}
{{- end -}}

{{/* One pool's Deployment name: (dict "root" $ "pool" $pool). */}}
{{- define "lorafleet.poolName" -}}
{{- printf "%s-worker-%s" (include "lorafleet.fullname" .root) .pool.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* One pool's autoscaling settings: the top-level ones with the pool's overrides. */}}
{{- define "lorafleet.poolAutoscaling" -}}
{{- $as := mergeOverwrite (deepCopy .root.Values.autoscaling) (deepCopy (default dict .pool.autoscaling)) -}}
{{- toYaml $as -}}
{{- end -}}

{{/* The queue metric a pool scales on. */}}
{{- define "lorafleet.poolQuery" -}}
{{- $as := include "lorafleet.poolAutoscaling" . | fromYaml -}}
{{- if $as.query -}}
{{- $as.query -}}
{{- else -}}
{{- printf "sum(lorafleet_queued_jobs{device=%q})" .pool.device -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}
