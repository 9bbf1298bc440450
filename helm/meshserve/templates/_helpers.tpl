{{/* Names, labels and the mesh's addresses. */}}

{{- define "meshserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-meshserve, or <release> when the release name already holds the chart name.
Kept to 40 characters: a StatefulSet's pods carry a controller-revision-hash label of
<statefulset name>-<10 characters>, which must fit in 63. */}}
{{- define "meshserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of an object; ctx: dict root [, component [, replica]] as for selectorLabels. */}}
{{- define "meshserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "meshserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* Selector labels; ctx: dict root [, component [, replica]]. */}}
{{- define "meshserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if hasKey . "component" }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- if hasKey . "replica" }}
meshserve/replica: {{ .replica | quote }}
{{- end }}
{{- if hasKey . "pool" }}
meshserve/pool: {{ .pool }}
{{- end }}
{{- end -}}

{{/* The LeaderWorkerSet pools (lws.enabled), each with every field filled in, as a YAML list
(read back with fromYamlArray): lws.pools, or one pool "main" of the top-level shape. */}}
{{- define "meshserve.pools" -}}
{{- $v := .Values -}}
{{- $pools := list -}}
{{- range $p := $v.lws.pools | default (list (dict "name" "main")) -}}
{{- $scaling := mergeOverwrite (dict "enabled" false "minReplicas" 1 "maxReplicas" 4 "waitingPerReplica" 8 "scaleDownWindowSeconds" 300) (deepCopy ($p.autoscaling | default dict)) -}}
{{- $replicas := ternary $p.replicas $v.replicas (hasKey $p "replicas") -}}
{{- $pools = append $pools (dict "name" $p.name "replicas" (int $replicas) "tp" (int ($p.tp | default $v.tp)) "pp" (int ($p.pp | default $v.pp)) "worker" ($p.worker | default dict) "autoscaling" $scaling) -}}
{{- end -}}
{{- toYaml $pools -}}
{{- end -}}

{{/* A pool's LeaderWorkerSet name (ctx: dict root, pool): <fullname, 32 at most>-<pool>. Its
worker StatefulSets are <name>-<group>, whose pods' controller-revision-hash label adds 11
characters: 32 + 1 + 12 (pool) + 4 (group) + 11 = 60 <= 63. */}}
{{- define "meshserve.poolName" -}}
{{- printf "%s-%s" (include "meshserve.fullname" .root | trunc 32 | trimSuffix "-") .pool -}}
{{- end -}}

{{- define "meshserve.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "meshserve.redisName" -}}
{{- printf "%s-redis" (include "meshserve.fullname" .) -}}
{{- end -}}

{{- define "meshserve.apiKeysSecretName" -}}
{{- .Values.gateway.apiKeys.existingSecret | default (printf "%s-api-keys" (include "meshserve.fullname" .)) -}}
{{- end -}}

{{/* Per replica i (ctx: dict root, replica): the workers' StatefulSet (= headless Service) name
and the scheduler's Deployment name. */}}
{{- define "meshserve.workerName" -}}
{{- printf "%s-r%d-worker" (include "meshserve.fullname" .root) (int .replica) -}}
{{- end -}}

{{- define "meshserve.schedulerName" -}}
{{- printf "%s-r%d-scheduler" (include "meshserve.fullname" .root) (int .replica) -}}
{{- end -}}

{{/* The scheduler's --workers of replica i: every TP rank of every stage, stage-major.

    <sts>-<s>.<sts>.<namespace>.svc.<clusterDomain>:<worker.port + r>   s < pp, r < tp

Pod s of the StatefulSet is stage s; its process r (TP rank r) listens on worker.port + r. */}}
{{- define "meshserve.workerAddresses" -}}
{{- $root := .root -}}
{{- $sts := include "meshserve.workerName" . -}}
{{- $addresses := list -}}
{{- range $stage := until (int $root.Values.pp) -}}
{{- range $rank := until (int $root.Values.tp) -}}
{{- $host := printf "%s-%d.%s.%s.svc.%s" $sts $stage $sts $root.Release.Namespace $root.Values.clusterDomain -}}
{{- $addresses = append $addresses (printf "%s:%d" $host (add (int $root.Values.worker.port) $rank)) -}}
{{- end -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/* --redis-url of every service: the release's Redis, the URL given, or $(REDIS_URL) read
from a Secret (see meshserve.redisEnv). */}}
{{- define "meshserve.redisUrl" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled -}}
{{- printf "redis://:$(REDIS_PASSWORD)@%s:%d/0" (include "meshserve.redisName" .) (int .Values.redis.port) -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s:%d/0" (include "meshserve.redisName" .) (int .Values.redis.port) -}}
{{- else if .Values.redis.existingSecret -}}
$(REDIS_URL)
{{- else -}}
{{- required "redis.enabled is false: set redis.url (redis://host:6379/0) or redis.existingSecret" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- define "meshserve.redisEnv" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.existingSecretKey }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
{{- end -}}

{{/* Volumes shared by gateway and worker pods: the built-in model's cache, and the models. */}}
{{- define "meshserve.modelVolumes" -}}
- name: cache
  emptyDir: {}
{{- with .Values.model.volume }}
- name: models
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "meshserve.modelVolumeMounts" -}}
- name: cache
  mountPath: /cache
{{- if .Values.model.volume }}
- name: models
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod settings shared by every meshserve pod. */}}
{{- define "meshserve.podCommon" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Placement of one component; ctx: its values (nodeSelector, tolerations, affinity). */}}
{{- define "meshserve.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Settings that only a template can check (values.schema.json checks each value alone). */}}
{{- define "meshserve.checks" -}}
{{- $v := .Values -}}
{{- if and $v.worker.layerSplit (ne (len $v.worker.layerSplit) (int $v.pp)) -}}
{{- fail (printf "worker.layerSplit has %d entries but pp is %d: give one layer count per stage, or []" (len $v.worker.layerSplit) (int $v.pp)) -}}
{{- end -}}
{{- $first := int $v.worker.port -}}
{{- $dist := int $v.worker.distInitPort -}}
{{- if and (ge $dist $first) (lt $dist (add $first (int $v.tp))) -}}
{{- fail (printf "worker.distInitPort %d falls among the worker ports %d..%d (worker.port + tp rank): move one of them" $dist $first (sub (add $first (int $v.tp)) 1)) -}}
{{- end -}}
{{- $metrics := int $v.worker.metricsPort -}}
{{- if and (ge $metrics 0) (lt $metrics (add $first (int $v.tp))) (lt $first (add $metrics (int $v.tp))) -}}
{{- fail (printf "worker.metricsPort %d..%d overlaps the worker ports %d..%d (one of each per tp rank): move one of them" $metrics (sub (add $metrics (int $v.tp)) 1) $first (sub (add $first (int $v.tp)) 1)) -}}
{{- end -}}
{{- if and (ge $dist $metrics) (lt $dist (add $metrics (int $v.tp))) -}}
{{- fail (printf "worker.distInitPort %d falls among the worker metrics ports %d..%d: move one of them" $dist $metrics (sub (add $metrics (int $v.tp)) 1)) -}}
{{- end -}}
{{- if $v.lws.enabled -}}
{{- $names := list -}}
{{- range $pool := include "meshserve.pools" . | fromYamlArray -}}
{{- if has $pool.name $names -}}
{{- fail (printf "lws.pools: two pools are named %q: give each its own name" $pool.name) -}}
{{- end -}}
{{- $names = append $names $pool.name -}}
{{- if and $v.gpu.enabled (gt (int $pool.tp) (int $v.gpu.gpusPerNode)) -}}
{{- fail (printf "pool %s: tp %d needs %d GPUs in one worker pod but gpu.gpusPerNode is %d: a TP group stays on one node; lower tp and raise pp (or set gpusPerNode)" $pool.name (int $pool.tp) (int $pool.tp) (int $v.gpu.gpusPerNode)) -}}
{{- end -}}
{{- if and $pool.autoscaling.enabled (gt (int $pool.autoscaling.minReplicas) (int $pool.autoscaling.maxReplicas)) -}}
{{- fail (printf "pool %s: autoscaling.minReplicas %d is above maxReplicas %d" $pool.name (int $pool.autoscaling.minReplicas) (int $pool.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and $v.worker.layerSplit (ne (len $v.worker.layerSplit) (int $pool.pp)) -}}
{{- fail (printf "worker.layerSplit has %d entries but pool %s has pp %d: give one layer count per stage, or []" (len $v.worker.layerSplit) $pool.name (int $pool.pp)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.gpu.enabled (gt (int $v.tp) (int $v.gpu.gpusPerNode)) -}}
{{- fail (printf "tp %d needs %d GPUs in one worker pod but gpu.gpusPerNode is %d: a TP group stays on one node; lower tp and raise pp (or set gpusPerNode)" (int $v.tp) (int $v.tp) (int $v.gpu.gpusPerNode)) -}}
{{- end -}}
{{- with $v.gateway.autoscaling -}}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) -}}
{{- fail (printf "gateway.autoscaling.minReplicas %d is above maxReplicas %d" (int .minReplicas) (int .maxReplicas)) -}}
{{- end -}}
{{- if and .enabled (not (dig "requests" "cpu" "" ($v.gateway.resources | default dict))) -}}
{{- fail "gateway.autoscaling scales on CPU utilization: set gateway.resources.requests.cpu (e.g. 1)" -}}
{{- end -}}
{{- end -}}
{{- if and $v.redis.enabled $v.redis.auth.enabled (not $v.redis.auth.existingSecret) -}}
{{- fail "redis.auth.enabled is true: set redis.auth.existingSecret (a Secret with key REDIS_PASSWORD)" -}}
{{- end -}}
{{- if and $v.gateway.apiKeys.enabled (not $v.gateway.apiKeys.existingSecret) (not $v.gateway.apiKeys.keys) -}}
{{- fail "gateway.apiKeys.enabled is true: set gateway.apiKeys.existingSecret (a Secret with key MESHSERVE_API_KEYS) or gateway.apiKeys.keys" -}}
{{- end -}}
{{- end -}}
