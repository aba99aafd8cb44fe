{{/* Issue 10 (authentication): the env every process gets from the auth Secret. The internal plane
     (router <-> workers, worker registrations) is always on; the public API token only with
     auth.apiToken.enabled. Secrets come from auth.existingSecret or from the Secret this chart makes. */}}
{{- define "dsv32.authSecretName" -}}
{{- default (include "dsv32.componentName" (dict "root" . "component" "auth")) .Values.auth.existingSecret }}
{{- end }}

{{- define "dsv32.authEnv" -}}
- name: DSV32_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "dsv32.authSecretName" . }}
      key: internal-token
{{- if .Values.auth.apiToken.enabled }}
- name: DSV32_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "dsv32.authSecretName" . }}
      key: api-token
{{- end }}
{{- end }}
