# gpu-agent %preun: on removal (not upgrade) stop and disable; ExecStopPost resets clocks.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now gpu-agent.service >/dev/null 2>&1 || :
fi
