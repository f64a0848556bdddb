//! Element types: every dtype that torch stores, with a stable one-byte code for the format.
//!
//! The codes are part of the on-storage format (docs/FORMAT.md, "Dtype codes") and never change
//! meaning. Names follow torch (`float32`, `bfloat16`, `float8_e4m3fn`, ...).

use crate::error::{Error, Result};

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, finite-only (torch `float8_e4m3fn`).
    F8E4M3FN,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits (torch `float8_e5m2`).
    F8E5M2,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// Boolean stored as one byte (0 or 1).
    Bool,
    /// Complex of two binary32.
    C64,
    /// Complex of two binary64.
    C128,
}

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 17] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3FN,
        DType::F8E5M2,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
        DType::C64,
        DType::C128,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F8E4M3FN | DType::F8E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 | DType::C64 => 8,
            DType::C128 => 16,
        }
    }

    /// The format's one-byte code.
    pub const fn code(self) -> u8 {
        match self {
            DType::F64 => 1,
            DType::F32 => 2,
            DType::F16 => 3,
            DType::BF16 => 4,
            DType::F8E4M3FN => 5,
            DType::F8E5M2 => 6,
            DType::I64 => 7,
            DType::I32 => 8,
            DType::I16 => 9,
            DType::I8 => 10,
            DType::U8 => 11,
            DType::U16 => 12,
            DType::U32 => 13,
            DType::U64 => 14,
            DType::Bool => 15,
            DType::C64 => 16,
            DType::C128 => 17,
        }
    }

    /// The dtype with format code `code`, if any.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.code() == code)
    }

    /// The torch name (`torch.<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F8E4M3FN => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
            DType::C64 => "complex64",
            DType::C128 => "complex128",
        }
    }

    /// The safetensors dtype string, where safetensors has one.
    pub const fn safetensors_name(self) -> Option<&'static str> {
        Some(match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3FN => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::U16 => "U16",
            DType::U32 => "U32",
            DType::U64 => "U64",
            DType::Bool => "BOOL",
            DType::C64 => "C64",
            DType::C128 => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;

    /// Accepts torch names (`float32`, `torch.float32`) and the common short forms (`f32`, `bf16`,
    /// `half`, `float`, `double`, `long`, `int`).
    fn from_str(s: &str) -> Result<DType> {
        let s = s.strip_prefix("torch.").unwrap_or(s);
        let d = match s {
            "float64" | "f64" | "double" => DType::F64,
            "float32" | "f32" | "float" => DType::F32,
            "float16" | "f16" | "half" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "float8_e4m3fn" | "f8e4m3fn" | "f8_e4m3" => DType::F8E4M3FN,
            "float8_e5m2" | "f8e5m2" | "f8_e5m2" => DType::F8E5M2,
            "int64" | "i64" | "long" => DType::I64,
            "int32" | "i32" | "int" => DType::I32,
            "int16" | "i16" | "short" => DType::I16,
            "int8" | "i8" => DType::I8,
            "uint8" | "u8" => DType::U8,
            "uint16" | "u16" => DType::U16,
            "uint32" | "u32" => DType::U32,
            "uint64" | "u64" => DType::U64,
            "bool" => DType::Bool,
            "complex64" | "c64" | "cfloat" => DType::C64,
            "complex128" | "c128" | "cdouble" => DType::C128,
            other => {
                return Err(Error::InvalidTensor {
                    name: String::new(),
                    reason: format!("unknown dtype `{other}`: use a torch dtype name such as float32 or bfloat16"),
                });
            }
        };
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for d in DType::ALL {
            assert!(seen.insert(d.code()), "duplicate code for {d}");
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_code(200), None);
        assert!("float128".parse::<DType>().is_err());
    }
}
