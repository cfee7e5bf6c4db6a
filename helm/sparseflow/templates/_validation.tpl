{{/*
Checks run before anything renders (included from api-deployment.yaml). Each failure names the key
to set. values.schema.json keeps removed keys as known properties so they reach the check below
and fail with their replacement instead of a bare "additional property" error.
*/}}
{{- define "sparseflow.validate" -}}
{{- include "sparseflow.validateRemovedSettings" . -}}
{{- include "sparseflow.validateImages" . -}}
{{- include "sparseflow.validateDatabase" . -}}
{{- include "sparseflow.validateAuth" . -}}
{{- include "sparseflow.validateArtifacts" . -}}
{{- include "sparseflow.validateEndpoints" . -}}
{{- include "sparseflow.validateWorkerGroups" . -}}
{{- end -}}

{{- define "sparseflow.validateRemovedSettings" -}}
{{- if hasKey .Values "databaseUrl" -}}
{{- fail "`databaseUrl` has been removed. Please use `database.external.url` (or `database.external.existingSecret`) instead." -}}
{{- end -}}
{{- if hasKey .Values "postgresql" -}}
{{- fail "`postgresql` has been removed (no Bitnami subchart). Please use `database.postgresql` instead." -}}
{{- end -}}
{{- if hasKey .Values.api "tokens" -}}
{{- fail "`api.tokens` has been removed. Please use `api.auth.existingSecret` (or `api.auth.tokens`) instead." -}}
{{- end -}}
{{- if hasKey .Values.rayCluster "worker" -}}
{{- fail "`rayCluster.worker` has been removed. Please use `rayCluster.workerGroups` (a list of groups) instead." -}}
{{- end -}}
{{- if hasKey .Values.rayCluster "additionalWorkerGroups" -}}
{{- fail "`rayCluster.additionalWorkerGroups` has been removed. Please use `rayCluster.workerGroups` (a list of groups) instead." -}}
{{- end -}}
{{- if hasKey .Values.api "maxConcurrentJobs" -}}
{{- fail "`api.maxConcurrentJobs` has been removed: the API runs no jobs (cluster mode). Please use `prefectWorker.concurrencyLimit` (flow runs per worker pod) and `prefectWorker.replicaCount` instead." -}}
{{- end -}}
{{- if hasKey .Values.artifacts "bucket" -}}
{{- fail "`artifacts.bucket` has been removed. Please use `artifacts.s3.bucket` instead." -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.validateImages" -}}
{{- $images := dict
  "image.tag" (toString (.Values.image.tag | default .Chart.AppVersion))
  "workerImage.tag" (toString (.Values.workerImage.tag | default .Chart.AppVersion))
  "prefectServer.image.tag" (toString .Values.prefectServer.image.tag)
  "rayCluster.image.tag" (toString (.Values.rayCluster.image.tag | default .Values.workerImage.tag | default .Chart.AppVersion))
  "database.postgresql.image.tag" (toString .Values.database.postgresql.image.tag) -}}
{{- range $key, $tag := $images -}}
{{- if or (not $tag) (regexMatch "(^|[-.])latest$" $tag) -}}
{{- fail (printf "`%s`: %q is a floating tag. Please pin a version." $key $tag) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.validateDatabase" -}}
{{- $ext := .Values.database.external -}}
{{- $pg := .Values.database.postgresql -}}
{{- $external := or $ext.url $ext.existingSecret -}}
{{- if and (not $external) (not $pg.enabled) -}}
{{- fail "No lineage database configured. Please set `database.external.url` or `database.external.existingSecret` (a Secret with the SQLAlchemy URL under `database.external.existingSecretKey`), or `database.postgresql.enabled=true` for development." -}}
{{- end -}}
{{- if and $external $pg.enabled -}}
{{- fail "Both an external database and `database.postgresql.enabled` are set. Please choose one." -}}
{{- end -}}
{{- if and $ext.url $ext.existingSecret -}}
{{- fail "Set only one of `database.external.url` and `database.external.existingSecret`." -}}
{{- end -}}
{{- if and $pg.enabled (not $pg.auth.password) (not $pg.auth.existingSecret) -}}
{{- fail "The bundled PostgreSQL has no default password. Please set `database.postgresql.auth.existingSecret` (or `database.postgresql.auth.password`)." -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.validateAuth" -}}
{{- $auth := .Values.api.auth -}}
{{- if and $auth.enabled (not $auth.existingSecret) (not $auth.tokens) -}}
{{- fail "API auth is enabled but has no tokens. Please set `api.auth.existingSecret` (a Secret with the token->owner JSON map under `api.auth.existingSecretKey`) or `api.auth.tokens`, or set `api.auth.enabled=false`." -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.validateArtifacts" -}}
{{- if and (eq .Values.artifacts.type "s3") (not .Values.artifacts.s3.bucket) -}}
{{- fail "`artifacts.type` is s3 but `artifacts.s3.bucket` is empty. Please set `artifacts.s3.bucket`." -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.validateEndpoints" -}}
{{- if and (not .Values.prefectServer.enabled) (not .Values.prefectServer.externalApiUrl) -}}
{{- fail "`prefectServer.enabled` is false. Please set `prefectServer.externalApiUrl`: the API submits every job to it and the workers take them from it." -}}
{{- end -}}
{{- if and (not .Values.rayCluster.enabled) .Values.rayCluster.externalAddress (not (regexMatch "^(ray://)?[A-Za-z0-9.-]+:[0-9]+$" .Values.rayCluster.externalAddress)) -}}
{{- fail (printf "`rayCluster.externalAddress`: %q is not a Ray address. Please use `host:6379` (GCS) or `ray://host:10001` (Ray Client)." .Values.rayCluster.externalAddress) -}}
{{- end -}}
{{- end -}}

{{- define "sparseflow.validateWorkerGroups" -}}
{{- if .Values.rayCluster.enabled -}}
{{- $seen := dict -}}
{{- range $i, $g := .Values.rayCluster.workerGroups -}}
{{- if hasKey $seen $g.groupName -}}
{{- fail (printf "`rayCluster.workerGroups[%d].groupName`: %q is used twice; group names must be unique." $i $g.groupName) -}}
{{- end -}}
{{- $_ := set $seen $g.groupName true -}}
{{- $min := int ($g.minReplicas | default 0) -}}
{{- $max := int ($g.maxReplicas | default $g.replicas) -}}
{{- if or (lt (int $g.replicas) $min) (gt (int $g.replicas) $max) -}}
{{- fail (printf "`rayCluster.workerGroups[%d]` (%s): replicas must lie between minReplicas and maxReplicas." $i $g.groupName) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
