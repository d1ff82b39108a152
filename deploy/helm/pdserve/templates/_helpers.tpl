{{- define "pdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
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
--mode disagg --engine {{ .Values.engine.backend }} --host 0.0.0.0 --port {{ .Values.service.port }} --prefill-workers {{ .Values.prefill.replicas }} --decode-workers {{ .Values.decode.replicas }} --policy {{ .Values.scheduling.policy }} --local-prefill-tokens {{ .Values.scheduling.localPrefillTokens }} --prefill-full-tokens {{ .Values.scheduling.prefillFullTokens }} {{ if .Values.scheduling.roleController }}--role-controller --controller-window-s {{ .Values.scheduling.controllerWindowS }} {{ end }}--max-waiting-for-blocks {{ .Values.scheduling.maxWaitingForBlocks }} --transfer-timeout-s {{ .Values.scheduling.transferTimeoutS }} --kv-cache-memory {{ .Values.engine.kvCacheMemory }} --max-num-seqs {{ .Values.engine.maxNumSeqs }} --prefill-schedule {{ .Values.engine.prefillSchedule }} --num-threads {{ .Values.engine.numThreads }} --slo-ttft-ms {{ .Values.slo.ttftMs }} --slo-tpot-ms {{ .Values.slo.tpotMs }} --slo-attainment-target {{ .Values.slo.attainmentTarget }}
{{- with (include "pdserve.modelPath" .) }} --model {{ . }}{{ end }}
{{- with .Values.model.servedModelName }} --served-model-name {{ . }}{{ end }}
{{- with .Values.engine.maxModelLen }} --max-model-len {{ . }}{{ end }}
{{- with .Values.engine.tokenBudget }} --token-budget {{ . }}{{ end }}
{{- if and (eq .Values.engine.backend "vllm") .Values.engine.vllmEngineArgs }} --vllm-engine-args {{ toJson .Values.engine.vllmEngineArgs | squote }}{{ end }}
{{- range .Values.engine.extraArgs }} {{ . }}{{ end }}
{{- if .Values.apiKey.existingSecret }} --api-key "$PDSERVE_API_KEY"{{ end }}
{{- end -}}

{{- define "pdserve.apiKeyEnv" -}}
{{- if .Values.apiKey.existingSecret }}
- name: PDSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.existingSecret }}
      key: {{ .Values.apiKey.key }}
{{- end }}
{{- end -}}

{{- define "pdserve.modelVolumes" -}}
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

{{- define "pdserve.modelMounts" -}}
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
    resources: {{ printf "{\"pdserve_%s\": 1}" $pool | quote }}
    {{- if gt (int $v.gpusPerPod) 0 }}
    num-gpus: {{ $v.gpusPerPod | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "pdserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $pool }}
    spec:
      {{- with $root.Values.image.pullSecrets }}
      imagePullSecrets: {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "pdserve.initContainers" $root) }}
      initContainers: {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "pdserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          args: ["ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD --block"]
          resources:
            {{- $res := deepCopy $v.resources }}
            {{- if gt (int $v.gpusPerPod) 0 }}
            {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $v.gpusPerPod) ($res.limits | default dict)) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          {{- with (include "pdserve.modelMounts" $root) }}
          volumeMounts: {{- . | nindent 12 }}
          {{- end }}
      {{- with (include "pdserve.modelVolumes" $root) }}
      volumes: {{- . | nindent 8 }}
      {{- end }}
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
