{{/*
The pod template, shared by the Deployment (one pod serves the model) and the LeaderWorkerSet
(multiNode.enabled: one model over several pods). Called with a dict:
  root - the chart's top-level context
  role - "single" (the Deployment's pod), "leader" (Ray head + omniserve) or "worker" (a Ray worker)
One template for all three keeps what every pod needs (security context, volumes, the checkpoint, the
scheduling values) from drifting between the modes.
*/}}
{{- define "omniserve.podTemplate" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $v := $root.Values }}
{{- $source := $v.model.source }}
{{- $modelsOnCache := and (eq $source "download") (eq $v.model.download.storage "cache") }}
{{- $quantInit := eq (include "omniserve.quantizeInInitStep" $root) "true" }}
{{- $securityContext := toYaml $v.securityContext }}
{{- $serves := ne $role "worker" }}
{{- $shm := or $v.shm.enabled (ne $role "single") -}}
metadata:
  {{- if or (and $serves $v.metrics.scrapeAnnotations) $v.podAnnotations }}
  annotations:
    {{- if and $serves $v.metrics.scrapeAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $v.server.port | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  labels:
    {{- include "omniserve.labels" $root | nindent 4 }}
    {{- if ne $role "single" }}
    omniserve.dev/role: {{ $role }}
    {{- end }}
    {{- if and $serves $v.inferencePool.enabled }}
    # which metric names the endpoint picker reads here (its engineConfigs; docs/kubernetes.md)
    {{ $v.inferencePool.engineLabelKey }}: {{ $v.inferencePool.engineType | quote }}
    {{- end }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "omniserve.serviceAccountName" $root }}
  # omniserve never talks to the Kubernetes API.
  automountServiceAccountToken: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  # longer than the server's drain (omniserve.checkGracePeriod); no preStop hook: the drain delay is one
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- if or (eq $source "download") $quantInit }}
  initContainers:
    {{- if eq $source "download" }}
    - name: fetch-model
      image: {{ $v.model.download.image }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.model.download.command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.model.download.args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        # copy tools keep credentials and state under $HOME; the root filesystem is read-only
        - name: HOME
          value: /tmp
        {{- with $v.model.download.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.model.download.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- $securityContext | nindent 8 }}
      resources:
        {{- toYaml $v.model.download.resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $modelsOnCache }}
        - name: cache
          mountPath: {{ include "omniserve.modelsDir" $root }}
          subPath: models
        {{- else }}
        - name: models
          mountPath: {{ include "omniserve.modelsDir" $root }}
        {{- end }}
    {{- end }}
    {{- if $quantInit }}
    - name: quantize
      image: {{ $v.quantization.initContainer.image | default (include "omniserve.image" $root) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command:
        {{- include "omniserve.quantizeCommand" $root | nindent 8 }}
      args:
        {{- if $v.quantization.initContainer.args }}
        {{- toYaml $v.quantization.initContainer.args | nindent 8 }}
        {{- else }}
        # the server's own flags: the same cache entry, and a --gate keyed like the server's
        - deploy
        - --quantize-only
        {{- include "omniserve.args" $root | nindent 8 }}
        {{- end }}
      env:
        {{- include "omniserve.env" $root | nindent 8 }}
      securityContext:
        {{- $securityContext | nindent 8 }}
      resources:
        {{- include "omniserve.resources" (dict "resources" (default $v.resources $v.quantization.initContainer.resources) "accelerator" $v.accelerator) | nindent 8 }}
      volumeMounts:
        {{- include "omniserve.volumeMounts" $root | nindent 8 }}
        {{- if $v.auth.existingSecret }}
        # the step takes the server's flags, and deploy reads --api-key-file before anything else
        - name: api-keys
          mountPath: {{ include "omniserve.apiKeysDir" $root }}
          readOnly: true
        {{- end }}
    {{- end }}
  {{- end }}
  containers:
    {{- if $serves }}
    - name: omniserve
      image: {{ include "omniserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- if eq $role "leader" }}
      # Ray head first (this pod's GPUs join the cluster), then the image's entrypoint with the same
      # flags as a single pod: `exec` makes omniserve the process Kubernetes signals, so the drain works.
      # vLLM connects to this local Ray cluster and waits for the workers' GPUs before loading.
      command:
        - /bin/sh
        - -c
        - {{ include "omniserve.rayHeadScript" $root | quote }}
        - omniserve
      {{- else }}
      # the image's entrypoint is `omniserve deploy`; every option is one of its flags
      {{- end }}
      args:
        {{- include "omniserve.args" $root | nindent 8 }}
      ports:
        - name: http
          containerPort: {{ $v.server.port }}
          protocol: TCP
        {{- if eq $role "leader" }}
        - name: ray
          containerPort: {{ $v.multiNode.rayPort }}
          protocol: TCP
        {{- end }}
      env:
        {{- include "omniserve.env" $root | nindent 8 }}
      startupProbe:
        httpGet:
          path: /health
          port: http
        periodSeconds: {{ $v.probes.startup.periodSeconds }}
        failureThreshold: {{ $v.probes.startup.failureThreshold }}
        timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
      readinessProbe:
        httpGet:
          path: /health
          port: http
        periodSeconds: {{ $v.probes.readiness.periodSeconds }}
        failureThreshold: {{ $v.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
      livenessProbe:
        httpGet:
          # alive while draining (unlike /health): a restart would cut the running answers short
          path: /health/live
          port: http
        periodSeconds: {{ $v.probes.liveness.periodSeconds }}
        failureThreshold: {{ $v.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
      securityContext:
        {{- $securityContext | nindent 8 }}
      resources:
        {{- include "omniserve.resources" (dict "resources" $v.resources "accelerator" $v.accelerator) | nindent 8 }}
      volumeMounts:
        {{- include "omniserve.volumeMounts" $root | nindent 8 }}
        {{- if $v.auth.existingSecret }}
        - name: api-keys
          mountPath: {{ include "omniserve.apiKeysDir" $root }}
          readOnly: true
        {{- end }}
        {{- if $shm }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- else }}
    - name: ray-worker
      image: {{ include "omniserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      # Joins the leader's Ray cluster with this pod's GPUs; vLLM on the leader places its shards here.
      # LWS_LEADER_ADDRESS is set by LeaderWorkerSet. `ray start --block` exits when the head goes away,
      # and the group is then recreated (restartPolicy RecreateGroupOnPodRestart).
      command:
        - /bin/sh
        - -c
        - {{ include "omniserve.rayWorkerScript" $root | quote }}
      env:
        {{- include "omniserve.env" $root | nindent 8 }}
      securityContext:
        {{- $securityContext | nindent 8 }}
      resources:
        {{- include "omniserve.resources" (dict "resources" (default $v.resources $v.multiNode.workerResources) "accelerator" $v.accelerator) | nindent 8 }}
      volumeMounts:
        {{- include "omniserve.volumeMounts" $root | nindent 8 }}
        - name: shm
          mountPath: /dev/shm
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: home
      emptyDir: {}
    - name: cache
      {{- if $v.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "omniserve.cacheClaimName" $root }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $v.cache.sizeLimit }}
      {{- end }}
    {{- if eq $source "pvc" }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ $v.model.pvc.claimName }}
        readOnly: {{ $v.model.pvc.readOnly }}
    {{- else if eq $source "hostPath" }}
    - name: models
      hostPath:
        path: {{ $v.model.hostPath.path }}
        type: {{ $v.model.hostPath.type }}
    {{- else if and (eq $source "download") (not $modelsOnCache) }}
    - name: models
      emptyDir:
        sizeLimit: {{ $v.model.download.sizeLimit }}
    {{- end }}
    {{- if include "omniserve.loraVolume" $root }}
    - name: lora-adapters
      {{- if $v.lora.volume.claimName }}
      persistentVolumeClaim:
        claimName: {{ $v.lora.volume.claimName }}
        readOnly: true
      {{- else }}
      {{- toYaml $v.lora.volume.source | nindent 6 }}
      {{- end }}
    {{- end }}
    {{- if and $serves $v.auth.existingSecret }}
    - name: api-keys
      secret:
        secretName: {{ $v.auth.existingSecret }}
        defaultMode: 288 # 0440: owner and the pod's fsGroup may read
        items:
          - key: {{ $v.auth.secretKey }}
            path: {{ $v.auth.secretKey }}
    {{- end }}
    {{- if $shm }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shm.sizeLimit }}
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
