{{- define "nsredirect.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The objects' name: the release name when it already says nsredirect (so
`helm install nsredirect` names everything nsredirect, as deploy/kubernetes
does), else RELEASE-nsredirect.
*/}}
{{- define "nsredirect.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "nsredirect.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nsredirect.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nsredirect.labels" -}}
{{ include "nsredirect.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of an optional object (PodMonitor, ...): the chart's, then those its
values add (e.g. the release label a Prometheus selects monitors by), which
win on a clash.
*/}}
{{- define "nsredirect.extraLabels" -}}
{{- $ctx := index . 0 }}
{{- merge (dict) (index . 1) (include "nsredirect.labels" $ctx | fromYaml) | toYaml }}
{{- end }}

{{/*
The scrape job the alert rules select, whatever the release is called, and
the node each daemon runs on, which the dashboard and the alerts name.
*/}}
{{- define "nsredirect.monitorRelabelings" -}}
- action: replace
  targetLabel: job
  replacement: nsredirect
- action: replace
  sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
{{- end }}

{{- define "nsredirect.scrapeSettings" -}}
path: /metrics
{{- with .interval }}
interval: {{ . }}
{{- end }}
{{- with .scrapeTimeout }}
scrapeTimeout: {{ . }}
{{- end }}
{{- end }}
