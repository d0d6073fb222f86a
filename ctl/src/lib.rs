//! Control protocol shared by `gpu-agent` and `agentctl`.
