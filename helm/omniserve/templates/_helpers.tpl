{{/*
Names and labels, the usual way: release-scoped, 63 characters at most.
*/}}
{{- define "omniserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "omniserve.fullname" -}}
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

{{- define "omniserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "omniserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "omniserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "omniserve.labels" -}}
helm.sh/chart: {{ include "omniserve.chart" . }}
{{ include "omniserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end }}

{{- define "omniserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "omniserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image flavour: "cuda" (deploy/Dockerfile.cuda) when the pod gets GPUs, "cpu" (deploy/Dockerfile.cpu) otherwise.
*/}}
{{- define "omniserve.flavour" -}}
{{- ternary "cuda" "cpu" (gt (int .Values.accelerator.count) 0) }}
{{- end }}

{{/*
The image: an explicit tag wins; otherwise the CPU or CUDA flavour of this chart's appVersion.
*/}}
{{- define "omniserve.image" -}}
{{- $flavour := include "omniserve.flavour" . }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $flavour) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Fixed paths inside the pod; the Dockerfiles use the same ones. */}}
{{- define "omniserve.cacheDir" -}}/var/cache/omniserve{{- end }}
{{- define "omniserve.modelsDir" -}}/models{{- end }}
{{- define "omniserve.apiKeysDir" -}}/etc/omniserve/api-keys{{- end }}
{{- define "omniserve.adaptersDir" -}}/adapters{{- end }}

{{/* "true" when the LoRA adapters volume is configured (a claim or another volume source). */}}
{{- define "omniserve.loraVolume" -}}
{{- if or .Values.lora.volume.claimName .Values.lora.volume.source }}true{{ end }}
{{- end }}

{{- define "omniserve.modelPath" -}}
{{- $path := trimAll "/" .Values.model.path }}
{{- if $path }}{{ include "omniserve.modelsDir" . }}/{{ $path }}{{ else }}{{ include "omniserve.modelsDir" . }}{{ end }}
{{- end }}

{{- define "omniserve.quantCacheDir" -}}{{ include "omniserve.cacheDir" . }}/quantized{{- end }}

{{/*
A scalar as a CLI word. Numbers read from YAML files arrive as float64, and printing those naively
turns 52428800 into "5.24288e+07", which the CLI would refuse: whole numbers print as integers.
*/}}
{{- define "omniserve.word" -}}
{{- if kindIs "float64" . }}
{{- if eq . (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
The arguments of `omniserve deploy` (the image's entrypoint), one flag per option value; null values are
left out so the CLI's defaults apply. Returned as a YAML list.
*/}}
{{- define "omniserve.args" -}}
{{- $v := .Values }}
{{- $args := list "--host" "0.0.0.0" "--port" (include "omniserve.word" $v.server.port) "--engine" $v.engine.name }}
{{- if ne $v.model.source "builtin" }}
{{- $args = concat $args (list "--model" (include "omniserve.modelPath" .)) }}
{{- else if and $v.model.builtin (ne $v.model.builtin "omni") }}
{{- $args = concat $args (list "--model" (printf "builtin:%s" $v.model.builtin)) }}
{{- end }}
{{- if $v.model.servedModelName }}
{{- $args = concat $args (list "--served-model-name" $v.model.servedModelName) }}
{{- end }}
{{- if $v.auth.existingSecret }}
{{- $args = concat $args (list "--api-key-file" (printf "%s/%s" (include "omniserve.apiKeysDir" .) $v.auth.secretKey)) }}
{{- end }}
{{- if $v.quantization.method }}
{{- $args = concat $args (list "--quant" $v.quantization.method "--quant-cache-dir" (include "omniserve.quantCacheDir" .)) }}
{{- if $v.quantization.gate }}
{{- $args = concat $args (list "--gate" $v.quantization.gate) }}
{{- end }}
{{- if $v.quantization.force }}
{{- $args = append $args "--force" }}
{{- end }}
{{- end }}
{{- $options := list
  (list "--dtype" $v.engine.dtype)
  (list "--device" $v.engine.device)
  (list "--max-model-len" $v.engine.maxModelLen)
  (list "--max-concurrency" $v.engine.maxConcurrency)
  (list "--max-queue" $v.engine.maxQueue)
  (list "--max-n" $v.engine.maxN)
  (list "--max-loras" $v.lora.maxLoras)
  (list "--max-lora-rank" $v.lora.maxLoraRank)
  (list "--max-request-bytes" $v.server.maxRequestBytes)
  (list "--drain-delay" $v.server.drainDelaySeconds)
  (list "--drain-timeout" $v.server.drainTimeoutSeconds)
  (list "--stall-timeout" $v.server.stallTimeoutSeconds)
  (list "--max-media-bytes" $v.media.maxBytes)
  (list "--max-image-pixels" $v.media.maxImagePixels)
  (list "--video-fps" $v.media.videoFps)
  (list "--max-video-frames" $v.media.maxVideoFrames)
  (list "--max-video-seconds" $v.media.maxVideoSeconds)
  (list "--max-audio-seconds" $v.media.maxAudioSeconds)
  (list "--media-fetch-timeout" $v.media.fetchTimeoutSeconds)
  (list "--max-pixels-per-request" $v.media.maxPixelsPerRequest)
  (list "--max-audio-seconds-per-request" $v.media.maxAudioSecondsPerRequest)
  (list "--max-concurrent-decodes" $v.media.maxConcurrentDecodes)
  (list "--max-decoded-media-bytes" $v.media.maxDecodedBytes)
  (list "--media-wait-timeout" $v.media.waitTimeoutSeconds)
  (list "--media-decode-timeout" $v.media.decodeTimeoutSeconds)
}}
{{- range $options }}
{{- if not (kindIs "invalid" (index . 1)) }}
{{- $args = concat $args (list (index . 0) (include "omniserve.word" (index . 1))) }}
{{- end }}
{{- end }}
{{- $engineArgs := $v.engine.args }}
{{- if $v.multiNode.enabled }}
{{- /* vLLM shards over the pods' Ray cluster; omniserve.checkMultiNode refuses any other backend */}}
{{- $engineArgs = merge (dict "distributed_executor_backend" "ray") $v.engine.args }}
{{- end }}
{{- range $key, $value := $engineArgs }}
{{- $args = concat $args (list "--engine-arg" (printf "%s=%s" $key (include "omniserve.word" $value))) }}
{{- end }}
{{- range $v.lora.adapters }}
{{- $args = concat $args (list "--lora" (printf "%s=%s/%s" .name (include "omniserve.adaptersDir" $) (trimAll "/" .path))) }}
{{- end }}
{{- if $v.lora.allowRuntime }}
{{- $root := trimAll "/" $v.lora.root }}
{{- $args = concat $args (list "--allow-runtime-lora" "--lora-root" (ternary (printf "%s/%s" (include "omniserve.adaptersDir" .) $root) (include "omniserve.adaptersDir" .) (ne $root ""))) }}
{{- end }}
{{- range $key, $value := $v.media.limitPerRequest }}
{{- $args = concat $args (list "--limit-media-per-request" (printf "%s=%s" $key (include "omniserve.word" $value))) }}
{{- end }}
{{- range $v.media.allowedDomains }}
{{- $args = concat $args (list "--allowed-media-domains" .) }}
{{- end }}
{{- if $v.media.allowPrivateAddresses }}
{{- $args = append $args "--allow-private-media-addresses" }}
{{- end }}
{{- if $v.media.allowedLocalPath }}
{{- $args = concat $args (list "--allowed-local-media-path" $v.media.allowedLocalPath) }}
{{- end }}
{{- range $v.server.corsOrigins }}
{{- $args = concat $args (list "--cors-origin" .) }}
{{- end }}
{{- $args = concat $args (list "--log-level" $v.server.logLevel) $v.server.extraArgs }}
{{- toYaml $args }}
{{- end }}

{{/*
The GPUs the engine args ask for (tensor x pipeline parallel) must be the GPUs the pod gets: fewer and
the engine cannot start, more and they sit idle while another pod waits for them.
*/}}
{{- define "omniserve.checkParallelism" -}}
{{- $tp := int (default 1 (index .Values.engine.args "tensor_parallel_size")) }}
{{- $pp := int (default 1 (index .Values.engine.args "pipeline_parallel_size")) }}
{{- $want := mul $tp $pp }}
{{- if .Values.multiNode.enabled }}
{{- $size := int .Values.multiNode.size }}
{{- $gpus := int .Values.accelerator.count }}
{{- if ne $want (mul $size $gpus) }}
{{- fail (printf "multiNode: engine.args tensor_parallel_size x pipeline_parallel_size = %d x %d = %d GPUs, but the group has multiNode.size x accelerator.count = %d x %d = %d: make them equal (e.g. tensor_parallel_size = accelerator.count, pipeline_parallel_size = multiNode.size)" $tp $pp $want $size $gpus (mul $size $gpus)) }}
{{- end }}
{{- else if and (gt $want 1) (ne $want (int .Values.accelerator.count)) }}
{{- fail (printf "engine.args tensor_parallel_size x pipeline_parallel_size = %d GPUs, but accelerator.count = %d: set accelerator.count to %d" $want (int .Values.accelerator.count) $want) }}
{{- end }}
{{- end }}

{{/* The accelerator resource merged into requests and limits (extended resources need both equal). */}}
{{- define "omniserve.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .accelerator.count) 0 }}
{{- $gpu := dict .accelerator.resourceName (int .accelerator.count) }}
{{- $_ := set $res "limits" (mergeOverwrite (default dict (get $res "limits")) $gpu) }}
{{- $_ := set $res "requests" (mergeOverwrite (default dict (get $res "requests")) $gpu) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "omniserve.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "omniserve.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
Environment of omniserve's containers: only where the writable volumes are (the root filesystem is
read-only), plus extraEnv for the libraries below omniserve. No omniserve option travels here.
*/}}
{{- define "omniserve.env" -}}
- name: HOME
  value: /home/omniserve
- name: XDG_CACHE_HOME
  value: {{ include "omniserve.cacheDir" . }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The writable volumes and the checkpoint (read-only: the server never writes it). */}}
{{- define "omniserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/omniserve
- name: cache
  mountPath: {{ include "omniserve.cacheDir" . }}
{{- if and (eq .Values.model.source "download") (eq .Values.model.download.storage "cache") }}
- name: cache
  mountPath: {{ include "omniserve.modelsDir" . }}
  subPath: models
  readOnly: true
{{- else if ne .Values.model.source "builtin" }}
- name: models
  mountPath: {{ include "omniserve.modelsDir" . }}
  readOnly: true
{{- end }}
{{- if include "omniserve.loraVolume" . }}
- name: lora-adapters
  mountPath: {{ include "omniserve.adaptersDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
LoRA adapters are read from their volume: adapters or run-time loading without one would fail at start
(or at every load), a root without run-time loading would be ignored, and two adapters under one name
would leave the second unreachable.
*/}}
{{- define "omniserve.checkLora" -}}
{{- $lora := .Values.lora }}
{{- if and (or $lora.adapters $lora.allowRuntime) (not (include "omniserve.loraVolume" .)) }}
{{- fail "lora.adapters and lora.allowRuntime read adapters from a volume mounted at /adapters: set lora.volume.claimName (a PersistentVolumeClaim) or lora.volume.source (e.g. {hostPath: {path: /data/adapters}})" }}
{{- end }}
{{- if and $lora.root (not $lora.allowRuntime) }}
{{- fail "lora.root is where run-time loading (POST /v1/load_lora_adapter) may read from: it needs lora.allowRuntime" }}
{{- end }}
{{- $seen := dict }}
{{- range $lora.adapters }}
{{- if hasKey $seen .name }}
{{- fail (printf "lora.adapters: the name %q is used twice; each adapter needs its own name" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- end }}
{{- end }}

{{/*
A quality gate compares the quantized model with its original: without quantization.method there is
nothing to gate, and force without a gate overrides nothing. Both would be silently ignored flags.
*/}}
{{- define "omniserve.checkGate" -}}
{{- $q := .Values.quantization }}
{{- if and $q.gate (not $q.method) }}
{{- fail "quantization.gate needs quantization.method (the gate scores the quantized model against the original)" }}
{{- end }}
{{- if and $q.force (not $q.gate) }}
{{- fail "quantization.force overrides a failed quality gate: it needs quantization.gate" }}
{{- end }}
{{- if and $q.gate (eq (include "omniserve.flavour" .) "cuda") }}
{{- fail "quantization.gate does not work in the CUDA image: the gate serves both models with the server's engine beside EvalScope and llm-compressor, and vLLM cannot share their environment (deploy/Dockerfile.cuda). Run `omniserve deploy --model M --quant METHOD --gate SUITE --quantize-only` where the quantize and eval extras are installed, then serve the folder it prints (model.path) without quantization.method" }}
{{- end }}
{{- end }}

{{/*
Whether an init step quantizes before the server starts. In the CUDA image always: its server's environment
holds vLLM, whose compressed-tensors pin llm-compressor cannot share, so that server cannot quantize on start;
the image's second environment (/opt/omniserve-quantize, deploy/Dockerfile.cuda) does it, and the server finds
the weights cached. In the CPU image, one environment has both and quantization.mode chooses.
*/}}
{{- define "omniserve.quantizeInInitStep" -}}
{{- $q := .Values.quantization }}
{{- if and $q.method (or (eq $q.mode "initContainer") (eq (include "omniserve.flavour" .) "cuda")) }}true{{ end }}
{{- end }}

{{/*
The init step's executable: quantization.initContainer.command, or the omniserve that can quantize in the
chart's own image (the one on PATH in the CPU image, the quantization environment's in the CUDA image).
*/}}
{{- define "omniserve.quantizeCommand" -}}
{{- $command := .Values.quantization.initContainer.command }}
{{- if not $command }}
{{- $command = ternary (list "/opt/omniserve-quantize/bin/omniserve") (list "omniserve") (eq (include "omniserve.flavour" .) "cuda") }}
{{- end }}
{{- toYaml $command }}
{{- end }}

{{/*
Kubernetes kills the pod terminationGracePeriodSeconds after SIGTERM. The server drains for
server.drainDelaySeconds + server.drainTimeoutSeconds, then stops the engine: a shorter grace period cuts
running answers off mid-stream, which is what the drain exists to prevent.
*/}}
{{- define "omniserve.checkGracePeriod" -}}
{{- $s := .Values.server }}
{{- $need := add (ceil $s.drainDelaySeconds) (ceil $s.drainTimeoutSeconds) 10 }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $need) }}
{{- fail (printf "terminationGracePeriodSeconds %d is too short for the drain: server.drainDelaySeconds %v + server.drainTimeoutSeconds %v + 10 s to stop the engine = %d; raise it (or lower the drain)" (int .Values.terminationGracePeriodSeconds) $s.drainDelaySeconds $s.drainTimeoutSeconds (int $need)) }}
{{- end }}
{{- end }}

{{/*
Multi-node mode shards one vLLM engine over the Ray cluster of a LeaderWorkerSet group. What cannot work
there is refused before anything reaches the cluster, rather than found in a pod's log an hour later.
*/}}
{{- define "omniserve.checkMultiNode" -}}
{{- $v := .Values }}
{{- if ne $v.engine.name "vllm" }}
{{- fail (printf "multiNode.enabled needs engine.name vllm (got %q): only vLLM shards one model over several pods (through Ray); the other engines serve from one pod, so turn multiNode off and raise accelerator.count instead" $v.engine.name) }}
{{- end }}
{{- with (index $v.engine.args "distributed_executor_backend") }}
{{- if ne (toString .) "ray" }}
{{- fail (printf "multiNode.enabled runs vLLM on Ray across the pods: engine.args.distributed_executor_backend %q cannot reach the workers' GPUs; leave it out (the chart sets ray)" (toString .)) }}
{{- end }}
{{- end }}
{{- if lt (int $v.multiNode.size) 2 }}
{{- fail "multiNode.size is the number of pods per group, leader included: at least 2 (one pod needs no multiNode)" }}
{{- end }}
{{- if lt (int $v.accelerator.count) 1 }}
{{- fail "multiNode.enabled needs accelerator.count >= 1: the GPUs each pod (leader and workers) gives the Ray cluster" }}
{{- end }}
{{- if eq $v.model.source "builtin" }}
{{- fail "multiNode.enabled needs model.source pvc, hostPath or download: every pod of the group loads its shard from /models, and the built-in model only exists on the pod that builds it" }}
{{- end }}
{{- if $v.quantization.method }}
{{- fail "multiNode.enabled with quantization.method: the workers would need the quantized weights the leader writes into its own cache. Quantize once with `omniserve deploy --model M --quant METHOD --quantize-only` and serve the folder it prints (model.path)" }}
{{- end }}
{{- end }}

{{/*
The leader's script: start the Ray head with this pod's GPUs, then exec the image's entrypoint with the
arguments that follow the script ("$@": the same flag list a single pod gets, kept as a YAML list).
*/}}
{{- define "omniserve.rayHeadScript" -}}
{{- $m := .Values.multiNode -}}
ray start --head --port={{ include "omniserve.word" $m.rayPort }} --num-gpus={{ include "omniserve.word" .Values.accelerator.count }} --include-dashboard=false --disable-usage-stats && exec omniserve deploy "$@"
{{- end }}

{{/*
A worker's script: wait until the leader's Ray head answers (LeaderWorkerSet starts both at once), then
join it for as long as it lives. LWS_LEADER_ADDRESS is set by LeaderWorkerSet in every pod of a group.
*/}}
{{- define "omniserve.rayWorkerScript" -}}
{{- $m := .Values.multiNode -}}
head="${LWS_LEADER_ADDRESS}:{{ include "omniserve.word" $m.rayPort }}"; until ray health-check --address "$head" >/dev/null 2>&1; do echo "waiting for the Ray head at $head"; sleep 5; done; exec ray start --address="$head" --num-gpus={{ include "omniserve.word" .Values.accelerator.count }} --disable-usage-stats --block
{{- end }}

{{/*
Selector of the pods that serve HTTP: every pod of a single-pod release, only the leaders (LeaderWorkerSet
gives them worker index 0) in multi-node mode, where workers run Ray alone.
*/}}
{{- define "omniserve.servingSelectorLabels" -}}
{{ include "omniserve.selectorLabels" . }}
{{- if .Values.multiNode.enabled }}
leaderworkerset.sigs.k8s.io/worker-index: "0"
{{- end }}
{{- end }}

{{/* What an autoscaler scales: the Deployment, or the LeaderWorkerSet's groups (its scale subresource). */}}
{{- define "omniserve.scaleTargetRef" -}}
apiVersion: {{ ternary "leaderworkerset.x-k8s.io/v1" "apps/v1" .Values.multiNode.enabled }}
kind: {{ ternary "LeaderWorkerSet" "Deployment" .Values.multiNode.enabled }}
name: {{ include "omniserve.fullname" . }}
{{- end }}

{{/*
One autoscaler owns the replica count: the HPA (autoscaling) or KEDA's ScaledObject, which creates an HPA
of its own; two would fight over the same target.
*/}}
{{- define "omniserve.checkScaling" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled both scale the same pods (KEDA creates its own HorizontalPodAutoscaler): pick one" }}
{{- end }}
{{- end }}
