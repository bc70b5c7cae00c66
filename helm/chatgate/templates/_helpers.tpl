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

{{/*
Redis mode: standalone (redis.url / existingSecret / trial), cluster
(redis.nodes) or sentinel (redis.sentinels). chatgate.validateRedis refuses
anything else, and any key of another mode.
*/}}
{{- define "chatgate.redis.mode" -}}
{{- .Values.redis.mode | default "standalone" | toString }}
{{- end }}

{{/*
The [redis] keys the chart sets from .Values.redis, as a JSON object merged
into the configuration file: the mode, and the addresses and (non-secret)
settings that mode uses. The passwords are never here: they reach the pod as
CHATGATE_REDIS__PASSWORD and CHATGATE_REDIS__SENTINEL_PASSWORD from
secretKeyRefs (see the Deployment), and the standalone URL as
CHATGATE_REDIS__URL.
*/}}
{{- define "chatgate.redis.configKeys" -}}
{{- $r := .Values.redis }}
{{- $mode := include "chatgate.redis.mode" . }}
{{- $keys := dict "mode" $mode }}
{{- if eq $mode "cluster" }}
{{- $_ := set $keys "nodes" ($r.nodes | default list) }}
{{- else if eq $mode "sentinel" }}
{{- $_ := set $keys "sentinels" ($r.sentinels | default list) }}
{{- $_ = set $keys "sentinel_master" $r.sentinelMaster }}
{{- $_ = set $keys "db" (int ($r.db | default 0)) }}
{{- with $r.sentinelUsername }}{{ $_ = set $keys "sentinel_username" . }}{{ end }}
{{- end }}
{{- with $r.username }}{{ $_ := set $keys "username" . }}{{ end }}
{{- if ne $mode "cluster" }}
{{- $_ := set $keys "wait_replicas" (int ($r.waitReplicas | default 0)) }}
{{- end }}
{{- toJson $keys }}
{{- end }}

{{/* "true" when the data nodes' password comes from a Secret. */}}
{{- define "chatgate.redis.password" -}}
{{- if (.Values.redis.passwordSecret | default dict).name }}true{{ end }}
{{- end }}

{{/* "true" when the Sentinels' password comes from a Secret (sentinel mode). */}}
{{- define "chatgate.redis.sentinelPassword" -}}
{{- if and (eq (include "chatgate.redis.mode" .) "sentinel") (.Values.redis.sentinelPasswordSecret | default dict).name }}true{{ end }}
{{- end }}

{{/*
TCP ports of the Redis egress rule (cluster and sentinel mode), as a JSON
list: networkPolicy.egress.redis.ports, or derived: the ports of redis.nodes
(6379 when a URL has none), or of redis.sentinels (26379 when none) plus 6379
for the data nodes the Sentinels name.
*/}}
{{- define "chatgate.redis.egressPorts" -}}
{{- $set := .Values.networkPolicy.egress.redis.ports | default list }}
{{- if $set }}
{{- $set | toJson }}
{{- else }}
{{- $mode := include "chatgate.redis.mode" . }}
{{- $ports := list }}
{{- $urls := ternary (.Values.redis.nodes | default list) (.Values.redis.sentinels | default list) (eq $mode "cluster") }}
{{- $default := ternary 6379 26379 (eq $mode "cluster") }}
{{- range $urls }}
{{- $port := regexFind ":[0-9]+$" (urlParse (toString .)).host | trimPrefix ":" }}
{{- $ports = append $ports (ternary (int $port) $default (ne $port "")) }}
{{- end }}
{{- if eq $mode "sentinel" }}
{{- $ports = append $ports 6379 }}
{{- end }}
{{- $ports | uniq | sortAlpha | toJson }}
{{- end }}
{{- end }}

{{/*
Auth key sources. Each helper prints "true" or nothing.
  hmac: an HMAC secret from a Secret (chart-created or existing), passed as
        CHATGATE_AUTH__HMAC_SECRET from a secretKeyRef;
  pem:  PEM public keys from a ConfigMap (chart-created from
        auth.jwt.publicKeys) or an existing Secret/ConfigMap, mounted
        read-only and listed in CHATGATE_AUTH__PUBLIC_KEY_FILES;
  jwks: config.auth.jwks_url.
They are only used while auth.enabled is true.
*/}}
{{- define "chatgate.auth.hmac" -}}
{{- if and .Values.auth.enabled (or .Values.auth.jwt.hmacSecret .Values.auth.jwt.existingSecret) }}true{{ end }}
{{- end }}

{{- define "chatgate.auth.pem" -}}
{{- $from := .Values.auth.jwt.publicKeysFrom }}
{{- if and .Values.auth.enabled (or .Values.auth.jwt.publicKeys $from.secretName $from.configMapName) }}true{{ end }}
{{- end }}

{{- define "chatgate.auth.jwksUrl" -}}
{{- if .Values.auth.enabled }}{{ (.Values.config.auth | default dict).jwks_url | default "" }}{{ end }}
{{- end }}

{{/* The Secret and key of the HMAC secret. */}}
{{- define "chatgate.auth.hmacSecretName" -}}
{{- if .Values.auth.jwt.existingSecret }}
{{- .Values.auth.jwt.existingSecret }}
{{- else }}
{{- printf "%s-auth" (include "chatgate.fullname" .) }}
{{- end }}
{{- end }}

{{- define "chatgate.auth.hmacSecretKey" -}}
{{- if .Values.auth.jwt.existingSecret }}
{{- .Values.auth.jwt.existingSecretKey }}
{{- else -}}
hmac-secret
{{- end }}
{{- end }}

{{/* The file names (keys) of the PEM public keys, as a JSON list. */}}
{{- define "chatgate.auth.pemKeys" -}}
{{- if .Values.auth.jwt.publicKeys }}
{{- keys .Values.auth.jwt.publicKeys | sortAlpha | toJson }}
{{- else }}
{{- .Values.auth.jwt.publicKeysFrom.keys | default list | toJson }}
{{- end }}
{{- end }}

{{/* CHATGATE_AUTH__PUBLIC_KEY_FILES: the mounted files, comma-separated. */}}
{{- define "chatgate.auth.publicKeyFiles" -}}
{{- $dir := trimSuffix "/" .Values.auth.jwt.mountPath }}
{{- $files := list }}
{{- range (include "chatgate.auth.pemKeys" . | fromJsonArray) }}
{{- $files = append $files (printf "%s/%s" $dir .) }}
{{- end }}
{{- join "," $files }}
{{- end }}

{{/*
The port of config.auth.jwks_url: explicit, or 443 (https) / 80 (http).
*/}}
{{- define "chatgate.auth.jwksPort" -}}
{{- $url := urlParse (include "chatgate.auth.jwksUrl" .) }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- if $port }}{{ $port }}{{ else if eq $url.scheme "http" }}80{{ else }}443{{ end }}
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
The largest payload chatgate derives from the media limits, as its
derive_sizes does: the longest valid data URL ("data:" + the longest allowed
MIME type, 10 characters for images and 11 for audio, + ";base64," + the
base64 of chat.max_image_bytes / max_audio_bytes) or 6 x chat.max_text_bytes,
whichever is larger, plus 16 KiB for the JSON around it (13997424 bytes with
the defaults). server.max_body_bytes and ws.max_message_bytes left at 0 take
this value. Keep in step with chatgate's derive_sizes.
*/}}
{{- define "chatgate.derivedPayloadBytes" -}}
{{- $chat := .Values.config.chat | default dict }}
{{- $image := int64 (get $chat "max_image_bytes" | default 5242880) }}
{{- $audio := int64 (get $chat "max_audio_bytes" | default 10485760) }}
{{- $text := int64 (get $chat "max_text_bytes" | default 4096) }}
{{- $imageUrl := add 23 (mul (div (add $image 2) 3) 4) }}
{{- $audioUrl := add 24 (mul (div (add $audio 2) 3) 4) }}
{{- max $imageUrl $audioUrl (mul $text 6) | add 16384 }}
{{- end }}

{{/* server.max_body_bytes as chatgate uses it: the value, or derived when 0. */}}
{{- define "chatgate.maxBodyBytes" -}}
{{- $set := int64 ((.Values.config.server | default dict).max_body_bytes | default 0) }}
{{- if gt $set 0 }}{{ $set }}{{ else }}{{ include "chatgate.derivedPayloadBytes" . }}{{ end }}
{{- end }}

{{/* ws.max_message_bytes as chatgate uses it: the value, or derived when 0. */}}
{{- define "chatgate.maxMessageBytes" -}}
{{- $set := int64 ((.Values.config.ws | default dict).max_message_bytes | default 0) }}
{{- if gt $set 0 }}{{ $set }}{{ else }}{{ include "chatgate.derivedPayloadBytes" . }}{{ end }}
{{- end }}

{{/*
A Kubernetes memory quantity in bytes, rounded down: plain bytes (a number,
or digits, optionally with an exponent: 5e8), or with a binary (Ki, Mi, Gi,
Ti, Pi, Ei) or decimal (k, M, G, T, P, E) suffix, with an optional fraction
(1.5Gi). Anything else (a milli suffix, a sign) fails, naming the value.
Call with (dict "value" <quantity> "what" <the value's name, for messages>).
*/}}
{{- define "chatgate.quantityBytes" -}}
{{- $v := .value }}
{{- if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) }}
{{- /* A YAML number (Helm reads it as float64; --set gives int64): bytes. */}}
{{- int64 $v }}
{{- else }}
{{- $s := trim (toString $v) }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?([eE][0-9]{1,2}|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$" $s) }}
{{- fail (printf "%s %q is not a memory quantity the chart can read: write bytes or a number with a suffix Ki, Mi, Gi, Ti, k, M, G or T (e.g. 512Mi, 1Gi), or set config.memory.large_payload_budget_bytes, which is otherwise derived from it" .what $s) }}
{{- end }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $s }}
{{- $suffix := trimPrefix $number $s }}
{{- /* Leading zeros off: the integer conversion would read 0512 as octal. */}}
{{- $number = regexReplaceAll "^0+([0-9])" $number "${1}" }}
{{- $multiplier := 1 }}
{{- if hasPrefix "e" (lower $suffix) }}
{{- $exponent := int (substr 1 -1 $suffix) }}
{{- if gt $exponent 18 }}
{{- fail (printf "%s %q is too large" .what $s) }}
{{- end }}
{{- range until $exponent }}{{ $multiplier = mul $multiplier 10 }}{{ end }}
{{- else }}
{{- $multiplier = get (dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976) $suffix }}
{{- end }}
{{- if contains "." $number }}
{{- mulf (float64 $number) $multiplier | floor | int64 }}
{{- else }}
{{- mul (int64 $number) $multiplier }}
{{- end }}
{{- end }}
{{- end }}

{{/*
memory.large_payload_budget_bytes to write into the configuration file, or
nothing (chatgate's own default then applies):
  - config.memory.large_payload_budget_bytes when set (refused below the
    largest payload: chatgate would refuse to start);
  - else, with a memory limit on the chatgate container, a sixteenth of it
    (chatgate's sizing rule: a large payload costs several times its size at
    its peak; the default 512Mi limit then gets chatgate's default 32 MiB,
    the one budget measured under hostile load), but at least the largest
    payload (ws.max_message_bytes and server.max_body_bytes, which chatgate
    requires): 33554432 for 512Mi, 67108864 for 1Gi, 134217728 for 2Gi;
  - else nothing, unless the largest payload exceeds chatgate's default
    budget (32 MiB, after raising the media limits): then the largest payload.
*/}}
{{- define "chatgate.largePayloadBudget" -}}
{{- $memory := .Values.config.memory | default dict }}
{{- $set := get $memory "large_payload_budget_bytes" }}
{{- $message := int64 (include "chatgate.maxMessageBytes" .) }}
{{- $body := int64 (include "chatgate.maxBodyBytes" .) }}
{{- $floor := max $message $body }}
{{- $limit := get ((.Values.resources | default dict).limits | default dict) "memory" }}
{{- if include "chatgate.isSet" $set }}
{{- $budget := int64 $set }}
{{- if lt $budget $floor }}
{{- fail (printf "config.memory.large_payload_budget_bytes=%d is below the largest payload (%d bytes: ws.max_message_bytes %d, server.max_body_bytes %d), and chatgate would refuse to start: raise it, or leave it unset to derive it from resources.limits.memory" $budget $floor $message $body) }}
{{- end }}
{{- $budget }}
{{- else if include "chatgate.isSet" $limit }}
{{- $bytes := include "chatgate.quantityBytes" (dict "value" $limit "what" "resources.limits.memory") | int64 }}
{{- max (div $bytes 16) $floor }}
{{- else if gt $floor 33554432 }}
{{- $floor }}
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

{{/* A TOML float: 1 is written 1.0, so a whole number keeps a float key's type. */}}
{{- define "chatgate.tomlFloat" -}}
{{- $f := float64 . }}
{{- if eq $f (floor $f) }}{{ printf "%.1f" $f }}{{ else }}{{ $f }}{{ end }}
{{- end }}

{{/*
The configuration file: values.config, section by section, with
auth.enabled from .Values.auth.enabled, the [redis] keys set from
.Values.redis, and memory.large_payload_budget_bytes derived from the memory
limit unless set (chatgate.largePayloadBudget). Null keys are left out. Keys
are sorted, so the file (and its checksum) is stable. The HMAC secret and the PEM key file list reach the
pod as environment variables (see the Deployment), never through this file.
*/}}
{{- define "chatgate.configToml" -}}
# chatgate configuration rendered by the Helm chart from values.config.
# Keys and meanings: config/default.toml in the chatgate project.
# Secrets (the Redis URL and passwords, the HMAC secret) are never written here.
{{- $config := deepCopy .Values.config }}
{{- $auth := get $config "auth" | default dict }}
{{- if not (kindIs "map" $auth) }}
{{- fail "config.auth must be a map of keys (an [auth] section)" }}
{{- end }}
{{- if hasKey $auth "enabled" }}
{{- fail "config.auth.enabled is set by the chart: set auth.enabled (and auth.allowInsecureDisabled) instead" }}
{{- end }}
{{- if hasKey $auth "hmac_secret" }}
{{- fail "config.auth.hmac_secret would put the HMAC secret in a ConfigMap: use auth.jwt.existingSecret (or auth.jwt.hmacSecret), passed from a Secret as CHATGATE_AUTH__HMAC_SECRET" }}
{{- end }}
{{- if hasKey $auth "public_key_files" }}
{{- fail "config.auth.public_key_files is set by the chart from the keys it mounts: use auth.jwt.publicKeys or auth.jwt.publicKeysFrom" }}
{{- end }}
{{- $_ := set $auth "enabled" .Values.auth.enabled }}
{{- $_ = set $config "auth" $auth }}
{{- $redis := get $config "redis" | default dict }}
{{- if not (kindIs "map" $redis) }}
{{- fail "config.redis must be a map of keys (a [redis] section)" }}
{{- end }}
{{- if hasKey $redis "url" }}
{{- fail "config.redis.url would put the Redis URL (and its password) in a ConfigMap: use redis.url or redis.existingSecret instead" }}
{{- end }}
{{- range $key := list "password" "sentinel_password" }}
{{- if hasKey $redis $key }}
{{- fail (printf "config.redis.%s would put a Redis password in a ConfigMap: use redis.passwordSecret / redis.sentinelPasswordSecret (an existing Secret, passed as CHATGATE_REDIS__%s)" $key (upper $key)) }}
{{- end }}
{{- end }}
{{- range $key := list "mode" "nodes" "sentinels" "sentinel_master" "db" "username" "sentinel_username" "wait_replicas" }}
{{- if hasKey $redis $key }}
{{- fail (printf "config.redis.%s is set by the chart: set it under redis (redis.mode, redis.nodes, redis.sentinels, redis.sentinelMaster, redis.db, redis.username, redis.sentinelUsername, redis.waitReplicas)" $key) }}
{{- end }}
{{- end }}
{{- $redis = merge (include "chatgate.redis.configKeys" . | fromJson) $redis }}
{{- $_ = set $config "redis" $redis }}
{{- $memory := get $config "memory" | default dict }}
{{- if not (kindIs "map" $memory) }}
{{- fail "config.memory must be a map of keys (a [memory] section)" }}
{{- end }}
{{- with include "chatgate.largePayloadBudget" . }}
{{- $_ = set $memory "large_payload_budget_bytes" (int64 .) }}
{{- $_ = set $config "memory" $memory }}
{{- end }}
{{- /* Keys chatgate reads as floats: written with a decimal point even when whole. */}}
{{- $floatKeys := list "redis.storage_full_ratio" }}
{{- range $section, $body := $config }}
{{- if not (kindIs "map" $body) }}
{{- fail (printf "config.%s must be a map of keys (a [%s] section)" $section $section) }}
{{- end }}

[{{ $section }}]
{{- range $key, $value := $body }}
{{- if not (kindIs "invalid" $value) }}
{{- if has (printf "%s.%s" $section $key) $floatKeys }}
{{ $key }} = {{ include "chatgate.tomlFloat" $value }}
{{- else }}
{{ $key }} = {{ include "chatgate.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks that refuse an unsafe or inconsistent release. Included by the
Deployment, so every render runs them.
*/}}
{{- define "chatgate.validate" -}}
{{- if and (not .Values.auth.enabled) (not .Values.auth.allowInsecureDisabled) }}
{{- fail "auth.enabled=false lets anyone who reaches the service post as anyone. Set auth.allowInsecureDisabled=true to confirm that an authenticating proxy protects it" }}
{{- end }}
{{- include "chatgate.validateAuth" . }}
{{- include "chatgate.validateCors" . }}
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
{{- if or (eq $path "redis__url") (eq $path "auth__enabled") (eq $path "auth__hmac_secret") (eq $path "auth__public_key_files") }}
{{- fail (printf "extraEnv: %s is set by the chart (use redis.url / redis.existingSecret, auth.enabled, auth.jwt.existingSecret / auth.jwt.hmacSecret, or auth.jwt.publicKeys / auth.jwt.publicKeysFrom)" $name) }}
{{- end }}
{{- if has $path (list "redis__mode" "redis__nodes" "redis__sentinels" "redis__sentinel_master" "redis__db" "redis__username" "redis__password" "redis__sentinel_username" "redis__sentinel_password" "redis__wait_replicas") }}
{{- fail (printf "extraEnv: %s is set by the chart from redis (redis.mode, redis.nodes, redis.sentinels, redis.sentinelMaster, redis.db, redis.username, redis.passwordSecret, redis.sentinelUsername, redis.sentinelPasswordSecret, redis.waitReplicas)" $name) }}
{{- end }}
{{- $known = and (hasKey $.Values.config $section) (hasKey (index $.Values.config $section) $key) }}
{{- end }}
{{- if not $known }}
{{- fail (printf "extraEnv: %s is not CHATGATE_<SECTION>__<KEY> for a key of config/default.toml; chatgate would refuse to start" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $backend := .Values.config.store.backend | default "auto" }}
{{- include "chatgate.validateRedis" . }}
{{- if and (eq $backend "memory") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "config.store.backend=memory keeps chat state inside one process: replicas would not see each other. Use Redis, or replicaCount=1 without autoscaling" }}
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

{{/*
Auth checks: with auth on, at least one key source, and key sources that
match config.auth.algorithms (chatgate refuses to start otherwise, and the
pods would crash-loop).
*/}}
{{- define "chatgate.validateAuth" -}}
{{- $jwt := .Values.auth.jwt }}
{{- $from := $jwt.publicKeysFrom }}
{{- if and $jwt.hmacSecret $jwt.existingSecret }}
{{- fail "auth.jwt: set only one of hmacSecret and existingSecret" }}
{{- end }}
{{- $pemSources := 0 }}
{{- if $jwt.publicKeys }}{{ $pemSources = add1 $pemSources }}{{ end }}
{{- if $from.secretName }}{{ $pemSources = add1 $pemSources }}{{ end }}
{{- if $from.configMapName }}{{ $pemSources = add1 $pemSources }}{{ end }}
{{- if gt (int $pemSources) 1 }}
{{- fail "auth.jwt: set only one of publicKeys, publicKeysFrom.secretName and publicKeysFrom.configMapName" }}
{{- end }}
{{- if and (or $from.secretName $from.configMapName) (not $from.keys) }}
{{- fail "auth.jwt.publicKeysFrom.keys: list the keys of the Secret or ConfigMap to mount, one PEM public key each (the chart cannot read an existing object's keys when it renders)" }}
{{- end }}
{{- if and $from.keys (not (or $from.secretName $from.configMapName)) }}
{{- fail "auth.jwt.publicKeysFrom.keys is set without publicKeysFrom.secretName or publicKeysFrom.configMapName" }}
{{- end }}
{{- range $name, $pem := $jwt.publicKeys }}
{{- if contains "PRIVATE KEY" (toString $pem) }}
{{- fail (printf "auth.jwt.publicKeys.%s is a PRIVATE key: give chatgate the public key only (openssl pkey -in key.pem -pubout)" $name) }}
{{- end }}
{{- if not (contains "PUBLIC KEY-----" (toString $pem)) }}
{{- fail (printf "auth.jwt.publicKeys.%s is not a PEM public key (-----BEGIN PUBLIC KEY-----)" $name) }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
{{- $hmac := include "chatgate.auth.hmac" . }}
{{- $pem := include "chatgate.auth.pem" . }}
{{- $jwks := include "chatgate.auth.jwksUrl" . }}
{{- if not (or $hmac $pem $jwks) }}
{{- fail "auth.enabled=true needs a key source to verify tokens, or chatgate refuses to start and the pods crash-loop. Set one of: config.auth.jwks_url (your issuer's JWKS); PEM public keys (auth.jwt.publicKeys, or auth.jwt.publicKeysFrom with an existing Secret or ConfigMap); an HMAC secret (auth.jwt.existingSecret or auth.jwt.hmacSecret, with config.auth.algorithms [HS256])" }}
{{- end }}
{{- $hs := list }}
{{- $pk := list }}
{{- range ((.Values.config.auth | default dict).algorithms | default list) }}
{{- if hasPrefix "HS" (toString .) }}{{ $hs = append $hs . }}{{ else }}{{ $pk = append $pk . }}{{ end }}
{{- end }}
{{- if and $hmac (or $pem $jwks) }}
{{- fail "auth: an HMAC secret (auth.jwt.hmacSecret / existingSecret) and public keys (config.auth.jwks_url, auth.jwt.publicKeys / publicKeysFrom) are both set. chatgate never mixes HS* with public-key algorithms (key confusion): keep one kind" }}
{{- end }}
{{- if and $hmac $pk }}
{{- fail (printf "auth: the HMAC secret verifies HS256/HS384/HS512 tokens only, but config.auth.algorithms lists %s: set config.auth.algorithms to the HS* algorithm(s) your tokens use, e.g. [HS256]" (join ", " $pk)) }}
{{- end }}
{{- if and (or $pem $jwks) $hs }}
{{- fail (printf "auth: config.auth.algorithms lists %s, which needs an HMAC secret, but the keys given are public keys (JWKS or PEM): list the public-key algorithms your issuer signs with, e.g. [RS256]" (join ", " $hs)) }}
{{- end }}
{{- if and $jwt.hmacSecret (lt (len $jwt.hmacSecret) 32) }}
{{- fail (printf "auth.jwt.hmacSecret is %d bytes: it must be at least 32 (e.g. openssl rand -base64 48)" (len $jwt.hmacSecret)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Redis: one mode, and only the keys of that mode, so the chart never has to
guess which address chatgate will use (chatgate refuses most mixes at
startup, and the pods would crash-loop; the rest it would silently ignore).
  standalone: exactly one of redis.url, redis.existingSecret and
              redis.trial.enabled (none only with config.store.backend=memory);
  cluster:    redis.nodes, no url / existingSecret / trial, no WAIT, db 0;
  sentinel:   redis.sentinels and redis.sentinelMaster, no url /
              existingSecret / trial.
Addresses in nodes and sentinels are redis://host:port, never with
user:password@ (values end up in the ConfigMap and the release history):
passwords come from redis.passwordSecret and redis.sentinelPasswordSecret.
Messages never repeat an address, which may hold a password.
*/}}
{{- define "chatgate.validateRedis" -}}
{{- $r := .Values.redis }}
{{- $mode := include "chatgate.redis.mode" . }}
{{- $backend := .Values.config.store.backend | default "auto" }}
{{- $modes := list "standalone" "cluster" "sentinel" }}
{{- if not (has $mode $modes) }}
{{- fail (printf "redis.mode %q is not one of standalone (redis.url, redis.existingSecret or redis.trial), cluster (redis.nodes) or sentinel (redis.sentinels)" $mode) }}
{{- end }}
{{- $nodes := $r.nodes | default list }}
{{- $sentinels := $r.sentinels | default list }}
{{- range $key, $list := dict "nodes" $nodes "sentinels" $sentinels }}
{{- $secret := ternary "redis.passwordSecret (and redis.username)" "redis.sentinelPasswordSecret (and redis.sentinelUsername)" (eq $key "nodes") }}
{{- range $i, $url := $list }}
{{- $url = toString $url }}
{{- if contains "@" $url }}
{{- fail (printf "redis.%s[%d] holds credentials (user:password@): a password must not sit in values, the ConfigMap or the release history. List the address only (redis://host:port) and put the password in an existing Secret named by %s" $key $i $secret) }}
{{- end }}
{{- if not (hasPrefix "redis://" $url) }}
{{- fail (printf "redis.%s[%d] must be redis://host:port (this build has no Redis TLS, so rediss:// is refused)" $key $i) }}
{{- end }}
{{- if not (urlParse $url).host }}
{{- fail (printf "redis.%s[%d] has no host: write redis://host:port" $key $i) }}
{{- end }}
{{- end }}
{{- end }}
{{- $sources := list }}
{{- if $r.url }}{{ $sources = append $sources "redis.url" }}{{ end }}
{{- if $r.existingSecret }}{{ $sources = append $sources "redis.existingSecret" }}{{ end }}
{{- if $r.trial.enabled }}{{ $sources = append $sources "redis.trial.enabled" }}{{ end }}
{{- if eq $mode "standalone" }}
{{- if $nodes }}
{{- fail "redis.nodes is set, but redis.mode is standalone: set redis.mode=cluster for a Redis Cluster (with redis.nodes only), or remove redis.nodes" }}
{{- end }}
{{- if $sentinels }}
{{- fail "redis.sentinels is set, but redis.mode is standalone: set redis.mode=sentinel for Sentinel (with redis.sentinels only), or remove redis.sentinels" }}
{{- end }}
{{- if gt (len $sources) 1 }}
{{- fail "redis: set only one of redis.url, redis.existingSecret and redis.trial.enabled" }}
{{- end }}
{{- if and (eq (len $sources) 0) (ne $backend "memory") }}
{{- fail "redis: no Redis configured. Set redis.url (stored in a Secret), redis.existingSecret (a Secret holding the URL), or redis.trial.enabled=true for a throwaway single-pod Redis; or redis.mode=cluster with redis.nodes, or redis.mode=sentinel with redis.sentinels" }}
{{- end }}
{{- if and $r.url (not (hasPrefix "redis://" $r.url)) }}
{{- fail "redis.url must start with redis:// (this build has no Redis TLS, so rediss:// is refused)" }}
{{- end }}
{{- if ne (int ($r.db | default 0)) 0 }}
{{- fail "redis.db is for sentinel mode: in standalone mode the database is the URL's (redis://host:6379/N)" }}
{{- end }}
{{- else }}
{{- $addresses := ternary "redis.nodes" "redis.sentinels" (eq $mode "cluster") }}
{{- if $sources }}
{{- fail (printf "redis.mode=%s takes %s, not %s (standalone settings%s): unset %s" $mode $addresses (join ", " $sources) (ternary "; the trial Redis is one standalone pod" "" (has "redis.trial.enabled" $sources)) (join " and " $sources)) }}
{{- end }}
{{- if eq $mode "cluster" }}
{{- if not $nodes }}
{{- fail "redis.mode=cluster needs redis.nodes: the seed nodes, e.g. [redis://redis-cluster-0.redis-cluster:6379] (list two or three)" }}
{{- end }}
{{- if $sentinels }}
{{- fail "redis.mode=cluster takes redis.nodes, not redis.sentinels: remove redis.sentinels" }}
{{- end }}
{{- if gt (int ($r.waitReplicas | default 0)) 0 }}
{{- fail "redis.waitReplicas is not supported in cluster mode (chatgate refuses it): set it to 0" }}
{{- end }}
{{- if ne (int ($r.db | default 0)) 0 }}
{{- fail "redis.db must be 0 in cluster mode (a cluster has only database 0)" }}
{{- end }}
{{- if or $r.sentinelUsername ($r.sentinelPasswordSecret | default dict).name }}
{{- fail "redis.sentinelUsername and redis.sentinelPasswordSecret are for sentinel mode: in cluster mode use redis.username and redis.passwordSecret" }}
{{- end }}
{{- else }}
{{- if not $sentinels }}
{{- fail "redis.mode=sentinel needs redis.sentinels: every Sentinel, e.g. [redis://sentinel-0.sentinel:26379] (at least three for a quorum)" }}
{{- end }}
{{- if $nodes }}
{{- fail "redis.mode=sentinel takes redis.sentinels, not redis.nodes: the Sentinels name the data nodes; remove redis.nodes" }}
{{- end }}
{{- if not $r.sentinelMaster }}
{{- fail "redis.mode=sentinel needs redis.sentinelMaster: the name the Sentinels monitor the primary under" }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq $mode "standalone") (or $r.sentinelUsername ($r.sentinelPasswordSecret | default dict).name) }}
{{- fail "redis.sentinelUsername and redis.sentinelPasswordSecret are for sentinel mode (redis.mode=sentinel)" }}
{{- end }}
{{- end }}

{{/* CORS: "*" is refused (chatgate refuses it too, at startup). */}}
{{- define "chatgate.validateCors" -}}
{{- range ((.Values.config.cors | default dict).allowed_origins | default list) }}
{{- if eq (trim (toString .)) "*" }}
{{- fail "config.cors.allowed_origins: \"*\" is refused (chatgate refuses it at startup): list the exact origins of your web apps, e.g. [https://chat.example.com]" }}
{{- end }}
{{- end }}
{{- end }}
