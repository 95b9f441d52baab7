//! Tensor element types the engine reads and writes, and the conversions between them.
//!
//! Conversions to wider types are exact. Conversions to narrower types round to nearest, ties to
//! even, exactly once.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
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
            other => OPAQUE
                .iter()
                .find(|(_, n, _)| *n == other)
                .map(|(o, _, _)| Dtype::Opaque(*o)),
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

/// Panic message for kernels handed a non-float tensor (the stages never do that).
pub const NOT_FLOAT: &str = "non-float tensors are only copied, never decoded";

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
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

/// Elements decoded or encoded at a time by the kernels (on the stack; fits in L1 alongside the
/// chunk's sources).
pub const BATCH: usize = 2048;

/// `x` rounded to the nearest bf16 value (ties to even), as an f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// Decodes raw elements to f32 (exact for BF16/F16/F32).
pub fn decode_f32(dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    match dtype {
        Dtype::BF16 => cast::<u16>(src)
            .iter()
            .zip(dst)
            .for_each(|(s, d)| *d = bf16_to_f32(*s)),
        Dtype::F16 => {
            // half's slice conversion: the same instruction (F16C) or software routine it uses per
            // element on this CPU, so the same bits, eight at a time.
            let src = cast::<u16>(src);
            let n = src.len().min(dst.len());
            src[..n]
                .reinterpret_cast::<half::f16>()
                .convert_to_f32_slice(&mut dst[..n]);
        }
        Dtype::F32 => dst.copy_from_slice(cast::<f32>(src)),
        Dtype::F64 => cast::<f64>(src).iter().zip(dst).for_each(|(s, d)| *d = *s as f32),
        Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
    }
}

/// Encodes f32 values, rounding once to nearest even.
pub fn encode_f32(src: &[f32], dtype: Dtype, dst: &mut [u8]) {
    match dtype {
        Dtype::BF16 => src
            .iter()
            .zip(cast_mut::<u16>(dst))
            .for_each(|(s, d)| *d = f32_to_bf16(*s)),
        Dtype::F16 => {
            // As in `decode_f32`: half's slice conversion, bit for bit its per-element rounding.
            let dst = cast_mut::<u16>(dst);
            let n = src.len().min(dst.len());
            dst[..n]
                .reinterpret_cast_mut::<half::f16>()
                .convert_from_f32_slice(&src[..n]);
        }
        Dtype::F32 => cast_mut::<f32>(dst).copy_from_slice(src),
        Dtype::F64 => src
            .iter()
            .zip(cast_mut::<f64>(dst))
            .for_each(|(s, d)| *d = f64::from(*s)),
        Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
    }
}

/// Decodes raw elements to f64 (exact), at most [`BATCH`] at a time.
pub fn decode_f64(dtype: Dtype, src: &[u8], dst: &mut [f64]) {
    if dtype == Dtype::F64 {
        dst.copy_from_slice(cast::<f64>(src));
    } else {
        let mut tmp = [0f32; BATCH];
        let tmp = &mut tmp[..dst.len()];
        decode_f32(dtype, src, tmp);
        tmp.iter().zip(dst).for_each(|(s, d)| *d = f64::from(*s));
    }
}

/// Encodes f64 values, rounding once to nearest even.
pub fn encode_f64(src: &[f64], dtype: Dtype, dst: &mut [u8]) {
    match dtype {
        Dtype::F64 => cast_mut::<f64>(dst).copy_from_slice(src),
        Dtype::F32 => src
            .iter()
            .zip(cast_mut::<f32>(dst))
            .for_each(|(s, d)| *d = *s as f32),
        // f64 -> f32 -> 16-bit would round twice, and half's from_f64 drops the low 32 mantissa bits
        // before deciding a tie (so it rounds some values just above a midpoint down): round to f32
        // *to odd* first, after which one rounding to nearest even gives the correctly rounded value.
        Dtype::BF16 => src
            .iter()
            .zip(cast_mut::<u16>(dst))
            .for_each(|(s, d)| *d = f32_to_bf16(f64_to_f32_odd(*s))),
        Dtype::F16 => src
            .iter()
            .zip(cast_mut::<u16>(dst))
            .for_each(|(s, d)| *d = f32_to_f16(f64_to_f32_odd(*s))),
        Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
    }
}

/// f64 to f32 rounded to odd: exact values unchanged, inexact ones to the neighbour whose last
/// bit is 1. With 24 bits against bf16's 8 and f16's 11 (at least 2 more), a later rounding to nearest even
/// is then the same as rounding the f64 once.
///
/// Branch-free (so that the loops over a chunk vectorise): an inexact, even result y steps one ulp
/// of magnitude towards x (away from zero when |x| > |y|, else towards it; an overflow to inf steps
/// back to MAX); NaN, exact and odd results are kept.
#[inline(always)]
fn f64_to_f32_odd(x: f64) -> f32 {
    let y = x as f32;
    let bits = y.to_bits();
    let back = f64::from(y);
    let adjust = u32::from(!x.is_nan()) & u32::from(back != x) & (!bits & 1);
    let away = u32::from(x.abs() > back.abs());
    f32::from_bits(bits.wrapping_add((adjust & away) << 1).wrapping_sub(adjust))
}

/// [`f64_to_f32_odd`] written with branches, as the definition the branch-free one is tested against.
#[cfg(test)]
fn f64_to_f32_odd_reference(x: f64) -> f32 {
    let y = x as f32;
    let bits = y.to_bits();
    if x.is_nan() || f64::from(y) == x || bits & 1 == 1 {
        return y;
    }
    f32::from_bits(if x.abs() > f64::from(y).abs() {
        bits + 1
    } else {
        bits - 1
    })
}

/// A byte buffer with 8-byte alignment, so it can be viewed as a slice of any element type.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    words: Vec<u64>,
}

impl AlignedBuf {
    /// A zeroed buffer of at least `bytes` bytes.
    pub fn new(bytes: usize) -> Self {
        AlignedBuf {
            words: vec![0u64; bytes.div_ceil(8)],
        }
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
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), len) }
    }

    /// The first `len` bytes.
    pub fn bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.capacity());
        // SAFETY: as in `bytes_mut`, read-only.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), len) }
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
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) }
}

/// Mutable variant of [`cast`].
#[inline]
pub fn cast_mut<T: Pod>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert!(bytes.len() % size == 0 && (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0);
    // SAFETY: as in `cast`; the mutable borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / size) }
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

    #[test]
    fn branch_free_round_to_odd_equals_the_branching_definition() {
        // Random bit patterns (every exponent, NaN, inf, subnormals) and values at and around f32
        // ulp midpoints, where the rounding decides.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut xs: Vec<f64> = vec![
            0.0,
            -0.0,
            f64::INFINITY,
            -f64::INFINITY,
            f64::NAN,
            1e300,
            -1e300,
            1e-50,
            -1e-50,
            f64::from(f32::MAX),
            f64::from(f32::MIN_POSITIVE) / 3.0,
        ];
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            xs.push(f64::from_bits(s));
            let y = f64::from(f32::from_bits((s >> 32) as u32));
            let half_ulp = f64::from(f32::from_bits((s >> 32) as u32 & 0x7f80_0000)) * 2f64.powi(-24);
            for d in [-1.0, 0.0, 1.0] {
                xs.push(y + half_ulp + d * half_ulp * 2f64.powi(-20));
                xs.push(y - half_ulp * d);
            }
        }
        for x in xs {
            let (got, want) = (f64_to_f32_odd(x), f64_to_f32_odd_reference(x));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e}: {got:e} vs {want:e}"
            );
        }
    }

    #[test]
    fn f64_to_16_bit_rounds_once() {
        // Just above the midpoint between 1 and the next bf16 (f16) value: must round up. The extra
        // 2^-40 lives in the low 32 mantissa bits that a truncating conversion ignores.
        let mut out = [0u8; 2];
        encode_f64(&[1.0 + 2f64.powi(-8) + 2f64.powi(-40)], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f81);
        encode_f64(&[1.0 + 2f64.powi(-11) + 2f64.powi(-40)], Dtype::F16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3c01);
        // Exact ties still go to even; exact values stay; overflow is infinity.
        encode_f64(&[1.0 + 2f64.powi(-8)], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        encode_f64(&[-2.5], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0xc020);
        encode_f64(&[1e300], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x7f80);
        assert_eq!(f64_to_f32_odd(1e-50), f32::from_bits(1));
    }

    /// The F16 slice conversions give exactly the per-element results: every f16 bit pattern decoded,
    /// and f32 values around every f16 rounding boundary (ties, subnormals, overflow, NaN) encoded.
    #[test]
    fn f16_slice_conversions_match_per_element() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut got = vec![0f32; all.len()];
        decode_f32(Dtype::F16, &bytes, &mut got);
        for (h, g) in all.iter().zip(&got) {
            assert_eq!(g.to_bits(), f16_to_f32(*h).to_bits(), "{h:#06x}");
        }
        // Each f16 value, the f32s just around it and the midpoints to its neighbours; odd length.
        let mut vals = vec![];
        for f in got.iter().filter(|f| f.is_finite()) {
            let b = f.to_bits();
            vals.extend([
                *f,
                f32::from_bits(b.wrapping_add(1)),
                f32::from_bits(b.wrapping_sub(1)),
                f32::from_bits(b.wrapping_add(1 << 12)),
            ]);
        }
        vals.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            65520.0,
            65519.99,
            1e-8,
            -1e-8,
            f32::MAX,
            f32::MIN_POSITIVE,
        ]);
        vals.push(0.5);
        let mut out = vec![0u8; vals.len() * 2];
        encode_f32(&vals, Dtype::F16, &mut out);
        for (v, o) in vals.iter().zip(out.chunks_exact(2)) {
            assert_eq!(u16::from_le_bytes([o[0], o[1]]), f32_to_f16(*v), "{v:e}");
        }
    }
}
