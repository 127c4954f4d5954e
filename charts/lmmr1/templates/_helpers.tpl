{{/* Names, truncated to 63 characters (the DNS label limit). */}}
{{- define "lmmr1.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lmmr1.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s-operator" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* fullname plus a suffix, still within 63 characters: (dict "root" . "suffix" "x") */}}
{{- define "lmmr1.suffixed" -}}
{{- $room := sub 62 (len .suffix) | int }}
{{- printf "%s-%s" (include "lmmr1.fullname" .root | trunc $room | trimSuffix "-") .suffix }}
{{- end }}

{{- define "lmmr1.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lmmr1.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmmr1.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "lmmr1.labels" -}}
helm.sh/chart: {{ include "lmmr1.chart" . }}
{{ include "lmmr1.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lmmr1
{{- end }}

{{- define "lmmr1.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmmr1.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lmmr1.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Cross-value checks that a schema cannot express; fail with what to change. */}}
{{- define "lmmr1.validate" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled=true needs metrics.enabled=true" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled=true needs metrics.service.enabled=true" }}
{{- end }}
{{- if eq (int .Values.health.port) (int .Values.metrics.port) }}
{{- fail "health.port and metrics.port must differ" }}
{{- end }}
{{- if .Values.watchNamespace }}
{{- fail (printf "watchNamespace was replaced by watchNamespaces, a list: set watchNamespaces={%s} (and unset watchNamespace)" .Values.watchNamespace) }}
{{- end }}
{{- if and .Values.watchAllNamespaces .Values.watchNamespaces }}
{{- fail "watchAllNamespaces=true serves every namespace: leave watchNamespaces empty, or set watchAllNamespaces=false to serve only the listed namespaces" }}
{{- end }}
{{- /* The API versions the cluster serves (helm template: pass --api-versions). */ -}}
{{- if .Values.kueue.enabled }}
{{- $missing := list }}
{{- if not (.Capabilities.APIVersions.Has "jobset.x-k8s.io/v1alpha2/JobSet") }}
{{- $missing = append $missing "JobSet v0.11.1 or later (jobset.x-k8s.io/v1alpha2 JobSet)" }}
{{- end }}
{{- if not (.Capabilities.APIVersions.Has "kueue.x-k8s.io/v1beta2/Workload") }}
{{- $missing = append $missing "Kueue v0.17.0 or later (kueue.x-k8s.io/v1beta2 Workload)" }}
{{- end }}
{{- if $missing }}
{{- fail (printf "kueue.enabled=true, but this cluster does not serve: %s. Install them first, or set kueue.enabled=false (then runs must not set spec.queueName)" (join "; " $missing)) }}
{{- end }}
{{- end }}
{{- if and (not .Values.rbac.create) .Values.serviceAccount.create }}
{{- /* allowed: RBAC granted out of band to a chart-made account */ -}}
{{- end }}
{{- end }}

{{/* The namespaces the operator serves, as a JSON list (empty in cluster-wide mode):
     watchNamespaces, or the release namespace when it is empty. */}}
{{- define "lmmr1.watchNamespaces" -}}
{{- if .Values.watchAllNamespaces }}
{{- list | toJson }}
{{- else }}
{{- default (list .Release.Namespace) .Values.watchNamespaces | toJson }}
{{- end }}
{{- end }}

{{/* User-facing ClusterRole names: "<release>-edit" ("lmmr1-edit" for release lmmr1),
     per release so that two releases (each serving its namespaces) do not collide. */}}
{{- define "lmmr1.userRole" -}}
{{- $base := ternary .root.Release.Name (printf "%s-%s" .root.Release.Name (include "lmmr1.name" .root)) (contains (include "lmmr1.name" .root) .root.Release.Name) }}
{{- printf "%s-%s" ($base | trunc (sub 62 (len .suffix) | int) | trimSuffix "-") .suffix }}
{{- end }}
