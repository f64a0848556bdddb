//! What a reporter saw: a [`Finding`] is an observation with its evidence, before the policy has
//! said what to do about it. Reporters only observe; the controller decides, so that the same
//! XID seen by NVML and by the kernel log is one fault and not two.

use std::time::{SystemTime, UNIX_EPOCH};

/// The reporter that produced a finding. Its name is the `source` label of the metrics and the
/// `source` field of the isolator's `FaultReport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// NVML events and counters.
    Nvml,
    /// `NVRM: Xid` lines of the kernel log.
    Kmsg,
    /// Trainer heartbeats (hang detection).
    Progress,
    /// NCCL debug logs and torch flight-recorder dumps.
    Nccl,
    /// InfiniBand/RoCE port state and counters in sysfs.
    Ib,
    /// A drill started by `ckptctl inject`.
    Inject,
}

impl Source {
    /// The short name used in metrics, logs and the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Nvml => "nvml",
            Source::Kmsg => "kmsg",
            Source::Progress => "progress",
            Source::Nccl => "nccl",
            Source::Ib => "ib",
            Source::Inject => "inject",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One observation of something wrong, with the raw evidence that proves it.
///
/// `kind` is the key of the policy table (`xid-79`, `hang`, `nccl-timeout`, `ib-port-down`, ...);
/// the locus fields (`gpu`, `pci`, `rank`, `port`) say *where*, and decide which findings are the
/// same fault for deduplication and escalation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Finding {
    /// Which reporter saw it.
    pub source: Source,
    /// Policy key, e.g. `xid-79`, `hang`, `nccl-timeout`, `ib-port-down`.
    pub kind: String,
    /// The raw line or counter values that prove it, verbatim where there is a line.
    pub evidence: String,
    /// The Kubernetes node name; the controller fills it in when a reporter leaves it empty.
    pub node: String,
    /// GPU index (NVML order) when the fault is on a GPU and the index is known.
    pub gpu: Option<u32>,
    /// PCI address of the GPU, normalised to `dddd:bb:dd.f` in lower case.
    pub pci: Option<String>,
    /// The trainer rank, when the fault is a rank's (hang, NCCL line naming its rank).
    pub rank: Option<u32>,
    /// The InfiniBand port, as `device/port` (e.g. `mlx5_0/1`).
    pub port: Option<String>,
    /// When the reporter saw it.
    #[serde(serialize_with = "unix_ms")]
    pub observed_at: SystemTime,
}

impl Finding {
    /// A finding with no locus yet, observed now.
    pub fn new(source: Source, kind: impl Into<String>, evidence: impl Into<String>) -> Finding {
        Finding {
            source,
            kind: kind.into(),
            evidence: evidence.into(),
            node: String::new(),
            gpu: None,
            pci: None,
            rank: None,
            port: None,
            observed_at: SystemTime::now(),
        }
    }

    /// Sets the GPU index.
    pub fn with_gpu(mut self, gpu: Option<u32>) -> Finding {
        self.gpu = gpu;
        self
    }

    /// Sets the PCI address (normalised).
    pub fn with_pci(mut self, pci: Option<String>) -> Finding {
        self.pci = pci.map(|p| crate::health::pci::normalize(&p).unwrap_or(p));
        self
    }

    /// Sets the rank.
    pub fn with_rank(mut self, rank: Option<u32>) -> Finding {
        self.rank = rank;
        self
    }

    /// Sets the InfiniBand port.
    pub fn with_port(mut self, port: Option<String>) -> Finding {
        self.port = port;
        self
    }

    /// Where the fault is, for deduplication: the same kind at the same locus is one fault even
    /// when two reporters (NVML and the kernel log) both see it. The PCI address wins over the
    /// GPU index because the kernel log may not know the index.
    pub fn locus(&self) -> String {
        if let Some(pci) = &self.pci {
            format!("pci:{pci}")
        } else if let Some(gpu) = self.gpu {
            format!("gpu:{gpu}")
        } else if let Some(port) = &self.port {
            format!("port:{port}")
        } else if let Some(rank) = self.rank {
            format!("rank:{rank}")
        } else {
            "node".to_owned()
        }
    }

    /// Milliseconds since the Unix epoch of the observation (0 before 1970).
    pub fn observed_unix_ms(&self) -> u64 {
        to_unix_ms(self.observed_at)
    }
}

/// Milliseconds since the Unix epoch, saturating at 0 for times before it.
pub(crate) fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn unix_ms<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(to_unix_ms(*t))
}
