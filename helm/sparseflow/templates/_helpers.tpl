{{/*
Names. Kubernetes names are DNS labels of at most 63 characters, so every name is truncated; a
component name keeps its suffix and truncates the prefix instead, so two components never collide.
*/}}
{{- define "sparseflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sparseflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"<fullname>-<component>" within `max` characters (default 63): the prefix is cut, the suffix kept.
Usage: include "sparseflow.componentName" (dict "ctx" $ "component" "api")
*/}}
{{- define "sparseflow.componentName" -}}
{{- $max := .max | default 63 | int -}}
{{- $room := sub $max (add1 (len .component)) | int -}}
{{- $prefix := include "sparseflow.fullname" .ctx | trunc $room | trimSuffix "-" -}}
{{- printf "%s-%s" $prefix .component -}}
{{- end -}}

{{- define "sparseflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels. Usage: include "sparseflow.labels" (dict "ctx" $ "component" "api") */}}
{{- define "sparseflow.labels" -}}
helm.sh/chart: {{ include "sparseflow.chart" .ctx }}
{{ include "sparseflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sparseflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sparseflow.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Image reference. An empty repository or tag falls back to `image.*`, then the tag to appVersion.
Usage: include "sparseflow.image" (dict "ctx" $ "image" .Values.rayCluster.image)
*/}}
{{- define "sparseflow.image" -}}
{{- $img := .image | default dict -}}
{{- $repo := $img.repository | default .ctx.Values.image.repository -}}
{{- $tag := $img.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s:%s" $repo (toString $tag) -}}
{{- end -}}

{{/* The worker image (Prefect workers; Ray pods unless `rayCluster.image` says otherwise). */}}
{{- define "sparseflow.workerImage" -}}
{{- $img := .image | default dict -}}
{{- $w := .ctx.Values.workerImage -}}
{{- $repo := $img.repository | default $w.repository -}}
{{- $tag := $img.tag | default $w.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s:%s" $repo (toString $tag) -}}
{{- end -}}

{{/*
A value as the string a command line or a map[string]string wants. YAML numbers reach templates as
float64, which toString writes as 1e+08; whole numbers are written as integers.
*/}}
{{- define "sparseflow.scalar" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Lineage database: the Secret and key holding SPARSEFLOW_DATABASE_URL (external database only). */}}
{{- define "sparseflow.database.secretName" -}}
{{- .Values.database.external.existingSecret | default (include "sparseflow.componentName" (dict "ctx" . "component" "database")) -}}
{{- end -}}

{{- define "sparseflow.database.secretKey" -}}
{{- if .Values.database.external.existingSecret -}}
{{- .Values.database.external.existingSecretKey -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{- define "sparseflow.postgresql.secretName" -}}
{{- .Values.database.postgresql.auth.existingSecret | default (include "sparseflow.componentName" (dict "ctx" . "component" "postgresql")) -}}
{{- end -}}

{{- define "sparseflow.postgresql.secretKey" -}}
{{- if .Values.database.postgresql.auth.existingSecret -}}
{{- .Values.database.postgresql.auth.existingSecretKey -}}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{/* Env entries for SPARSEFLOW_DATABASE_URL (the bundled PostgreSQL URL is assembled with $(VAR)). */}}
{{- define "sparseflow.databaseEnv" -}}
{{- if .Values.database.postgresql.enabled }}
{{- $pg := .Values.database.postgresql.auth }}
- name: SPARSEFLOW_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "sparseflow.postgresql.secretName" . }}
      key: {{ include "sparseflow.postgresql.secretKey" . }}
- name: SPARSEFLOW_DATABASE_URL
  value: {{ printf "postgresql+psycopg://%s:$(SPARSEFLOW_DATABASE_PASSWORD)@%s:5432/%s" $pg.username (include "sparseflow.componentName" (dict "ctx" . "component" "postgresql")) $pg.database | quote }}
{{- else }}
- name: SPARSEFLOW_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sparseflow.database.secretName" . }}
      key: {{ include "sparseflow.database.secretKey" . }}
{{- end }}
{{- end -}}

{{/* Artifact store: env, envFrom, volumes and mounts shared by API, worker and Ray pods. */}}
{{- define "sparseflow.artifactsEnv" -}}
{{- $a := .Values.artifacts }}
{{- if eq $a.type "s3" }}
- name: SPARSEFLOW_ARTIFACT_ROOT
  value: {{ printf "s3://%s/%s" $a.s3.bucket ($a.s3.prefix | trimAll "/") | trimSuffix "/" | quote }}
{{- with $a.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $a.s3.endpointUrl }}
{{- /* boto reads AWS_ENDPOINT_URL(_S3); fsspec's s3fs takes its endpoint from FSSPEC_S3_ENDPOINT_URL */}}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
- name: FSSPEC_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- else }}
- name: SPARSEFLOW_ARTIFACT_ROOT
  value: {{ $a.pvc.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "sparseflow.artifactsEnvFrom" -}}
{{- if and (eq .Values.artifacts.type "s3") .Values.artifacts.s3.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ .Values.artifacts.s3.credentialsSecret }}
{{- end }}
{{- end -}}

{{- define "sparseflow.artifactsClaimName" -}}
{{- .Values.artifacts.pvc.existingClaim | default (include "sparseflow.componentName" (dict "ctx" . "component" "artifacts")) -}}
{{- end -}}

{{- define "sparseflow.artifactsVolumes" -}}
{{- if eq .Values.artifacts.type "pvc" }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "sparseflow.artifactsClaimName" . }}
{{- end }}
{{- end -}}

{{- define "sparseflow.artifactsVolumeMounts" -}}
{{- if eq .Values.artifacts.type "pvc" }}
- name: artifacts
  mountPath: {{ .Values.artifacts.pvc.mountPath }}
{{- end }}
{{- end -}}

{{/* Service endpoints. */}}
{{- define "sparseflow.prefectApiUrl" -}}
{{- if .Values.prefectServer.enabled -}}
{{- printf "http://%s:%d/api" (include "sparseflow.componentName" (dict "ctx" . "component" "prefect-server")) (int .Values.prefectServer.service.port) -}}
{{- else -}}
{{- .Values.prefectServer.externalApiUrl -}}
{{- end -}}
{{- end -}}

{{/* KubeRay limits RayCluster names to 53 characters (it appends "-serve-svc" and the like). */}}
{{- define "sparseflow.rayClusterName" -}}
{{- include "sparseflow.componentName" (dict "ctx" . "component" "ray" "max" 53) -}}
{{- end -}}

{{/*
The Ray address of the workers: the KubeRay head's GCS port, or `rayCluster.externalAddress`. A GCS
address (`host:6379`) needs a raylet next to the Ray driver, so worker pods join that cluster as nodes
offering no resources; a Ray Client address (`ray://host:10001`) needs nothing local.
*/}}
{{- define "sparseflow.rayAddress" -}}
{{- if .Values.rayCluster.enabled -}}
{{- printf "%s-head-svc:6379" (include "sparseflow.rayClusterName" .) -}}
{{- else -}}
{{- .Values.rayCluster.externalAddress -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.rayJoins" -}}
{{- $address := include "sparseflow.rayAddress" . -}}
{{- if and $address (not (hasPrefix "ray://" $address)) -}}true{{- end -}}
{{- end -}}

{{/* Paths every sparseflow process writes to (emptyDirs under a read-only root filesystem). */}}
{{- define "sparseflow.homeEnv" -}}
- name: SPARSEFLOW_HOME
  value: /var/lib/sparseflow
- name: PREFECT_HOME
  value: /var/lib/sparseflow/prefect
- name: HOME
  value: /var/lib/sparseflow
{{- end -}}

{{/*
Cluster mode: SPARSEFLOW_PREFECT_API_URL makes `sparseflow serve` record jobs and create flow runs of
the deployment in the work pool, never run a flow itself; PREFECT_API_URL points Prefect's own client
(workers, `sparseflow deploy`) at the same server.
*/}}
{{- define "sparseflow.prefectEnv" -}}
{{- $url := include "sparseflow.prefectApiUrl" . }}
- name: PREFECT_API_URL
  value: {{ $url | quote }}
- name: SPARSEFLOW_PREFECT_API_URL
  value: {{ $url | quote }}
- name: SPARSEFLOW_WORK_POOL
  value: {{ .Values.prefectWorker.workPool | quote }}
- name: SPARSEFLOW_DEPLOYMENT
  value: {{ .Values.prefectWorker.deploymentName | quote }}
{{- end -}}

{{/* `settings.*` as SPARSEFLOW_* (only those set; null keeps the application's default). */}}
{{- define "sparseflow.settingsEnv" -}}
{{- $s := .Values.settings }}
{{- $names := dict
  "heartbeatSeconds" "SPARSEFLOW_HEARTBEAT_S"
  "runnerLostAfterSeconds" "SPARSEFLOW_RUNNER_LOST_AFTER_S"
  "reconcileEverySeconds" "SPARSEFLOW_RECONCILE_EVERY_S"
  "verifyEverySeconds" "SPARSEFLOW_VERIFY_EVERY_S"
  "maxRequestBytes" "SPARSEFLOW_MAX_REQUEST_BYTES"
  "maxDatasetBytes" "SPARSEFLOW_MAX_DATASET_BYTES" }}
{{- range $key := keys $names | sortAlpha }}
{{- $value := index $s $key }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ index $names $key }}
  value: {{ include "sparseflow.scalar" $value | quote }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" $s.localRoots) }}
- name: SPARSEFLOW_LOCAL_ROOTS
  value: {{ toJson $s.localRoots | quote }}
{{- end }}
{{- end -}}

{{/* Environment of the API: database, artifacts, Prefect (cluster mode), settings. No Ray: it runs no stage. */}}
{{- define "sparseflow.apiEnv" -}}
{{- include "sparseflow.homeEnv" . }}
{{- include "sparseflow.databaseEnv" . }}
{{- include "sparseflow.artifactsEnv" . }}
{{- include "sparseflow.prefectEnv" . }}
{{- include "sparseflow.settingsEnv" . }}
{{- end -}}

{{/* Environment of the Prefect workers and the flows they run: everything the API has, plus Ray. */}}
{{- define "sparseflow.workerEnv" -}}
{{- include "sparseflow.homeEnv" . }}
{{- include "sparseflow.databaseEnv" . }}
{{- include "sparseflow.artifactsEnv" . }}
{{- with (include "sparseflow.rayAddress" .) }}
- name: SPARSEFLOW_RAY_ADDRESS
  value: {{ . | quote }}
{{- end }}
{{- include "sparseflow.prefectEnv" . }}
{{- include "sparseflow.settingsEnv" . }}
{{- end -}}

{{/* Writable scratch volumes for containers with a read-only root filesystem. */}}
{{- define "sparseflow.scratchVolumes" -}}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "sparseflow.scratchVolumeMounts" -}}
- name: home
  mountPath: /var/lib/sparseflow
- name: tmp
  mountPath: /tmp
{{- end -}}
