# gpu-agent %postun: let systemd forget the unit; restart on upgrade if it was running.
if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart gpu-agent.service >/dev/null 2>&1 || :
    fi
fi
