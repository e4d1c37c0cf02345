{{/*
Names, labels, and the decisions every template shares (scale-out mode,
replica count, which volumes exist, where secrets come from).
*/}}

{{- define "pier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pier.fullname" -}}
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

{{- define "pier.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pier.labels" -}}
helm.sh/chart: {{ include "pier.chart" . }}
{{ include "pier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pier
{{- end }}

{{- define "pier.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pier.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pier.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* "true" when blobs are in S3 and metadata in Redis: replicas share nothing local. */}}
{{- define "pier.scaleOut" -}}
{{- if and (eq .Values.storage.kind "s3") (eq .Values.metadata.kind "redis") }}true{{ end }}
{{- end }}

{{/* "true" when a store lives on the pod's disk (fs blobs or embedded metadata). */}}
{{- define "pier.localData" -}}
{{- if or (eq .Values.storage.kind "fs") (eq .Values.metadata.kind "embedded") }}true{{ end }}
{{- end }}

{{/* Replicas: replicaCount if set, else 2 when scaled out, else 1. */}}
{{- define "pier.replicas" -}}
{{- if kindIs "invalid" .Values.replicaCount }}
{{- if include "pier.scaleOut" . }}2{{ else }}1{{ end }}
{{- else }}
{{- int .Values.replicaCount }}
{{- end }}
{{- end }}

{{/* "true" when more than one pod can run at once (spread, PDB). */}}
{{- define "pier.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int (include "pier.replicas" .)) 1) }}true{{ end }}
{{- end }}

{{/* Where pods mount things; pier.toml names the same paths. */}}
{{- define "pier.dataPath" -}}/var/lib/pier/data{{- end }}
{{- /* One emptyDir for the spool and the local cache: a fetched blob's
verified spool file becomes its local copy by a hard link, which needs both
on one mount. */ -}}
{{- define "pier.localPath" -}}/var/lib/pier/local{{- end }}
{{- define "pier.spoolPath" -}}/var/lib/pier/local/spool{{- end }}
{{- define "pier.localCachePath" -}}/var/lib/pier/local/cache{{- end }}
{{- define "pier.configPath" -}}/etc/pier{{- end }}
{{- define "pier.tlsPath" -}}/etc/pier-tls{{- end }}

{{/* Where the private namespace's htpasswd Secret is mounted. */}}
{{- define "pier.htpasswdPath" -}}/etc/pier-private{{- end }}

{{/* The Secret this chart creates for inline credentials. */}}
{{- define "pier.secretName" -}}{{ include "pier.fullname" . }}{{- end }}

{{/* "true" when the chart has inline credentials to put in its own Secret. */}}
{{- define "pier.ownSecret" -}}
{{- $own := false }}
{{- if and (eq .Values.storage.kind "s3") .Values.storage.s3.accessKeyId }}{{ $own = true }}{{ end }}
{{- if and (eq .Values.metadata.kind "redis") .Values.metadata.redis.url }}{{ $own = true }}{{ end }}
{{- range .Values.config.upstreams }}
{{- if .username }}{{ $own = true }}{{ end }}
{{- end }}
{{- if and .Values.config.admin.token (not .Values.config.admin.existingSecret) }}{{ $own = true }}{{ end }}
{{- if $own }}true{{ end }}
{{- end }}

{{/* The environment-variable form of a registry name: docker.io → DOCKER_IO. */}}
{{- define "pier.registryEnvKey" -}}
{{- regexReplaceAll "[^A-Za-z0-9]" . "_" | upper }}
{{- end }}

{{/* A size for pier.toml: a string ("64KiB") as a TOML string, a number as an integer. */}}
{{- define "pier.tomlSize" -}}
{{- if kindIs "string" . }}{{ toJson . }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}

{{/*
A humantime duration ("300s", "5m", "1h 30m") in milliseconds, or "" when it
uses a unit this does not know (months, years): then it is not checked.
*/}}
{{- define "pier.durationMillis" -}}
{{- $total := 0 }}
{{- $known := true }}
{{- range regexFindAll "[0-9]+\\s*[^0-9\\s]+" (toString .) -1 }}
{{- $n := atoi (regexFind "^[0-9]+" .) }}
{{- $unit := regexReplaceAll "^[0-9]+\\s*" . "" }}
{{- if has $unit (list "ns" "nsec" "nanos" "us" "usec" "µs") }}
{{- else if has $unit (list "ms" "msec" "millis") }}{{ $total = add $total $n }}
{{- else if has $unit (list "s" "sec" "secs" "second" "seconds") }}{{ $total = add $total (mul $n 1000) }}
{{- else if has $unit (list "m" "min" "mins" "minute" "minutes") }}{{ $total = add $total (mul $n 60000) }}
{{- else if has $unit (list "h" "hr" "hrs" "hour" "hours") }}{{ $total = add $total (mul $n 3600000) }}
{{- else if has $unit (list "d" "day" "days") }}{{ $total = add $total (mul $n 86400000) }}
{{- else if has $unit (list "w" "week" "weeks") }}{{ $total = add $total (mul $n 604800000) }}
{{- else }}{{ $known = false }}
{{- end }}
{{- end }}
{{- if $known }}{{ $total }}{{ end }}
{{- end }}

{{- define "pier.redisName" -}}{{ include "pier.fullname" . }}-redis{{- end }}

{{/*
Values the schema cannot express: combinations that would give a pod that
crash-loops or silently loses data. Each message says what to change.
*/}}
{{- define "pier.validate" -}}
{{- $v := .Values }}
{{- $replicas := int (include "pier.replicas" .) }}
{{- if not (include "pier.scaleOut" .) }}
{{- if gt $replicas 1 }}
{{- fail (printf "replicaCount=%d needs storage.kind=s3 and metadata.kind=redis: the fs and embedded stores live on one pod's disk and cannot be shared" $replicas) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs storage.kind=s3 and metadata.kind=redis: the fs and embedded stores cannot be shared between replicas" }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" }}
{{- end }}
{{- if and $v.tls.secretName (include "pier.scaleOut" .) }}
{{- fail "tls.secretName makes Pier's one port HTTPS, and replicas stream blobs to each other over plain HTTP on it: with several replicas, terminate TLS in front of them (ingress.tls or a load balancer)" }}
{{- end }}
{{- if and $v.tls.secretName $v.ingress.enabled }}
{{- fail "tls.secretName and ingress.enabled would both terminate TLS, and the Ingress would speak plain HTTP to an HTTPS port: choose one" }}
{{- end }}
{{- if and $v.ingress.enabled (not $v.config.domains) }}
{{- fail "ingress.enabled needs config.domains: the Ingress serves each domain and its wildcard (*.<domain>)" }}
{{- end }}
{{- if and $v.config.private.enabled (not $v.config.private.htpasswdSecret) }}
{{- fail "config.private.enabled needs config.private.htpasswdSecret: a Secret of yours with the users' htpasswd file (bcrypt entries)" }}
{{- end }}
{{- if and $v.config.private.alias (not $v.config.domains) }}
{{- fail "config.private.alias needs config.domains: the alias is a host prefix under them" }}
{{- end }}
{{- if eq $v.storage.kind "s3" }}
{{- if not $v.storage.s3.bucket }}
{{- fail "storage.kind=s3 needs storage.s3.bucket" }}
{{- end }}
{{- if ne (not $v.storage.s3.accessKeyId) (not $v.storage.s3.secretAccessKey) }}
{{- fail "storage.s3.accessKeyId and storage.s3.secretAccessKey go together (leave both empty for IRSA or existingSecret)" }}
{{- end }}
{{- if and $v.existingSecret $v.storage.s3.accessKeyId }}
{{- fail "set the S3 keys either in storage.s3 or in existingSecret, not both" }}
{{- end }}
{{- end }}
{{- if eq $v.metadata.kind "redis" }}
{{- $sources := 0 }}
{{- if $v.metadata.redis.url }}{{ $sources = add1 $sources }}{{ end }}
{{- if $v.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if $v.inClusterRedis.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail "metadata.kind=redis needs exactly one of metadata.redis.url, existingSecret (key secretKeys.redisUrl) or inClusterRedis.enabled" }}
{{- end }}
{{- else if $v.inClusterRedis.enabled }}
{{- fail "inClusterRedis.enabled needs metadata.kind=redis" }}
{{- end }}
{{- $grace := include "pier.durationMillis" $v.config.server.shutdownGrace }}
{{- $budget := sub (int $v.terminationGracePeriodSeconds) (int $v.preStopSleepSeconds) }}
{{- if and $grace (ge (atoi $grace) (mul $budget 1000)) }}
{{- fail (printf "config.server.shutdownGrace=%s does not fit: the kubelet kills the pod %ds after SIGTERM (terminationGracePeriodSeconds=%d minus preStopSleepSeconds=%d); lower shutdownGrace or raise terminationGracePeriodSeconds" $v.config.server.shutdownGrace $budget (int $v.terminationGracePeriodSeconds) (int $v.preStopSleepSeconds)) }}
{{- end }}
{{- range $v.config.upstreams }}
{{- if ne (not .username) (not .password) }}
{{- fail (printf "config.upstreams (%s): username and password go together" .registry) }}
{{- end }}
{{- if and .existingSecret .username }}
{{- fail (printf "config.upstreams (%s): set username/password or existingSecret, not both" .registry) }}
{{- end }}
{{- end }}
{{- end }}
