//! Strict parsers for the Kubernetes quantities the webhook accepts in annotations.
//!
//! Kubernetes accepts more forms (`1e3`, `1.5Gi`, `500u`); the webhook accepts a documented subset, so
//! that what it compares (request ≤ limit, arena ≤ maximum) is exact and the value it writes into the
//! pod is exactly what the user typed.

/// A memory quantity: a whole number with an optional suffix (`Ki Mi Gi Ti Pi` or `k M G T P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Memory(u64);

/// The accepted form of a memory quantity, for messages.
pub const MEMORY_FORM: &str =
    "a whole number of bytes with an optional suffix Ki, Mi, Gi, Ti, Pi, k, M, G, T or P (e.g. 64Gi)";
/// The accepted form of a CPU quantity, for messages.
pub const CPU_FORM: &str = "whole or decimal cores with at most 3 decimals, or millicores (e.g. 2, 0.5 or 500m)";

impl Memory {
    /// Parses `s`, or says what is wrong with it.
    pub fn parse(s: &str) -> Result<Memory, String> {
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, suffix) = s.split_at(digits_end);
        if digits.is_empty() || digits.len() > 20 {
            return Err(format!("`{}` is not {MEMORY_FORM}", super::value::shown(s)));
        }
        let mult: u64 = match suffix {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "P" => 1_000_000_000_000_000,
            _ => return Err(format!("`{}` is not {MEMORY_FORM}", super::value::shown(s))),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(Memory)
            .ok_or_else(|| format!("`{}` is too large: use {MEMORY_FORM}", super::value::shown(s)))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// A CPU quantity, in millicores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cpu(u64);

impl Cpu {
    /// Parses `s`, or says what is wrong with it.
    pub fn parse(s: &str) -> Result<Cpu, String> {
        let bad = || format!("`{}` is not {CPU_FORM}", super::value::shown(s));
        let all_digits = |t: &str| !t.is_empty() && t.len() <= 12 && t.bytes().all(|b| b.is_ascii_digit());
        let milli = if let Some(m) = s.strip_suffix('m') {
            if !all_digits(m) {
                return Err(bad());
            }
            m.parse::<u64>().map_err(|_| bad())?
        } else {
            let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
            if !all_digits(whole) || frac.len() > 3 || (s.contains('.') && !all_digits(frac)) {
                return Err(bad());
            }
            let w = whole.parse::<u64>().map_err(|_| bad())?;
            let f = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse::<u64>().map_err(|_| bad())? };
            w.checked_mul(1000).and_then(|w| w.checked_add(f)).ok_or_else(bad)?
        };
        Ok(Cpu(milli))
    }

    /// The quantity in millicores.
    pub fn millis(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_accepts_the_documented_forms_exactly() {
        assert_eq!(Memory::parse("64Gi").map(Memory::bytes), Ok(64 << 30));
        assert_eq!(Memory::parse("1500M").map(Memory::bytes), Ok(1_500_000_000));
        assert_eq!(Memory::parse("1024").map(Memory::bytes), Ok(1024));
        for bad in ["", "Gi", "1.5Gi", "-1Gi", "1gi", "1 Gi", "1GiB", "99999999999999999999Pi", "1e9", "0x10"] {
            assert!(Memory::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cpu_converts_to_millicores() {
        assert_eq!(Cpu::parse("2").map(Cpu::millis), Ok(2000));
        assert_eq!(Cpu::parse("0.5").map(Cpu::millis), Ok(500));
        assert_eq!(Cpu::parse("1.25").map(Cpu::millis), Ok(1250));
        assert_eq!(Cpu::parse("250m").map(Cpu::millis), Ok(250));
        for bad in ["", "m", "0.0001", "1.", ".5", "-1", "1.5m", "abc", "1k", "9999999999999"] {
            assert!(Cpu::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
