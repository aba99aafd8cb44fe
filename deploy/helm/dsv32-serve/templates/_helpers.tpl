{{/* Names ------------------------------------------------------------------- */}}

{{- define "dsv32.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* At most 40 characters: a StatefulSet's name plus "-<component>" must leave
     room for the controller-revision-hash label (name + 11 characters <= 63). */}}
{{- define "dsv32.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* <fullname>-<component>; call with (dict "root" $ "component" "router") */}}
{{- define "dsv32.componentName" -}}
{{- printf "%s-%s" (include "dsv32.fullname" .root) .component }}
{{- end }}

{{/* Labels: call with (dict "root" $ "component" "router") ------------------ */}}

{{- define "dsv32.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsv32.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dsv32.labels" -}}
{{ include "dsv32.selectorLabels" . }}
app.kubernetes.io/part-of: dsv32-serve
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Wiring --------------------------------------------------------------------- */}}

{{- define "dsv32.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "dsv32.modelPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.dir }}
{{- end }}

{{- define "dsv32.redisPrefix" -}}
{{- default (printf "%s:" .Release.Name) .Values.redis.prefix }}
{{- end }}

{{/* DSV32_REDIS_URL as an env entry (the in-chart Redis with its password, a literal, or from a Secret). */}}
{{- define "dsv32.redisUrlEnv" -}}
{{- if .Values.redis.enabled }}
# the in-chart Redis asks for a password (from the auth Secret); the kubelet expands $(REDIS_PASSWORD)
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dsv32.authSecretName" . }}
      key: redis-password
{{- end }}
- name: DSV32_REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%d/0" (include "dsv32.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) | quote }}
{{- else if .Values.redis.externalUrlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalUrlSecret.name }}
      key: {{ required "redis.externalUrlSecret.key is required with redis.externalUrlSecret.name" .Values.redis.externalUrlSecret.key }}
{{- else }}
  value: {{ required "redis.enabled=false needs redis.externalUrl or redis.externalUrlSecret" .Values.redis.externalUrl | quote }}
{{- end }}
{{- end }}

{{/* Flags the chart sets itself: a role's `config` may not hold them. */}}
{{- define "dsv32.managedFlags" -}}
model numerics served_model_name host port http_port advertise_host worker_id redis_url redis_prefix metrics_port transfer_port device log_level otel_exporter ready_file exit_with_parent session_ttl
{{- end }}

{{/* The env of a role's main container. Call with (dict "root" $ "role" "prefill" "v" .Values.prefill). */}}
{{- define "dsv32.env" -}}
{{- $root := .root }}
{{- $managed := splitList " " (include "dsv32.managedFlags" .) -}}
- name: DSV32_MODEL
  value: {{ include "dsv32.modelPath" $root | quote }}
- name: DSV32_NUMERICS
  value: {{ $root.Values.model.numerics | quote }}
- name: DSV32_HOST
  value: "0.0.0.0"
- name: DSV32_PORT
  value: {{ .v.port | quote }}
{{ include "dsv32.redisUrlEnv" $root }}
{{ include "dsv32.authEnv" $root }}
- name: DSV32_REDIS_PREFIX
  value: {{ include "dsv32.redisPrefix" $root | quote }}
- name: DSV32_METRICS_PORT
  value: {{ ternary $root.Values.metrics.port 0 $root.Values.metrics.enabled | quote }}
- name: DSV32_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: DSV32_OTEL_EXPORTER
  value: {{ $root.Values.otelExporter | quote }}
- name: DSV32_SESSION_TTL
  value: {{ $root.Values.sessions.ttlSeconds | quote }}
{{- if eq .role "router" }}
- name: DSV32_HTTP_PORT
  value: {{ .v.httpPort | quote }}
{{- with $root.Values.model.servedModelName }}
- name: DSV32_SERVED_MODEL_NAME
  value: {{ . | quote }}
{{- end }}
{{- else }}
# Workers register <pod IP>:<port> in Redis; the StatefulSet pod name is a
# stable worker id (a restarted pod takes its own registration back).
- name: DSV32_ADVERTISE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: DSV32_WORKER_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: DSV32_DEVICE
  value: {{ ternary "cuda" "cpu" $root.Values.gpu.enabled | quote }}
{{- end }}
{{- if eq .role "decode" }}
- name: DSV32_TRANSFER_PORT
  value: {{ .v.transferPort | quote }}
{{- end }}
{{- if .v.expertParallel }}
# one pod = one EP group: the worker starts its ranks (one GPU each; rank R on port + R)
- name: DSV32_EP_SIZE
  value: {{ .v.expertParallel.size | quote }}
{{- end }}
{{- range $key, $value := .v.config }}
{{- if has $key $managed }}
{{- fail (printf "%s.config.%s is set by the chart; use the chart's own value for it (see values.yaml)" $.role $key) }}
{{- end }}
{{- if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
- name: {{ printf "DSV32_%s" (upper $key) }}
  value: {{ include "dsv32.scalar" $value | quote }}
{{- end }}
{{- end }}
{{- with .v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A scalar value as the CLI reads it: whole numbers without an exponent
     (values arrive as float64, and 1000000 would print as 1e+06). */}}
{{- define "dsv32.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* Model volume --------------------------------------------------------------- */}}

{{- define "dsv32.modelVolume" -}}
{{- $vol := .Values.model.volume -}}
- name: models
{{- if eq $vol.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ default (include "dsv32.componentName" (dict "root" . "component" "models")) $vol.pvc.existingClaim }}
{{- else if eq $vol.type "hostPath" }}
  hostPath:
    path: {{ $vol.hostPath.path }}
    type: {{ $vol.hostPath.type }}
{{- else if eq $vol.type "emptyDir" }}
{{- if not .Values.model.makeCheckpoint.enabled }}
{{- fail "model.volume.type=emptyDir holds no model unless model.makeCheckpoint.enabled" }}
{{- end }}
  emptyDir:
    {{- with $vol.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- else }}
{{- fail (printf "model.volume.type must be emptyDir, pvc or hostPath, not %q" $vol.type) }}
{{- end }}
{{- end }}

{{/* The init container that makes the demo checkpoint (if enabled). */}}
{{- define "dsv32.makeCheckpoint" -}}
{{- with .Values.model.makeCheckpoint }}
{{- if .enabled -}}
- name: make-checkpoint
  image: {{ include "dsv32.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  # Several pods may share the volume: write to a private directory, then
  # rename; whoever loses the race keeps the winner's (identical) checkpoint.
  command:
    - sh
    - -c
    - |
      set -eu
      if [ -f "$DSV32_MODEL/config.json" ]; then echo "checkpoint present in $DSV32_MODEL"; exit 0; fi
      tmp="$DSV32_MODEL.tmp-$HOSTNAME"
      rm -rf "$tmp"
      {{ join " " $.Values.image.command }} make-checkpoint --preset {{ .preset }} --dtype {{ .dtype }} --seed {{ .seed }} --out "$tmp"
      mv -T "$tmp" "$DSV32_MODEL" 2>/dev/null || { rm -rf "$tmp"; test -f "$DSV32_MODEL/config.json"; }
  env:
    - name: DSV32_MODEL
      value: {{ include "dsv32.modelPath" $ | quote }}
  securityContext:
    {{- toYaml $.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $.Values.model.mountPath }}
{{- end }}
{{- end }}
{{- end }}

{{/* Resources of a worker container, with the GPUs added when gpu.enabled.
     Call with (dict "root" $ "resources" .v.resources "gpus" N). */}}
{{- define "dsv32.workerResources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if .root.Values.gpu.enabled }}
{{- $name := .root.Values.gpu.resourceName }}
{{- $limits := deepCopy (default dict $res.limits) }}
{{- $_ := set $limits $name (int .gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := deepCopy (default dict $res.requests) }}
{{- $_ := set $requests $name (int .gpus) }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* gRPC health probes of a role. Call with (dict "port" N "p" .v.probes). */}}
{{- define "dsv32.grpcProbe" -}}
grpc:
  port: {{ .port }}
periodSeconds: {{ .p.periodSeconds }}
failureThreshold: {{ .p.failureThreshold }}
timeoutSeconds: {{ .p.timeoutSeconds }}
{{- end }}

{{/* NetworkPolicy ingress rule for Prometheus scrapes (every role). */}}
{{- define "dsv32.metricsIngress" -}}
{{- if and .Values.metrics.enabled .Values.networkPolicy.metricsFrom }}
- from:
    {{- toYaml .Values.networkPolicy.metricsFrom | nindent 4 }}
  ports:
    - {protocol: TCP, port: {{ .Values.metrics.port }}}
{{- end }}
{{- end }}
