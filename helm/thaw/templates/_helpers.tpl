{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "thaw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, with the chart's unless it holds it. */}}
{{- define "thaw.fullname" -}}
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

{{- define "thaw.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "thaw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "thaw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "thaw.labels" -}}
helm.sh/chart: {{ include "thaw.chart" . }}
{{ include "thaw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "thaw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "thaw.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
thaw.toml: the user's `config` with the settings the chart owns (where the
HTTP endpoints listen, where the model is mounted). Numbers: Helm reads YAML
numbers as floats, and toToml would write 20 as 20.0, which the engine's
integer settings refuse; thaw.toml.value writes whole numbers as integers.
*/}}
{{- define "thaw.config" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- $http := default dict (get $cfg "http") }}
{{- $_ := set $http "listen" (printf "0.0.0.0:%v" (int .Values.service.port)) }}
{{- $_ := set $cfg "http" $http }}
{{- $model := default dict (get $cfg "model") }}
{{- $_ := set $model "dir" .Values.model.mountPath }}
{{- $_ := set $cfg "model" $model }}
{{- if .Values.snapshots.enabled }}
{{- $snap := default dict (get $cfg "snapshot") }}
{{- $_ := set $snap "dir" .Values.snapshots.mountPath }}
{{- $_ := set $snap "every_secs" .Values.snapshots.everySecs }}
{{- $_ := set $snap "keep" .Values.snapshots.keep }}
{{- $_ := set $cfg "snapshot" $snap }}
{{- end }}
{{- include "thaw.toml.table" (dict "prefix" "" "table" $cfg) }}
{{- end }}

{{/* One TOML table: its scalar keys first, then its sub-tables. */}}
{{- define "thaw.toml.table" -}}
{{- $prefix := .prefix }}
{{- $table := .table }}
{{- if $prefix }}
{{ printf "[%s]" $prefix }}
{{- end }}
{{- range $k := keys $table | sortAlpha }}
{{- $v := get $table $k }}
{{- if not (kindIs "map" $v) }}
{{ printf "%s = %s" (include "thaw.toml.key" $k) (include "thaw.toml.value" $v) }}
{{- end }}
{{- end }}
{{- range $k := keys $table | sortAlpha }}
{{- $v := get $table $k }}
{{- if kindIs "map" $v }}
{{- $sub := ternary (printf "%s.%s" $prefix (include "thaw.toml.key" $k)) (include "thaw.toml.key" $k) (ne $prefix "") }}
{{- include "thaw.toml.table" (dict "prefix" $sub "table" $v) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A TOML key: bare when it can be, else quoted (e.g. "security.protocol"). */}}
{{- define "thaw.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* A TOML value: strings quoted (JSON escapes are TOML's), whole numbers as integers, lists element by element. */}}
{{- define "thaw.toml.value" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) }}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "thaw.toml.value" $e }}{{ end }}]
{{- else if kindIs "invalid" . }}{{ fail "thaw.toml: a null setting; leave the key out instead" }}
{{- else }}{{ fail (printf "thaw.toml: unsupported value %v (%s)" . (kindOf .)) }}
{{- end }}
{{- end }}
