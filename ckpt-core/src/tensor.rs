//! The tensor model: name, dtype, shape and byte length, and the table that places tensors in a
//! snapshot's contiguous byte region.
//!
//! A snapshot is one contiguous region (an arena slot, or a staging buffer) with every tensor at an
//! aligned offset. The table is what the shard index stores; the bytes are what the chunks store.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Longest tensor name, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Most dimensions a tensor may have.
pub const MAX_NDIM: usize = 64;
/// Default alignment of tensors inside a snapshot region: a cache line, and enough for any dtype
/// and for vectorised copies.
pub const DEFAULT_ALIGN: u64 = 64;

/// What a tensor is, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorMeta {
    /// The tensor's key path in the training state (e.g. `model.layers.0.attn.wq`).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape; empty for a rank-0 scalar, containing a 0 for a zero-size tensor.
    pub shape: Vec<u64>,
}

impl TensorMeta {
    /// Builds and validates a tensor description.
    pub fn new(name: impl Into<String>, dtype: DType, shape: impl Into<Vec<u64>>) -> Result<Self> {
        let meta = TensorMeta { name: name.into(), dtype, shape: shape.into() };
        meta.validate()?;
        Ok(meta)
    }

    /// Number of elements (1 for a scalar), or an error when it overflows.
    pub fn numel(&self) -> Result<u64> {
        self.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(|| Error::InvalidTensor {
            name: self.name.clone(),
            reason: format!("shape {:?} overflows 64 bits", self.shape),
        })
    }

    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> Result<u64> {
        self.numel()?.checked_mul(self.dtype.size() as u64).ok_or_else(|| Error::InvalidTensor {
            name: self.name.clone(),
            reason: format!("shape {:?} of {} overflows 64 bits", self.shape, self.dtype),
        })
    }

    /// Checks the name and shape limits.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidTensor { name: self.name.clone(), reason });
        if self.name.is_empty() {
            return bad("empty tensor name".into());
        }
        if self.name.len() > MAX_NAME_LEN {
            return bad(format!("name is {} bytes, the limit is {MAX_NAME_LEN}", self.name.len()));
        }
        if self.shape.len() > MAX_NDIM {
            return bad(format!("{} dimensions, the limit is {MAX_NDIM}", self.shape.len()));
        }
        self.byte_len().map(|_| ())
    }
}

/// A tensor placed in a snapshot region.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorEntry {
    /// What the tensor is.
    pub meta: TensorMeta,
    /// Byte offset of its first element in the region.
    pub offset: u64,
    /// Byte length (`meta.byte_len()`).
    pub len: u64,
}

impl TensorEntry {
    /// The byte range of this tensor in its region.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// Ordered tensors and the size of the region that holds them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TensorTable {
    entries: Vec<TensorEntry>,
    total_len: u64,
}

impl TensorTable {
    /// Places `metas` one after another, each at an offset aligned to `align` bytes (a power of
    /// two). Names must be unique.
    pub fn packed(metas: impl IntoIterator<Item = TensorMeta>, align: u64) -> Result<Self> {
        if !align.is_power_of_two() {
            return Err(Error::InvalidConfig { field: "align", reason: format!("{align} is not a power of two") });
        }
        let mut entries = Vec::new();
        let mut cursor = 0u64;
        for meta in metas {
            meta.validate()?;
            let len = meta.byte_len()?;
            let offset = cursor.checked_next_multiple_of(align).ok_or_else(|| overflow(&meta.name))?;
            cursor = offset.checked_add(len).ok_or_else(|| overflow(&meta.name))?;
            entries.push(TensorEntry { meta, offset, len });
        }
        Self::from_entries(entries, cursor)
    }

    /// Builds a table from explicit placements and checks it: unique names, lengths matching
    /// shapes, entries in ascending non-overlapping order inside `total_len`.
    pub fn from_entries(entries: Vec<TensorEntry>, total_len: u64) -> Result<Self> {
        let mut names = std::collections::HashSet::with_capacity(entries.len());
        let mut end = 0u64;
        for e in &entries {
            e.meta.validate()?;
            let bad = |reason: String| Err(Error::InvalidTensor { name: e.meta.name.clone(), reason });
            if !names.insert(e.meta.name.as_str()) {
                return bad("duplicate tensor name".into());
            }
            if e.len != e.meta.byte_len()? {
                return bad(format!("length {} does not match shape {:?} of {}", e.len, e.meta.shape, e.meta.dtype));
            }
            if e.offset < end {
                return bad(format!("offset {} overlaps the previous tensor, which ends at {end}", e.offset));
            }
            end = e.offset.checked_add(e.len).ok_or_else(|| overflow(&e.meta.name))?;
            if end > total_len {
                return bad(format!("ends at {end}, past the region's {total_len} bytes"));
            }
        }
        Ok(TensorTable { entries, total_len })
    }

    /// The tensors, in region order.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// Size of the region in bytes (including alignment padding).
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.iter().find(|e| e.meta.name == name)
    }

    /// Compares the tensors a caller expects with this (stored) table and lists every difference:
    /// missing, unexpected, and shape or dtype mismatches. Empty when they match.
    pub fn mismatches(&self, expected: &[TensorMeta]) -> Vec<String> {
        let stored: std::collections::HashMap<&str, &TensorMeta> =
            self.entries.iter().map(|e| (e.meta.name.as_str(), &e.meta)).collect();
        let mut problems = Vec::new();
        let mut wanted = std::collections::HashSet::new();
        for m in expected {
            wanted.insert(m.name.as_str());
            match stored.get(m.name.as_str()) {
                None => problems.push(format!("`{}`: not in the checkpoint", m.name)),
                Some(s) if s.dtype != m.dtype || s.shape != m.shape => problems.push(format!(
                    "`{}`: expected {} {:?}, checkpoint has {} {:?}",
                    m.name, m.dtype, m.shape, s.dtype, s.shape
                )),
                Some(_) => {}
            }
        }
        for e in &self.entries {
            if !wanted.contains(e.meta.name.as_str()) {
                problems.push(format!("`{}`: in the checkpoint but not in the state", e.meta.name));
            }
        }
        problems
    }
}

fn overflow(name: &str) -> Error {
    Error::InvalidTensor { name: name.to_string(), reason: "region offset overflows 64 bits".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_aligns_and_handles_scalars_and_empties() {
        let t = TensorTable::packed(
            [
                TensorMeta::new("a", DType::F32, vec![3]).unwrap(),
                TensorMeta::new("scalar", DType::F64, vec![]).unwrap(),
                TensorMeta::new("empty", DType::BF16, vec![4, 0, 2]).unwrap(),
                TensorMeta::new("b", DType::U8, vec![1]).unwrap(),
            ],
            64,
        )
        .unwrap();
        let e = t.entries();
        assert_eq!((e[0].offset, e[0].len), (0, 12));
        assert_eq!((e[1].offset, e[1].len), (64, 8));
        assert_eq!((e[2].offset, e[2].len), (128, 0));
        assert_eq!((e[3].offset, e[3].len), (128, 1));
        assert_eq!(t.total_len(), 129);
    }

    #[test]
    fn rejects_overflow_duplicates_and_overlap() {
        assert!(TensorMeta::new("x", DType::C128, vec![u64::MAX / 2, 4]).is_err());
        let a = TensorMeta::new("a", DType::U8, vec![4]).unwrap();
        assert!(TensorTable::packed([a.clone(), a.clone()], 1).is_err());
        let e = |o| TensorEntry { meta: a.clone(), offset: o, len: 4 };
        let mut b = e(2);
        b.meta.name = "b".into();
        assert!(TensorTable::from_entries(vec![e(0), b], 8).is_err());
        assert!(TensorTable::from_entries(vec![e(6)], 8).is_err());
    }

    #[test]
    fn mismatches_list_every_problem() {
        let t = TensorTable::packed(
            [
                TensorMeta::new("w", DType::F32, vec![2, 2]).unwrap(),
                TensorMeta::new("extra", DType::I64, vec![]).unwrap(),
            ],
            64,
        )
        .unwrap();
        let p = t.mismatches(&[
            TensorMeta::new("w", DType::F16, vec![2, 2]).unwrap(),
            TensorMeta::new("missing", DType::F32, vec![1]).unwrap(),
        ]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("expected float16 [2, 2], checkpoint has float32 [2, 2]"), "{p:?}");
        assert!(p.iter().any(|s| s.contains("`missing`: not in the checkpoint")));
        assert!(p.iter().any(|s| s.contains("`extra`: in the checkpoint but not in the state")));
    }
}
