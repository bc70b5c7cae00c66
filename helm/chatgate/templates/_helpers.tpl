{{/*
Names and labels.
*/}}
{{- define "chatgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name alone when it already
contains the chart name. Truncated to leave room for the "-admin" and
"-redis" suffixes within the 63-character DNS label limit.
*/}}
{{- define "chatgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chatgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chatgate.labels" -}}
helm.sh/chart: {{ include "chatgate.chart" . }}
{{ include "chatgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatgate
{{- end }}

{{- define "chatgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "chatgate.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatgate.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "chatgate.redis.labels" -}}
helm.sh/chart: {{ include "chatgate.chart" . }}
{{ include "chatgate.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.trial.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatgate
{{- end }}

{{- define "chatgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: repository:tag@digest when
a digest is given (the digest decides what is pulled), repository:tag otherwise.
Call with (dict "image" .Values.image "default" .Chart.AppVersion).
*/}}
{{- define "chatgate.imageRef" -}}
{{- $tag := default .default .image.tag | toString }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* "true" when a value is neither null, absent nor the empty string (0 counts as set). */}}
{{- define "chatgate.isSet" -}}
{{- if not (or (kindIs "invalid" .) (eq (toString .) "")) }}true{{ end }}
{{- end }}

{{/*
Secret names.
*/}}
{{- define "chatgate.redis.secretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- printf "%s-redis-url" (include "chatgate.fullname" .) }}
{{- end }}
{{- end }}

{{- define "chatgate.redis.secretKey" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecretKey }}
{{- else -}}
REDIS_URL
{{- end }}
{{- end }}

{{- define "chatgate.auth.secretName" -}}
{{- if .Values.auth.jwt.existingSecret }}
{{- .Values.auth.jwt.existingSecret }}
{{- else }}
{{- printf "%s-auth" (include "chatgate.fullname" .) }}
{{- end }}
{{- end }}

{{/* Whether the chart mounts JWT key material (auth on). */}}
{{- define "chatgate.auth.mountKeys" -}}
{{- if and .Values.auth.enabled (or .Values.auth.jwt.existingSecret .Values.auth.jwt.secret .Values.auth.jwt.publicKeys) }}true{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the pod must outlive the preStop sleep, the
drain (server.shutdown_grace_secs) and the binary's background-task stop
(up to 5 s). Computed with 5 s of headroom when not set; refused when set
too low.
*/}}
{{- define "chatgate.terminationGracePeriodSeconds" -}}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- $grace := int .Values.config.server.shutdown_grace_secs }}
{{- $minimum := add $preStop $grace 5 }}
{{- if eq (toString .Values.terminationGracePeriodSeconds) "" }}
{{- add $minimum 5 }}
{{- else }}
{{- $set := int .Values.terminationGracePeriodSeconds }}
{{- if lt $set $minimum }}
{{- fail (printf "terminationGracePeriodSeconds=%d is too short: it must be at least lifecycle.preStopSleepSeconds (%d) + config.server.shutdown_grace_secs (%d) + 5 = %d, or the kubelet kills pods before their WebSockets have drained" $set $preStop $grace $minimum) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/*
One TOML value from a values entry. Helm reads YAML numbers as float64, which
TOML would print as 2048.0 and chatgate would refuse for an integer key, so
whole numbers are printed as integers. Strings are JSON-quoted, which is a
valid TOML basic string.
*/}}
{{- define "chatgate.tomlValue" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}
{{- toJson $v }}
{{- else if kindIs "bool" $v }}
{{- ternary "true" "false" $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) }}
{{- $v }}
{{- else if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (include "chatgate.tomlValue" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- fail (printf "config: a value of type %s cannot be written to TOML (use strings, numbers, booleans or lists)" (kindOf $v)) }}
{{- end }}
{{- end }}

{{/*
The configuration file: values.config, section by section, plus the auth
decision. Keys are sorted, so the file (and its checksum) is stable.
*/}}
{{- define "chatgate.configToml" -}}
# chatgate configuration rendered by the Helm chart from values.config.
# Keys and meanings: config/default.toml in the chatgate project.
# Secrets (the Redis URL, JWT keys) are never written here.
{{- range $section, $body := .Values.config }}
{{- if not (kindIs "map" $body) }}
{{- fail (printf "config.%s must be a map of keys (a [%s] section)" $section $section) }}
{{- end }}
{{- if eq $section "auth" }}
{{- fail "config.auth is set by the chart from auth.enabled: set auth.enabled (and auth.allowInsecureDisabled) instead" }}
{{- end }}
{{- if and (eq $section "redis") (hasKey $body "url") }}
{{- fail "config.redis.url would put the Redis URL (and its password) in a ConfigMap: use redis.url or redis.existingSecret instead" }}
{{- end }}

[{{ $section }}]
{{- range $key, $value := $body }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "chatgate.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}

[auth]
enabled = {{ ternary "true" "false" .Values.auth.enabled }}
{{- end }}

{{/*
Checks that refuse an unsafe or inconsistent release. Included by the
Deployment, so every render runs them.
*/}}
{{- define "chatgate.validate" -}}
{{- if and (not .Values.auth.enabled) (not .Values.auth.allowInsecureDisabled) }}
{{- fail "auth.enabled=false lets anyone who reaches the service post as anyone. Set auth.allowInsecureDisabled=true to confirm that an authenticating proxy protects it" }}
{{- end }}
{{- if and .Values.auth.enabled (not (or .Values.auth.jwt.existingSecret .Values.auth.jwt.secret .Values.auth.jwt.publicKeys)) }}
{{- fail "auth.enabled=true needs key material: set auth.jwt.existingSecret, auth.jwt.secret or auth.jwt.publicKeys. (The current chatgate build has no token verifier yet and refuses to start with auth enabled: until one ships, use auth.enabled=false with auth.allowInsecureDisabled=true behind an authenticating proxy.)" }}
{{- end }}
{{- range .Values.extraArgs }}
{{- if hasPrefix "--dev" (toString .) }}
{{- fail "extraArgs: --dev (development mode: authentication off, CORS open) is never allowed in a cluster" }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- $name := toString .name }}
{{- if and (hasPrefix "CHATGATE_" $name) (not (has $name (list "CHATGATE_ENVIRONMENT" "CHATGATE_CONFIG_DIR"))) }}
{{- $path := trimPrefix "CHATGATE_" $name | lower }}
{{- $parts := splitList "__" $path }}
{{- $known := false }}
{{- if eq (len $parts) 2 }}
{{- $section := index $parts 0 }}
{{- $key := index $parts 1 }}
{{- if or (eq $path "redis__url") (eq $path "auth__enabled") }}
{{- fail (printf "extraEnv: %s is set by the chart (use redis.url / redis.existingSecret, or auth.enabled)" $name) }}
{{- end }}
{{- $known = and (hasKey $.Values.config $section) (hasKey (index $.Values.config $section) $key) }}
{{- end }}
{{- if not $known }}
{{- fail (printf "extraEnv: %s is not CHATGATE_<SECTION>__<KEY> for a key of config/default.toml; chatgate would refuse to start" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $backend := .Values.config.store.backend | default "auto" }}
{{- $sources := 0 }}
{{- if .Values.redis.url }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.redis.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.redis.trial.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if gt (int $sources) 1 }}
{{- fail "redis: set only one of redis.url, redis.existingSecret and redis.trial.enabled" }}
{{- end }}
{{- if and (eq (int $sources) 0) (ne $backend "memory") }}
{{- fail "redis: no Redis configured. Set redis.url (stored in a Secret), redis.existingSecret (a Secret holding the URL), or redis.trial.enabled=true for a throwaway single-pod Redis" }}
{{- end }}
{{- if and (eq $backend "memory") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "config.store.backend=memory keeps chat state inside one process: replicas would not see each other. Use Redis, or replicaCount=1 without autoscaling" }}
{{- end }}
{{- if and .Values.redis.url (not (or (hasPrefix "redis://" .Values.redis.url) (hasPrefix "rediss://" .Values.redis.url))) }}
{{- fail "redis.url must start with redis:// or rediss://" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (not (include "chatgate.isSet" (get $pdb "minAvailable"))) (not (include "chatgate.isSet" (get $pdb "maxUnavailable"))) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.admin.service.enabled) }}
{{- fail "serviceMonitor.enabled needs admin.service.enabled: the ServiceMonitor scrapes the admin Service" }}
{{- end }}
{{- if and .Values.ingress.enabled .Values.ingress.nginx.enabled (le (int .Values.ingress.nginx.timeoutSeconds) (int .Values.config.ws.ping_interval_secs)) }}
{{- fail "ingress.nginx.timeoutSeconds must exceed config.ws.ping_interval_secs, or the proxy cuts idle WebSockets between pings" }}
{{- end }}
{{- if eq (int .Values.config.server.port) (int .Values.admin.port) }}
{{- fail "admin.port must differ from config.server.port" }}
{{- end }}
{{- $_ := include "chatgate.terminationGracePeriodSeconds" . }}
{{- end }}
