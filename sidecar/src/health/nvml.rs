//! NVML reporter: critical-XID events, ECC counters, row remapping, retired pages, NVLink and
//! PCIe replay counters, thermal and power throttling, and lost GPUs, for every GPU.
//!
//! The decisions are pure functions over recorded values ([`GpuSample`], [`diff`],
//! [`xid_finding`]) so they are tested without a GPU; the nvml-wrapper glue only fills samples.
//! NVML is loaded at run time: without libnvidia-ml the reporter logs one line, shows
//! "unavailable" in status, and everything else runs. Its event wait blocks, so the whole loop lives
//! on its own thread and waits at most one second at a time to see shutdown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::controller::{Metrics, ReporterState, StatusBoard};
use super::finding::{Finding, Source};
use super::pci::PciMap;

/// The reporter's name in status and metrics.
pub(crate) const NAME: &str = "nvml";

/// NVML throttle-reason bits (nvml.h `nvmlClocksThrottleReason*`).
pub mod throttle {
    /// Software thermal slowdown.
    pub const SW_THERMAL: u64 = 0x20;
    /// Hardware thermal slowdown.
    pub const HW_THERMAL: u64 = 0x40;
    /// Hardware power-brake slowdown.
    pub const HW_POWER_BRAKE: u64 = 0x80;
    /// Hardware slowdown (thermal or power brake).
    pub const HW_SLOWDOWN: u64 = 0x8;
}

/// One GPU's counters at one poll. `None` where the GPU does not support the query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuSample {
    /// NVML index.
    pub index: u32,
    /// PCI address.
    pub pci: Option<String>,
    /// Volatile uncorrected (double-bit) ECC errors.
    pub ecc_dbe: Option<u64>,
    /// Volatile corrected (single-bit) ECC errors.
    pub ecc_sbe: Option<u64>,
    /// A row remap is pending (applies at the next reset).
    pub remap_pending: Option<bool>,
    /// A row remap failed.
    pub remap_failed: Option<bool>,
    /// Retired pages (both causes).
    pub retired_pages: Option<u64>,
    /// Sum of NVLink CRC, replay and recovery error counters over all links.
    pub nvlink_errors: Option<u64>,
    /// PCIe replay counter.
    pub pcie_replay: Option<u64>,
    /// Current throttle-reason bits.
    pub throttle: Option<u64>,
    /// NVML answered "GPU is lost".
    pub lost: bool,
}

/// Thresholds of the counter rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Single-bit ECC increments per poll that count as a jump.
    pub sbe_jump: u64,
    /// NVLink error increments per poll worth reporting.
    pub nvlink_jump: u64,
    /// PCIe replay increments per poll worth reporting.
    pub pcie_jump: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { sbe_jump: 100, nvlink_jump: 10, pcie_jump: 10 }
    }
}

/// The findings between two samples of the same GPU. The first sample (`prev = None`) reports
/// only states (lost, failed or pending remap), not counter values, which may be years old.
pub fn diff(prev: Option<&GpuSample>, cur: &GpuSample, th: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    let f = |kind: &str, evidence: String| {
        Finding::new(Source::Nvml, kind, format!("GPU {}: {evidence}", cur.index))
            .with_gpu(Some(cur.index))
            .with_pci(cur.pci.clone())
    };
    if cur.lost {
        if !prev.is_some_and(|p| p.lost) {
            out.push(f("gpu-lost", "NVML returned NVML_ERROR_GPU_IS_LOST".into()));
        }
        return out;
    }
    let was = |get: fn(&GpuSample) -> Option<bool>| prev.and_then(get).unwrap_or(false);
    if cur.remap_failed == Some(true) && !was(|s| s.remap_failed) {
        out.push(f("row-remap-failed", "remapped rows: failure occurred".into()));
    }
    if cur.remap_pending == Some(true) && !was(|s| s.remap_pending) {
        out.push(f("row-remap-pending", "remapped rows: remap pending".into()));
    }
    let Some(prev) = prev else { return out };
    let delta = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b > a => Some((a, b)),
        _ => None,
    };
    if let Some((a, b)) = delta(prev.ecc_dbe, cur.ecc_dbe) {
        out.push(f("ecc-dbe", format!("volatile uncorrected ECC errors {a} → {b}")));
    }
    if let Some((a, b)) = delta(prev.ecc_sbe, cur.ecc_sbe).filter(|(a, b)| b - a >= th.sbe_jump) {
        out.push(f("ecc-sbe", format!("volatile corrected ECC errors {a} → {b}")));
    }
    if let Some((a, b)) = delta(prev.retired_pages, cur.retired_pages) {
        out.push(f("retired-pages", format!("retired pages {a} → {b}")));
    }
    if let Some((a, b)) = delta(prev.nvlink_errors, cur.nvlink_errors).filter(|(a, b)| b - a >= th.nvlink_jump) {
        out.push(f("nvlink-errors", format!("NVLink CRC/replay/recovery errors {a} → {b}")));
    }
    if let Some((a, b)) = delta(prev.pcie_replay, cur.pcie_replay).filter(|(a, b)| b - a >= th.pcie_jump) {
        out.push(f("pcie-replay", format!("PCIe replay counter {a} → {b}")));
    }
    let bits = cur.throttle.unwrap_or(0);
    let old = prev.throttle.unwrap_or(0);
    let thermal = throttle::SW_THERMAL | throttle::HW_THERMAL;
    if bits & thermal != 0 && old & thermal == 0 {
        out.push(f("thermal-throttle", format!("throttle reasons {bits:#x} (thermal slowdown)")));
    }
    let power = throttle::HW_POWER_BRAKE;
    if bits & power != 0 && old & power == 0 {
        out.push(f("power-throttle", format!("throttle reasons {bits:#x} (hardware power brake)")));
    }
    out
}

/// The finding of a critical-XID event; the index or address may be unreadable when the GPU is
/// failing, and then the other one locates it.
pub fn xid_finding(index: Option<u32>, pci: Option<String>, xid: u64) -> Finding {
    let gpu = index.map_or_else(|| "unknown".to_owned(), |i| i.to_string());
    Finding::new(Source::Nvml, format!("xid-{xid}"), format!("NVML critical XID event: GPU {gpu}, xid {xid}"))
        .with_gpu(index)
        .with_pci(pci)
}

/// Reads every GPU's sample, the PCI map and whether the event set is armed: real NVML values,
/// for the `CKPTD_GPU_TESTS=1` test and for `ckptctl health`.
pub fn probe() -> Result<Vec<GpuSample>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
    let n = nvml.device_count().map_err(|e| e.to_string())?;
    Ok((0..n).map(|i| glue::sample(&nvml, i)).collect())
}

mod glue {
    use nvml_wrapper::Nvml;
    use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, RetirementCause};
    use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
    use nvml_wrapper::error::NvmlError;

    use super::GpuSample;

    /// NVLink links probed per GPU (NVML_NVLINK_MAX_LINKS).
    const MAX_LINKS: u32 = 18;

    pub(super) fn sample(nvml: &Nvml, index: u32) -> GpuSample {
        let mut s = GpuSample { index, ..Default::default() };
        let dev = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                s.lost = matches!(e, NvmlError::GpuLost);
                return s;
            }
        };
        let mut lost = false;
        let mut ok = |r: Result<u64, NvmlError>| match r {
            Ok(v) => Some(v),
            Err(NvmlError::GpuLost) => {
                lost = true;
                None
            }
            Err(_) => None,
        };
        s.pci = dev.pci_info().ok().map(|p| p.bus_id);
        s.ecc_dbe = ok(dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile));
        s.ecc_sbe = ok(dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile));
        s.pcie_replay = ok(dev.pcie_replay_counter().map(u64::from));
        s.throttle = ok(dev.current_throttle_reasons().map(|r| r.bits()));
        let retired = [RetirementCause::MultipleSingleBitEccErrors, RetirementCause::DoubleBitEccError]
            .into_iter()
            .filter_map(|c| dev.retired_pages(c).ok().map(|v| v.len() as u64))
            .reduce(|a, b| a + b);
        s.retired_pages = retired;
        let mut nvlink = None;
        for link in 0..MAX_LINKS {
            let l = dev.link_wrapper_for(link);
            if !l.is_active().unwrap_or(false) {
                continue;
            }
            for c in
                [ErrorCounter::DlReplay, ErrorCounter::DlRecovery, ErrorCounter::DlCrcFlit, ErrorCounter::DlCrcData]
            {
                if let Ok(v) = l.error_counter(c) {
                    nvlink = Some(nvlink.unwrap_or(0u64).saturating_add(v));
                }
            }
        }
        s.nvlink_errors = nvlink;
        if let Ok(f) = nvml.lib().nvmlDeviceGetRemappedRows.as_ref() {
            let (mut corr, mut unc, mut pending, mut failed): (u32, u32, u32, u32) = (0, 0, 0, 0);
            // SAFETY: `dev.handle()` is a live handle of this `nvml` (the borrow keeps the library
            // loaded and initialised); the four out-pointers are valid, exclusive `c_uint`s for the
            // duration of the call, which is NVML's documented contract for this function.
            let rc = unsafe { f(dev.handle(), &mut corr, &mut unc, &mut pending, &mut failed) };
            if rc == 0 {
                s.remap_pending = Some(pending != 0);
                s.remap_failed = Some(failed != 0);
            }
        }
        s.lost = lost;
        s
    }
}

#[allow(clippy::too_many_arguments)]
/// Starts the NVML thread; or marks the reporter disabled when `--no-nvml` was given, or
/// unavailable (one log line) when NVML cannot be initialised or shows no GPU.
pub(crate) fn spawn(
    enabled: bool,
    poll: Duration,
    th: Thresholds,
    tx: mpsc::Sender<Finding>,
    board: Arc<StatusBoard>,
    metrics: Metrics,
    pci: PciMap,
    shutdown: CancellationToken,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if !enabled {
        board.set(NAME, ReporterState::Disabled, "disabled by configuration (--no-nvml, CKPTD_NO_NVML)".into());
        metrics.set_enabled(NAME, false);
        return Ok(None);
    }
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let detail = format!(
                "NVML unavailable ({e}): no libnvidia-ml or no driver; GPU counters and XID events come only from the kernel log"
            );
            tracing::warn!(reporter = NAME, "{detail}");
            board.set(NAME, ReporterState::Unavailable, detail);
            metrics.set_enabled(NAME, false);
            return Ok(None);
        }
    };
    if let Ok(0) = nvml.device_count() {
        let detail = "NVML loaded but shows no GPUs: the container was given none (the webhook sets NVIDIA_VISIBLE_DEVICES=all and NVIDIA_DRIVER_CAPABILITIES=utility on the agent; a runtime that ignores those variables for unprivileged containers shows none)".to_string();
        tracing::warn!(reporter = NAME, "{detail}");
        board.set(NAME, ReporterState::Unavailable, detail);
        metrics.set_enabled(NAME, false);
        return Ok(None);
    }
    board.set(NAME, ReporterState::Enabled, "starting".into());
    metrics.set_enabled(NAME, true);
    let handle = std::thread::Builder::new().name("ckptd-health-nvml".into()).spawn(move || {
        let _span = tracing::info_span!("health", task = "health-nvml").entered();
        run(&nvml, poll, th, &tx, &board, &pci, &shutdown);
        tracing::debug!("health NVML reporter stopped");
    })?;
    Ok(Some(handle))
}

/// One event set over every GPU that supports critical-XID events. A failed registration
/// releases the whole set (nvml-wrapper's contract), so the set is rebuilt without that GPU; the
/// kernel log still covers it.
fn arm_events(nvml: &nvml_wrapper::Nvml, count: u32) -> (Option<nvml_wrapper::EventSet<'_>>, usize) {
    use nvml_wrapper::bitmasks::event::EventTypes;

    let mut candidates: Vec<u32> = (0..count)
        .filter(|i| {
            nvml.device_by_index(*i)
                .and_then(|d| d.supported_event_types())
                .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR))
        })
        .collect();
    loop {
        let mut set = nvml.create_event_set().ok();
        let mut failed = None;
        for &i in &candidates {
            let (Ok(dev), Some(s)) = (nvml.device_by_index(i), set.take()) else {
                failed = Some(i);
                break;
            };
            match dev.register_events(EventTypes::CRITICAL_XID_ERROR, s) {
                Ok(s) => set = Some(s),
                Err(e) => {
                    tracing::info!(gpu = i, error = %e.error, "no NVML XID events for this GPU; the kernel log covers it");
                    failed = Some(i);
                    break;
                }
            }
        }
        match failed {
            None => return (set, candidates.len()),
            Some(i) => candidates.retain(|c| *c != i),
        }
    }
}

fn run(
    nvml: &nvml_wrapper::Nvml,
    poll: Duration,
    th: Thresholds,
    tx: &mpsc::Sender<Finding>,
    board: &StatusBoard,
    pci: &PciMap,
    shutdown: &CancellationToken,
) {
    use nvml_wrapper::error::NvmlError;

    let count = nvml.device_count().unwrap_or(0);
    let mut prev: BTreeMap<u32, GpuSample> = BTreeMap::new();
    let mut map = BTreeMap::new();
    for i in 0..count {
        let s = glue::sample(nvml, i);
        if let Some(p) = s.pci.as_deref().and_then(super::pci::normalize) {
            map.insert(p, i);
        }
        for f in diff(None, &s, &th) {
            if tx.blocking_send(f).is_err() {
                return;
            }
        }
        prev.insert(i, s);
    }
    pci.replace(map);
    let (set, armed) = arm_events(nvml, count);
    board.set(NAME, ReporterState::Enabled, format!("{count} GPUs, XID events on {armed}"));
    let mut next_poll = std::time::Instant::now() + poll;
    while !shutdown.is_cancelled() {
        let wait = next_poll.saturating_duration_since(std::time::Instant::now()).min(Duration::from_secs(1));
        match set.as_ref() {
            Some(set) if armed > 0 => match set.wait(wait.as_millis() as u32) {
                Ok(ev) => {
                    if let Some(nvml_wrapper::enums::event::XidError::Value(xid)) = ev.event_data {
                        let p = ev.device.pci_info().ok().map(|p| p.bus_id);
                        let index = ev.device.index().ok().or_else(|| p.as_deref().and_then(|p| pci.gpu(p)));
                        if tx.blocking_send(xid_finding(index, p, xid)).is_err() {
                            return;
                        }
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "NVML event wait failed");
                    std::thread::sleep(wait);
                }
            },
            _ => std::thread::sleep(wait),
        }
        if std::time::Instant::now() < next_poll {
            continue;
        }
        next_poll = std::time::Instant::now() + poll;
        for i in 0..count {
            let mut s = glue::sample(nvml, i);
            if s.pci.is_none() {
                // A lost GPU no longer answers; its address is the one it had.
                s.pci = prev.get(&i).and_then(|p| p.pci.clone());
            }
            for f in diff(prev.get(&i), &s, &th) {
                if tx.blocking_send(f).is_err() {
                    return;
                }
            }
            prev.insert(i, s);
        }
        let lost = prev.values().filter(|s| s.lost).count();
        board.sample(NAME, format!("{count} GPUs sampled, {lost} lost"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100(index: u32) -> GpuSample {
        GpuSample {
            index,
            pci: Some("00000000:3B:00.0".into()),
            ecc_dbe: Some(0),
            ecc_sbe: Some(12),
            remap_pending: Some(false),
            remap_failed: Some(false),
            retired_pages: Some(0),
            nvlink_errors: Some(3),
            pcie_replay: Some(0),
            throttle: Some(0x1), // GPU idle
            lost: false,
        }
    }

    fn kinds(v: &[Finding]) -> Vec<&str> {
        v.iter().map(|f| f.kind.as_str()).collect()
    }

    #[test]
    fn first_sample_reports_states_not_old_counters() {
        let th = Thresholds::default();
        let mut s = h100(0);
        s.ecc_dbe = Some(7);
        assert!(diff(None, &s, &th).is_empty());
        s.remap_pending = Some(true);
        let f = diff(None, &s, &th);
        assert_eq!(kinds(&f), ["row-remap-pending"]);
        assert_eq!((f[0].gpu, f[0].pci.as_deref()), (Some(0), Some("0000:3b:00.0")));
    }

    #[test]
    fn counter_deltas_become_findings() {
        let th = Thresholds::default();
        let a = h100(1);
        let mut b = a.clone();
        b.ecc_dbe = Some(1);
        b.ecc_sbe = Some(12 + 150);
        b.retired_pages = Some(2);
        b.nvlink_errors = Some(3 + 40);
        b.pcie_replay = Some(11);
        b.throttle = Some(throttle::HW_THERMAL | throttle::HW_POWER_BRAKE);
        b.remap_failed = Some(true);
        let f = diff(Some(&a), &b, &th);
        assert_eq!(
            kinds(&f),
            [
                "row-remap-failed",
                "ecc-dbe",
                "ecc-sbe",
                "retired-pages",
                "nvlink-errors",
                "pcie-replay",
                "thermal-throttle",
                "power-throttle"
            ]
        );
        assert!(f[1].evidence.contains("0 → 1"), "{}", f[1].evidence);
        // Unchanged, reset or small counters say nothing; a throttle still on is not new.
        let mut c = b.clone();
        c.ecc_dbe = Some(0);
        c.ecc_sbe = Some(b.ecc_sbe.unwrap() + 5);
        assert!(diff(Some(&b), &c, &th).is_empty());
    }

    #[test]
    fn lost_gpu_is_reported_once_and_xid_events_carry_the_locus() {
        let th = Thresholds::default();
        let a = h100(2);
        let lost = GpuSample { index: 2, lost: true, ..Default::default() };
        assert_eq!(kinds(&diff(Some(&a), &lost, &th)), ["gpu-lost"]);
        assert!(diff(Some(&lost), &lost, &th).is_empty());
        let x = xid_finding(Some(2), Some("00000000:5E:00.0".into()), 79);
        assert_eq!((x.kind.as_str(), x.gpu, x.pci.as_deref()), ("xid-79", Some(2), Some("0000:5e:00.0")));
    }
}
