//! PCI address → GPU index. The kernel log names a GPU only by its PCI address; the isolator and
//! the operator think in GPU indexes. The best source is NVML (it numbers the GPUs); without it an
//! operator-given map, and failing that the NVIDIA display/3D controllers in sysfs sorted by
//! address, which is NVML's default order. Without any of them the index stays unknown.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// Normalises a PCI address to `dddd:bb:dd.f` in lower case: accepts NVML's `00000000:3B:00.0`,
/// the kernel log's `0000:3b:00` (function 0 implied) and `3b:00.0` (domain 0 implied).
pub fn normalize(addr: &str) -> Option<String> {
    let addr = addr.trim().trim_start_matches("PCI:").trim_start_matches("pci:");
    let (rest, function) = match addr.rsplit_once('.') {
        Some((rest, f)) => (rest, u8::from_str_radix(f, 16).ok()?),
        None => (addr, 0),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (domain, bus, dev) = match parts.as_slice() {
        [d, b, v] => (u32::from_str_radix(d, 16).ok()?, *b, *v),
        [b, v] => (0, *b, *v),
        _ => return None,
    };
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok()?;
    if domain > 0xffff || dev > 0x1f || function > 7 {
        return None;
    }
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{function:x}"))
}

/// Parses `--gpu-pci-map`: `INDEX=ADDRESS` pairs separated by commas.
pub(crate) fn parse_map(spec: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut map = BTreeMap::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (index, addr) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not INDEX=PCI-ADDRESS"))?;
        let index: u32 = index.trim().parse().map_err(|_| format!("`{index}` in `{pair}` is not a GPU index"))?;
        let addr = normalize(addr).ok_or_else(|| format!("`{addr}` in `{pair}` is not a PCI address"))?;
        map.insert(addr, index);
    }
    Ok(map)
}

/// Reads the NVIDIA GPUs (vendor 0x10de, class 0x0300xx or 0x0302xx) under a sysfs
/// `bus/pci/devices` directory and numbers them in address order.
pub(crate) fn scan_sysfs(root: &Path) -> BTreeMap<String, u32> {
    let Ok(entries) = std::fs::read_dir(root) else { return BTreeMap::new() };
    let mut gpus: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
            let class = read("class");
            read("vendor").trim() == "0x10de"
                && (class.trim().starts_with("0x0300") || class.trim().starts_with("0x0302"))
        })
        .filter_map(|e| normalize(&e.file_name().to_string_lossy()))
        .collect();
    gpus.sort();
    gpus.into_iter().zip(0..).collect()
}

/// The shared PCI → index map. NVML fills it when it starts (it may start after the kernel-log
/// reporter has read its first line), so it is behind a lock that readers hold for a lookup.
#[derive(Debug, Clone, Default)]
pub(crate) struct PciMap {
    inner: Arc<RwLock<BTreeMap<String, u32>>>,
}

impl PciMap {
    pub(crate) fn new(initial: BTreeMap<String, u32>) -> PciMap {
        PciMap { inner: Arc::new(RwLock::new(initial)) }
    }

    /// Replaces the map with NVML's numbering, the authoritative one.
    pub(crate) fn replace(&self, map: BTreeMap<String, u32>) {
        if let Ok(mut g) = self.inner.write() {
            *g = map;
        }
    }

    /// The GPU index of a PCI address, if known.
    pub(crate) fn gpu(&self, pci: &str) -> Option<u32> {
        let key = normalize(pci)?;
        self.inner.read().ok()?.get(&key).copied()
    }

    /// The PCI address of a GPU index, if known.
    pub(crate) fn pci(&self, gpu: u32) -> Option<String> {
        self.inner.read().ok()?.iter().find(|(_, i)| **i == gpu).map(|(p, _)| p.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_every_spelling() {
        assert_eq!(normalize("00000000:3B:00.0").as_deref(), Some("0000:3b:00.0"));
        assert_eq!(normalize("PCI:0000:3b:00").as_deref(), Some("0000:3b:00.0"));
        assert_eq!(normalize("3b:00.1").as_deref(), Some("0000:3b:00.1"));
        assert_eq!(normalize("zz:00.0"), None);
        assert_eq!(normalize("0000:3b:40.0"), None);
        assert_eq!(normalize(""), None);
    }

    #[test]
    fn parses_operator_map_and_rejects_garbage() {
        let m = parse_map("0=0000:3b:00.0, 1=0000:5e:00").unwrap();
        assert_eq!(m.get("0000:5e:00.0"), Some(&1));
        assert!(parse_map("0:0000:3b:00.0").is_err());
        assert!(parse_map("x=0000:3b:00.0").is_err());
    }

    #[test]
    fn sysfs_scan_numbers_nvidia_gpus_in_address_order() {
        let dir = tempfile::tempdir().unwrap();
        for (addr, vendor, class) in [
            ("0000:5e:00.0", "0x10de", "0x030200"),
            ("0000:3b:00.0", "0x10de", "0x030200"),
            ("0000:3c:00.0", "0x15b3", "0x020700"),
        ] {
            let d = dir.path().join(addr);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
        }
        let map = PciMap::new(scan_sysfs(dir.path()));
        assert_eq!(map.gpu("0000:3b:00"), Some(0));
        assert_eq!(map.gpu("0000:5e:00.0"), Some(1));
        assert_eq!(map.gpu("0000:3c:00.0"), None);
        assert_eq!(map.pci(1).as_deref(), Some("0000:5e:00.0"));
    }
}
