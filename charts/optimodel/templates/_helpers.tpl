{{/* Chart name, overridable. */}}
{{- define "optimodel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix for every resource: <release>-optimodel, or the release name when it already says optimodel. */}}
{{- define "optimodel.fullname" -}}
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

{{- define "optimodel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "optimodel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "optimodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels on every object the chart renders. */}}
{{- define "optimodel.labels" -}}
helm.sh/chart: {{ include "optimodel.chart" . }}
{{ include "optimodel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: optimodel
{{- end }}

{{- define "optimodel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "optimodel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag for one of operator / builder / serving; the tag defaults to appVersion. */}}
{{- define "optimodel.image" -}}
{{- $img := index .root.Values.image .which -}}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) -}}
{{- end }}

{{/* Name of the PVC the chart creates. */}}
{{- define "optimodel.storeClaimName" -}}
{{- printf "%s-store" (include "optimodel.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* true when the chart builds the store URI itself and creates the PVC. */}}
{{- define "optimodel.createPvc" -}}
{{- if and (not .Values.store.uri) (not .Values.store.pvc.existingClaim) .Values.store.pvc.create }}true{{ end }}
{{- end }}

{{/* The effective store URI (OPTIMODEL_STORE_URI). */}}
{{- define "optimodel.storeUri" -}}
{{- if .Values.store.uri }}
{{- .Values.store.uri }}
{{- else if .Values.store.pvc.existingClaim }}
{{- printf "pvc://%s/%s" .Values.store.pvc.existingClaim (trimPrefix "/" .Values.store.pvc.subPath) | trimSuffix "/" }}
{{- else if .Values.store.pvc.create }}
{{- printf "pvc://%s/%s" (include "optimodel.storeClaimName" .) (trimPrefix "/" .Values.store.pvc.subPath) | trimSuffix "/" }}
{{- else }}
{{- fail "no artifact store: set store.uri (file://, pvc://<claim>/<path>, s3://, gs://), store.pvc.existingClaim, or store.pvc.create=true" }}
{{- end }}
{{- end }}

{{/* The claim named by a pvc:// store URI, empty for other schemes. */}}
{{- define "optimodel.storeUriClaim" -}}
{{- $uri := include "optimodel.storeUri" . }}
{{- if hasPrefix "pvc://" $uri }}
{{- $claim := index (splitList "/" (trimPrefix "pvc://" $uri)) 0 }}
{{- if not $claim }}{{ fail (printf "store.uri %q needs a claim name: pvc://<claim>/<path>" $uri) }}{{ end }}
{{- $claim }}
{{- end }}
{{- end }}

{{/* The one pull policy the operator gives builder and serving pods (OPTIMODEL_IMAGE_PULL_POLICY). */}}
{{- define "optimodel.workloadPullPolicy" -}}
{{- if ne .Values.image.builder.pullPolicy .Values.image.serving.pullPolicy }}
{{- fail (printf "image.builder.pullPolicy (%s) and image.serving.pullPolicy (%s) must be equal: the operator gives builder and serving pods one pull policy (OPTIMODEL_IMAGE_PULL_POLICY)" .Values.image.builder.pullPolicy .Values.image.serving.pullPolicy) }}
{{- end }}
{{- .Values.image.builder.pullPolicy }}
{{- end }}
