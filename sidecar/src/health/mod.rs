//! Health monitoring and fault classification (issue #5): one controller fed by reporters (NVML,
//! kernel log, trainer progress, NCCL, InfiniBand) and a policy that maps findings to actions.
