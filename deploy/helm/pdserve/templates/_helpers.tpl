{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "pdserve.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pdserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The model path as the engine sees it; empty for the packaged default model. */}}
{{- define "pdserve.modelPath" -}}
{{- if ne .Values.model.source "package" -}}
/models/{{ .Values.model.path }}
{{- end -}}
{{- end -}}

{{/* `pdserve serve` flags shared by the head and the external front door. */}}
{{- define "pdserve.serveArgs" -}}
--mode disagg --engine {{ .Values.engine.backend }} --host 0.0.0.0 --port {{ .Values.service.port }} --prefill-workers {{ .Values.prefill.replicas }} --decode-workers {{ .Values.decode.replicas }} --prefill-tp {{ .Values.prefill.tensorParallelSize }} --decode-tp {{ .Values.decode.tensorParallelSize }} --policy {{ .Values.scheduling.policy }} --local-prefill-tokens {{ .Values.scheduling.localPrefillTokens }} --prefill-full-tokens {{ .Values.scheduling.prefillFullTokens }} {{ if .Values.scheduling.roleController }}--role-controller --controller-window-s {{ .Values.scheduling.controllerWindowS }} {{ end }}--max-waiting-for-blocks {{ .Values.scheduling.maxWaitingForBlocks }} --transfer-timeout-s {{ .Values.scheduling.transferTimeoutS }} --kv-cache-memory {{ .Values.engine.kvCacheMemory }} --max-num-seqs {{ .Values.engine.maxNumSeqs }} --prefill-schedule {{ .Values.engine.prefillSchedule }} --num-threads {{ .Values.engine.numThreads }} --slo-ttft-ms {{ .Values.slo.ttftMs }} --slo-tpot-ms {{ .Values.slo.tpotMs }} --slo-attainment-target {{ .Values.slo.attainmentTarget }}
{{- with (include "pdserve.modelPath" .) }} --model {{ . }}{{ end }}
{{- with .Values.model.servedModelName }} --served-model-name {{ . }}{{ end }}
{{- with .Values.engine.maxModelLen }} --max-model-len {{ . }}{{ end }}
{{- with .Values.engine.tokenBudget }} --token-budget {{ . }}{{ end }}
{{- if and (eq .Values.engine.backend "vllm") .Values.engine.vllmEngineArgs }} --vllm-engine-args {{ toJson .Values.engine.vllmEngineArgs | squote }}{{ end }}
{{- range .Values.engine.extraArgs }} {{ . }}{{ end }}
{{- end -}}

{{/* The environment of every pdserve container: HOME on the writable /tmp, the API key from
its Secret (the server reads PDSERVE_API_KEY itself), then the user's env and envFrom. */}}
{{- define "pdserve.env" -}}
env:
  - name: HOME
    value: /tmp
{{- if .Values.apiKey.existingSecret }}
  - name: PDSERVE_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ .Values.apiKey.existingSecret }}
        key: {{ .Values.apiKey.key }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . | indent 2 }}
{{- end }}
{{- with .Values.envFrom }}
envFrom:
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}

{{/* Pod metadata beside the component label. */}}
{{- define "pdserve.podMetadata" -}}
{{- $root := .root -}}
labels:
  {{- include "pdserve.labels" $root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod spec fields every pod shares: identity, security, pulling, priority. */}}
{{- define "pdserve.podCommon" -}}
serviceAccountName: {{ include "pdserve.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* A pdserve container's security context. */}}
{{- define "pdserve.containerSecurity" -}}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Volumes of every pod: /tmp (the only writable path), then the model's. */}}
{{- define "pdserve.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- else if eq .Values.model.source "initContainer" }}
- name: model
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if ne .Values.model.source "package" }}
- name: model
  mountPath: /models
  readOnly: {{ ne .Values.model.source "initContainer" }}
{{- end }}
{{- end -}}

{{- define "pdserve.initContainers" -}}
{{- if eq .Values.model.source "initContainer" }}
- name: copy-model
  image: {{ .Values.model.initContainer.image }}
  command: ["sh", "-c", "cp -a {{ .Values.model.initContainer.sourcePath }}/. /models/"]
  {{- include "pdserve.containerSecurity" . | nindent 2 }}
  volumeMounts:
    - name: model
      mountPath: /models
{{- end }}
{{- end -}}

{{/* A worker group of the RayCluster: one worker actor per pod, steered by a custom resource. */}}
{{- define "pdserve.workerGroup" -}}
{{- $root := .root -}}
{{- $pool := .pool -}}
{{- $v := index $root.Values $pool -}}
- groupName: {{ $pool }}
  replicas: {{ $v.replicas }}
  minReplicas: {{ $v.minReplicas }}
  maxReplicas: {{ $v.maxReplicas }}
  rayStartParams:
    resources: {{ printf "{\"pdserve_%s\": %d}" $pool (int $v.tensorParallelSize) | quote }}
    {{- if gt (int $v.gpusPerPod) 0 }}
    num-gpus: {{ $v.gpusPerPod | quote }}
    {{- end }}
  template:
    metadata:
      {{- include "pdserve.podMetadata" (dict "root" $root "component" $pool) | nindent 6 }}
    spec:
      {{- include "pdserve.podCommon" $root | nindent 6 }}
      {{- with (include "pdserve.initContainers" $root) }}
      initContainers: {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "pdserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          args: ["ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD --block"]
          {{- include "pdserve.env" $root | nindent 10 }}
          {{- include "pdserve.containerSecurity" $root | nindent 10 }}
          {{- include "pdserve.workerProbes" $root | nindent 10 }}
          resources:
            {{- $res := deepCopy $v.resources }}
            {{- if gt (int $v.gpusPerPod) 0 }}
            {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $v.gpusPerPod) ($res.limits | default dict)) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts: {{- include "pdserve.volumeMounts" $root | nindent 12 }}
      volumes: {{- include "pdserve.volumes" $root | nindent 8 }}
      {{- with $v.nodeSelector }}
      nodeSelector: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity: {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/* A Ray worker pod's probes: the node's raylet, through the Ray agent (KubeRay's own check). */}}
{{- define "pdserve.workerProbes" -}}
{{- $p := .Values.workerProbes -}}
{{- $check := printf "wget -T 2 -q -O- http://localhost:%d/api/local_raylet_healthz | grep success" (int $p.agentPort) -}}
livenessProbe:
  exec: {command: ["bash", "-c", {{ $check | quote }}]}
  initialDelaySeconds: 30
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ $p.failureThreshold }}
readinessProbe:
  exec: {command: ["bash", "-c", {{ $check | quote }}]}
  initialDelaySeconds: 10
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ $p.failureThreshold }}
{{- end -}}

{{/* The front door's probes: starting while the workers load the model, alive while /version
answers, ready while /health says every pool can serve. */}}
{{- define "pdserve.headProbes" -}}
{{- $p := .Values.head.probes -}}
startupProbe:
  httpGet: {path: /version, port: http}
  periodSeconds: {{ $p.startupPeriodSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
livenessProbe:
  httpGet: {path: /version, port: http}
  periodSeconds: {{ $p.livenessPeriodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ $p.livenessFailureThreshold }}
readinessProbe:
  httpGet: {path: /health, port: http}
  periodSeconds: {{ $p.readinessPeriodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ $p.readinessFailureThreshold }}
{{- end -}}

{{/* The model name clients send: --served-model-name, else the model's folder name or GGUF file stem. */}}
{{- define "pdserve.servedModel" -}}
{{- if .Values.model.servedModelName -}}
{{- .Values.model.servedModelName -}}
{{- else if eq .Values.model.source "package" -}}
SmolLM2-135M-Instruct
{{- else -}}
{{- base .Values.model.path | trimSuffix ".gguf" -}}
{{- end -}}
{{- end -}}
