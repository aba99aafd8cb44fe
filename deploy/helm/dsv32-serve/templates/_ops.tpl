{{/* Operations helpers: service account, /dev/shm, probes of the engine loop. */}}

{{- define "dsv32.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dsv32.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Pod-spec lines: the service account (if any) and whether its token is mounted. */}}
{{- define "dsv32.podServiceAccount" -}}
{{- with (include "dsv32.serviceAccountName" .) }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- end }}

{{/* GPU workers: NCCL and torch's shared-memory transports need more /dev/shm than the 64 MiB
     a container gets; a memory-backed emptyDir, sized (it counts against the pod's memory). */}}
{{- define "dsv32.shmVolume" -}}
{{- if .Values.gpu.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.gpu.shmSize }}
{{- end }}
{{- end }}

{{- define "dsv32.shmMount" -}}
{{- if .Values.gpu.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* A gRPC health probe of one service. Call with (dict "port" N "service" "name" "p" .v.probes.x). */}}
{{- define "dsv32.grpcServiceProbe" -}}
grpc:
  port: {{ .port }}
  service: {{ .service }}
periodSeconds: {{ .p.periodSeconds }}
failureThreshold: {{ .p.failureThreshold }}
timeoutSeconds: {{ .p.timeoutSeconds }}
{{- end }}
