{{/* Pod specs of the mesh's workloads, shared by the per-replica StatefulSet + Deployment and the
LeaderWorkerSet pools. ctx: dict root (the chart's top scope), v (the values, with a pool's own
tp, pp, model and overrides merged in) and, for the scheduler, workers and replicaId ("" both:
a LeaderWorkerSet leader, whose scheduler.sh derives them from its pod name). */}}

{{- define "meshserve.workerPodSpec" -}}
{{- $root := .root -}}
{{- $v := .v -}}
{{- $tp := int $v.tp -}}
{{- $pp := int $v.pp -}}
{{- with include "meshserve.podCommon" $root }}{{ . | trim | nindent 0 }}{{ end }}
terminationGracePeriodSeconds: {{ add (int $v.scheduler.drainTimeout) 30 }}
{{- if and $v.gpu.enabled $v.gpu.runtimeClassName }}
runtimeClassName: {{ $v.gpu.runtimeClassName }}
{{- end }}
{{- with include "meshserve.placement" $v.worker }}{{ . | trim | nindent 0 }}{{ end }}
{{- with $v.worker.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: worker
    image: {{ include "meshserve.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command: ["/bin/bash", "/opt/meshserve-scripts/worker.sh"]
    args:
      {{- with $v.model.path }}
      - --model
      - {{ . | quote }}
      {{- end }}
      - --host
      - "0.0.0.0"
      - --device
      - {{ $v.worker.device | quote }}
      - --dtype
      - {{ $v.worker.dtype | quote }}
      - --block-size
      - {{ int $v.worker.blockSize | quote }}
      - --num-kv-blocks
      - {{ int $v.worker.numKvBlocks | quote }}
      - --kv-cache-memory-gb
      - {{ toString $v.worker.kvCacheMemoryGb | quote }}
      {{- with $v.worker.layerSplit }}
      - --layer-split
      - {{ join "," . | quote }}
      {{- end }}
      - --max-model-len
      - {{ int $v.worker.maxModelLen | quote }}
      - --num-threads
      - {{ int $v.worker.numThreads | quote }}
      {{- with $v.scheduler.speculativeConfig }}
      - --num-speculative-tokens
      - {{ int .num_speculative_tokens | quote }}
      {{- with .model }}
      - --draft-model
      - {{ . | quote }}
      {{- end }}
      {{- end }}
      - --drain-timeout
      - {{ int $v.scheduler.drainTimeout | quote }}
    env:
      - name: POD_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      - name: TP_SIZE
        value: {{ $tp | quote }}
      - name: PP_SIZE
        value: {{ $pp | quote }}
      - name: FIRST_PORT
        value: {{ int $v.worker.port | quote }}
      - name: DIST_INIT_PORT
        value: {{ int $v.worker.distInitPort | quote }}
      - name: METRICS_PORT
        value: {{ int $v.worker.metricsPort | quote }}
      - name: MESHSERVE_CACHE
        value: /cache
      - name: PYTHONUNBUFFERED
        value: "1"
      {{- if $v.gpu.enabled }}
      {{- range $name, $value := $v.gpu.env }}
      - name: {{ $name }}
        value: {{ toString $value | quote }}
      {{- end }}
      {{- end }}
      {{- if $v.rdma.enabled }}
      {{- range $name, $value := dict "UCX_TLS" $v.rdma.ucxTls "UCX_NET_DEVICES" $v.rdma.ucxNetDevices "NCCL_IB_HCA" $v.rdma.ncclIbHca "NCCL_SOCKET_IFNAME" $v.rdma.ncclSocketIfname }}
      {{- if $value }}
      - name: {{ $name }}
        value: {{ toString $value | quote }}
      {{- end }}
      {{- end }}
      {{- end }}
      {{- range $name, $value := $v.worker.env }}
      - name: {{ $name }}
        value: {{ toString $value | quote }}
      {{- end }}
    ports:
      {{- range $rank := until $tp }}
      - name: rank-{{ $rank }}
        containerPort: {{ add (int $v.worker.port) $rank }}
      {{- end }}
      {{- if ge (int $v.worker.metricsPort) 0 }}
      {{- range $rank := until $tp }}
      - name: metrics-{{ $rank }}
        containerPort: {{ add (int $v.worker.metricsPort) $rank }}
      {{- end }}
      {{- end }}
    # Ready once every rank listens: its TP group has formed and its shard is loaded.
    readinessProbe:
      exec:
        command:
          - /bin/bash
          - -c
          - 'for ((r = 0; r < TP_SIZE; r++)); do (: <>"/dev/tcp/127.0.0.1/$((FIRST_PORT + r))") || exit 1; done'
      periodSeconds: 5
      timeoutSeconds: 3
    {{- $resources := deepCopy ($v.worker.resources | default dict) }}
    {{- if $v.gpu.enabled }}
    {{- $limits := get $resources "limits" | default dict }}
    {{- $_ := set $limits $v.gpu.resourceName $tp }}
    {{- $_ := set $resources "limits" $limits }}
    {{- end }}
    {{- if $v.rdma.enabled }}
    {{- $limits := get $resources "limits" | default dict }}
    {{- $_ := set $limits $v.rdma.resourceName (int $v.rdma.count) }}
    {{- $_ := set $resources "limits" $limits }}
    {{- end }}
    {{- with $resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- $security := deepCopy ($v.securityContext | default dict) }}
    {{- if $v.rdma.enabled }}
    {{- /* registered (pinned) memory for RDMA verbs: IPC_LOCK, added to any given */ -}}
    {{- $caps := get $security "capabilities" | default dict }}
    {{- $_ := set $caps "add" (append (get $caps "add" | default list) "IPC_LOCK" | uniq) }}
    {{- $_ := set $security "capabilities" $caps }}
    {{- end }}
    {{- with $security }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: scripts
        mountPath: /opt/meshserve-scripts
        readOnly: true
      - name: shm
        mountPath: /dev/shm
      {{- include "meshserve.modelVolumeMounts" $root | nindent 6 }}
volumes:
  - name: scripts
    configMap:
      name: {{ include "meshserve.fullname" $root }}-scripts
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.worker.shmSize }}
  {{- include "meshserve.modelVolumes" $root | nindent 2 }}
{{- end -}}

{{- define "meshserve.schedulerPodSpec" -}}
{{- $root := .root -}}
{{- $v := .v -}}
{{- $workers := .workers -}}
{{- $replicaId := .replicaId -}}
{{- with include "meshserve.podCommon" $root }}{{ . | trim | nindent 0 }}{{ end }}
terminationGracePeriodSeconds: {{ add (int $v.scheduler.drainTimeout) 30 }}
{{- with include "meshserve.placement" $v.scheduler }}{{ . | trim | nindent 0 }}{{ end }}
{{- if $workers }}
initContainers:
  - name: wait-for-workers
    image: {{ include "meshserve.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    command: ["/bin/bash", "/opt/meshserve-scripts/wait-for-workers.sh"]
    args:
      {{- range splitList "," $workers }}
      - {{ . | quote }}
      {{- end }}
    {{- with $v.securityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: scripts
        mountPath: /opt/meshserve-scripts
        readOnly: true
{{- end }}
containers:
  - name: scheduler
    image: {{ include "meshserve.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    {{- if not $workers }}
    # a LeaderWorkerSet leader: scheduler.sh names its group's workers, waits for them, then
    # runs `meshserve scheduler --workers ... --replica-id <this pod> <args>`
    command: ["/bin/bash", "/opt/meshserve-scripts/scheduler.sh"]
    {{- end }}
    args:
      {{- if $workers }}
      - scheduler
      - --workers
      - {{ $workers | quote }}
      {{- end }}
      - --redis-url
      - {{ include "meshserve.redisUrl" $root | quote }}
      - --host
      - "0.0.0.0"
      - --port
      - {{ int $v.scheduler.port | quote }}
      # The gateway dials the address registered in Redis: this pod's IP.
      - --advertise-host
      - $(POD_IP)
      {{- if $workers }}
      - --replica-id
      - {{ $replicaId | quote }}
      {{- end }}
      {{- with $v.scheduler.modelName }}
      - --model-name
      - {{ . | quote }}
      {{- end }}
      - --max-num-seqs
      - {{ int $v.scheduler.maxNumSeqs | quote }}
      - --max-num-batched-tokens
      - {{ int $v.scheduler.maxNumBatchedTokens | quote }}
      {{- if not $v.scheduler.chunkedPrefill }}
      - --no-chunked-prefill
      {{- end }}
      {{- if not $v.scheduler.prefixCaching }}
      - --no-prefix-caching
      {{- end }}
      {{- with $v.scheduler.speculativeConfig }}
      - --speculative-config
      - {{ . | toJson | quote }}
      {{- end }}
      - --heartbeat-ttl
      - {{ toString $v.scheduler.heartbeatTtl | quote }}
      - --max-inflight-steps
      - {{ int $v.scheduler.maxInflightSteps | quote }}
      - --drain-timeout
      - {{ int $v.scheduler.drainTimeout | quote }}
      {{- if ge (int $v.scheduler.metricsPort) 0 }}
      - --metrics-port
      - {{ int $v.scheduler.metricsPort | quote }}
      {{- end }}
    env:
      - name: POD_IP
        valueFrom:
          fieldRef:
            fieldPath: status.podIP
      - name: POD_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      - name: PYTHONUNBUFFERED
        value: "1"
      {{- if not $workers }}
      # scheduler.sh: its workers are <this pod>-<stage 1..PP_SIZE>.WORKER_DOMAIN, ranks on
      # FIRST_PORT + r
      - name: TP_SIZE
        value: {{ int $v.tp | quote }}
      - name: PP_SIZE
        value: {{ int $v.pp | quote }}
      - name: FIRST_PORT
        value: {{ int $v.worker.port | quote }}
      - name: WORKER_DOMAIN
        value: {{ .workerDomain | quote }}
      {{- end }}
      {{- with include "meshserve.redisEnv" $root }}{{ . | trim | nindent 6 }}{{ end }}
      # for the preStop hook (Kubernetes expands $(VAR) in env values, not in hooks)
      - name: MESHSERVE_REDIS_URL
        value: {{ include "meshserve.redisUrl" $root | quote }}
      - name: MESHSERVE_REPLICA_ID
        value: {{ $replicaId | default "$(POD_NAME)" | quote }}
    # Scale-down: mark the replica draining (gateways route elsewhere at once) and wait until
    # it has finished its requests and left; SIGTERM would drain it all the same, after.
    lifecycle:
      preStop:
        exec:
          command:
            - /bin/bash
            - -c
            - 'meshserve drain --redis-url "$MESHSERVE_REDIS_URL" --wait {{ int $v.scheduler.drainTimeout }} "$MESHSERVE_REPLICA_ID" || true'
    ports:
      - name: grpc
        containerPort: {{ int $v.scheduler.port }}
      {{- if ge (int $v.scheduler.metricsPort) 0 }}
      - name: metrics
        containerPort: {{ int $v.scheduler.metricsPort }}
      {{- end }}
    # grpc.health.v1 answers once its workers answered and it registered in Redis. A
    # scheduler whose workers fail exits (and deregisters), so the kubelet's restart is its
    # liveness check.
    readinessProbe:
      grpc:
        port: {{ int $v.scheduler.port }}
        service: meshserve.internal.v1.Scheduler
      periodSeconds: 5
    {{- with $v.scheduler.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.securityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: scripts
        mountPath: /opt/meshserve-scripts
        readOnly: true
volumes:
  - name: scripts
    configMap:
      name: {{ include "meshserve.fullname" $root }}-scripts
{{- end -}}
