# gpu-agent %post: make systemd see the unit; enable it only on a fresh install, never start
# it here (configure vllm.metrics_url first). Without the NVIDIA driver the unit's
# ConditionPathExists keeps it inactive instead of crash-looping.
if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable gpu-agent.service >/dev/null 2>&1 || :
    fi
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create gpu-agent.conf >/dev/null 2>&1 || :
fi
