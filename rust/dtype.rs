//! Tensor element types the engine reads and writes, and the conversions between them.
//!
//! Conversions to wider types are exact. Conversions to narrower types round to nearest, ties to
//! even, exactly once.

use serde::{Deserialize, Serialize};

/// An element type. The four float types are read, measured, blended and converted; the others
/// (masks, position ids, quantisation scales stored as integers...) can never be measured and are
/// only ever copied byte for byte from the language expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Dtype {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of a binary32).
    BF16,
    /// A non-float type, by its safetensors name and element size.
    Opaque(Opaque),
}

/// Non-float safetensors types that are copied verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opaque {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit.
    U8,
    /// Signed 8-bit.
    I8,
    /// Signed 16-bit.
    I16,
    /// Unsigned 16-bit.
    U16,
    /// Signed 32-bit.
    I32,
    /// Unsigned 32-bit.
    U32,
    /// Signed 64-bit.
    I64,
    /// Unsigned 64-bit.
    U64,
    /// 8-bit float, 5 exponent bits (not measured: copied like an integer).
    F8E5M2,
    /// 8-bit float, 4 exponent bits (not measured: copied like an integer).
    F8E4M3,
}

const OPAQUE: [(Opaque, &str, usize); 11] = [
    (Opaque::Bool, "BOOL", 1),
    (Opaque::U8, "U8", 1),
    (Opaque::I8, "I8", 1),
    (Opaque::I16, "I16", 2),
    (Opaque::U16, "U16", 2),
    (Opaque::I32, "I32", 4),
    (Opaque::U32, "U32", 4),
    (Opaque::I64, "I64", 8),
    (Opaque::U64, "U64", 8),
    (Opaque::F8E5M2, "F8_E5M2", 1),
    (Opaque::F8E4M3, "F8_E4M3", 1),
];

/// The dtype names the safetensors format defines that we cannot even copy (sub-byte or complex
/// types); they get a clear error.
pub const KNOWN_UNSUPPORTED: &[&str] = &["F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"];

impl Dtype {
    /// The float dtypes, for error messages.
    pub const ALL: [Dtype; 4] = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64];

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::Opaque(o) => OPAQUE.iter().find(|(x, _, _)| *x == o).expect("listed").1,
        }
    }

    /// Parses a safetensors dtype name (case-insensitive; `bfloat16`/`float16`/`float32` accepted).
    pub fn parse(s: &str) -> Option<Dtype> {
        let upper = s.to_ascii_uppercase();
        match upper.as_str() {
            "F64" | "FLOAT64" => Some(Dtype::F64),
            "F32" | "FLOAT32" => Some(Dtype::F32),
            "F16" | "FLOAT16" => Some(Dtype::F16),
            "BF16" | "BFLOAT16" => Some(Dtype::BF16),
            other => OPAQUE.iter().find(|(_, n, _)| *n == other).map(|(o, _, _)| Dtype::Opaque(*o)),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Opaque(o) => OPAQUE.iter().find(|(x, _, _)| *x == o).expect("listed").2,
        }
    }

    /// Whether tensors of this type can be measured, blended and converted.
    pub fn is_float(self) -> bool {
        !matches!(self, Dtype::Opaque(_))
    }
}

impl From<Dtype> for String {
    fn from(d: Dtype) -> String {
        d.name().to_string()
    }
}

impl TryFrom<String> for Dtype {
    type Error = String;
    fn try_from(s: String) -> Result<Dtype, String> {
        Dtype::parse(&s).ok_or_else(|| format!("unknown dtype '{s}'"))
    }
}

/// Panic message for kernels handed a non-float tensor (the pipeline never does that).
pub const NOT_FLOAT: &str = "non-float tensors are only copied, never decoded";

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, round to nearest even; NaN stays NaN (quiet).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return ((u >> 16) | 0x0040) as u16;
    }
    let round = 0x7fff + ((u >> 16) & 1);
    ((u + round) >> 16) as u16
}

/// f16 bits to f32 (exact).
#[inline(always)]
pub fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// f32 to f16 bits, round to nearest even.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// A byte buffer with 8-byte alignment, so it can be viewed as a slice of any element type.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    words: Vec<u64>,
}

impl AlignedBuf {
    /// A zeroed buffer of at least `bytes` bytes.
    pub fn new(bytes: usize) -> Self {
        AlignedBuf { words: vec![0u64; bytes.div_ceil(8)] }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.words.len() * 8
    }

    /// The first `len` bytes, mutable.
    pub fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity());
        // SAFETY: u64 storage reinterpreted as bytes; u8 has no alignment or validity requirements and
        // the length stays within the allocation.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, len) }
    }

    /// The first `len` bytes.
    pub fn bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.capacity());
        // SAFETY: as in `bytes_mut`, read-only.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, len) }
    }
}

/// Plain numeric element types that any bit pattern is valid for.
pub trait Pod: Copy + 'static {}
impl Pod for u16 {}
impl Pod for f32 {}
impl Pod for f64 {}

/// Views bytes as elements. Panics if the slice is misaligned or not a whole number of elements; our
/// buffers are always 8-byte aligned (see [`AlignedBuf`]).
#[inline]
pub fn cast<T: Pod>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(bytes.len() % size == 0 && (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0);
    // SAFETY: alignment and length checked above; T is Pod so every bit pattern is a valid value.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
}

/// Mutable variant of [`cast`].
#[inline]
pub fn cast_mut<T: Pod>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert!(bytes.len() % size == 0 && (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0);
    // SAFETY: as in `cast`; the mutable borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / size) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_and_ties_to_even() {
        for bits in [0u16, 0x3f80, 0xbf80, 0x7f7f, 0x0001, 0x8000] {
            assert_eq!(f32_to_bf16(bf16_to_f32(bits)), bits);
        }
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even -> 1.
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3*2^-8 is halfway between 1+2^-7 and 1+2^-6: ties to even -> 1 + 2^-6.
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn f16_round_trip() {
        for bits in [0u16, 0x3c00, 0xbc00, 0x7bff, 0x0001] {
            assert_eq!(f32_to_f16(f16_to_f32(bits)), bits);
        }
    }
}
