{{/* A worker pool: a StatefulSet (stable pod names = stable worker ids) and
     the headless Service it needs. Call with (dict "root" $ "role" "prefill"). */}}
{{- define "dsv32.workerPool" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $v := index $root.Values $role }}
{{- $ctx := dict "root" $root "component" $role }}
{{- $gpus := $v.gpus }}
{{- $ep := int $v.expertParallel.size }}
{{- if lt $ep 1 }}
{{- fail (printf "%s.expertParallel.size must be >= 1" $role) }}
{{- end }}
{{- if or (gt $ep 1) (not $gpus) }}
{{- $gpus = $ep }}{{/* one GPU per rank */}}
{{- end }}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "dsv32.componentName" $ctx }}
  labels:
    {{- include "dsv32.labels" $ctx | nindent 4 }}
spec:
  serviceName: {{ include "dsv32.componentName" $ctx }}
  # Workers are independent of each other: start and stop them all at once.
  podManagementPolicy: Parallel
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "dsv32.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "dsv32.labels" $ctx | nindent 8 }}
      {{- with $v.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      enableServiceLinks: false
      {{- include "dsv32.podServiceAccount" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "dsv32.makeCheckpoint" $root) }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "dsv32.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: {{ toJson $root.Values.image.command }}
          args: [{{ $role | quote }}]
          env:
            {{- include "dsv32.env" (dict "root" $root "role" $role "v" $v) | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
              protocol: TCP
            {{- if eq $role "decode" }}
            - name: kv-transfer
              containerPort: {{ $v.transferPort }}
              protocol: TCP
            {{- end }}
            {{- /* EP rank R of the pod's group serves on port + R (and transfer port + R) */}}
            {{- range $r := untilStep 1 $ep 1 }}
            - name: grpc-r{{ $r }}
              containerPort: {{ add $v.port $r }}
              protocol: TCP
            {{- if eq $role "decode" }}
            - name: kv-r{{ $r }}
              containerPort: {{ add $v.transferPort $r }}
              protocol: TCP
            {{- end }}
            {{- end }}
            {{- if $root.Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
            {{- end }}
          # The gRPC server (and its health service) starts after the weights load.
          startupProbe:
            {{- include "dsv32.grpcProbe" (dict "port" $v.port "p" $v.probes.startup) | nindent 12 }}
          readinessProbe:
            {{- include "dsv32.grpcProbe" (dict "port" $v.port "p" $v.probes.readiness) | nindent 12 }}
          # NOT_SERVING once the engine loop has had work and taken no step for --liveness-timeout
          livenessProbe:
            {{- include "dsv32.grpcServiceProbe" (dict "port" $v.port "service" "dsv32.worker.v1.EngineLoop"
                "p" $v.probes.liveness) | nindent 12 }}
          resources:
            {{- include "dsv32.workerResources" (dict "root" $root "resources" $v.resources "gpus" $gpus) | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: {{ $root.Values.model.mountPath }}
              readOnly: true
            {{- include "dsv32.shmMount" $root | nindent 12 }}
      volumes:
        {{- include "dsv32.modelVolume" $root | nindent 8 }}
        {{- include "dsv32.shmVolume" $root | nindent 8 }}
      {{- $nodeSelector := $v.nodeSelector }}
      {{- if $root.Values.gpu.enabled }}
      {{- $nodeSelector = merge (deepCopy (default dict $v.nodeSelector)) $root.Values.gpu.nodeSelector }}
      {{- end }}
      {{- with $nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $tolerations := $v.tolerations }}
      {{- if $root.Values.gpu.enabled }}
      {{- $tolerations = concat (default list $v.tolerations) $root.Values.gpu.tolerations }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
---
# Headless: the StatefulSet's network identity and the metrics target. Routers
# do not use it (they dial the pod IPs registered in Redis).
apiVersion: v1
kind: Service
metadata:
  name: {{ include "dsv32.componentName" $ctx }}
  labels:
    {{- include "dsv32.labels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "dsv32.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: kubernetes.io/h2c
    {{- if eq $role "decode" }}
    - name: kv-transfer
      port: {{ $v.transferPort }}
      targetPort: kv-transfer
      protocol: TCP
    {{- end }}
    {{- if $root.Values.metrics.enabled }}
    - name: metrics
      port: {{ $root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
    {{- end }}
{{- end }}
