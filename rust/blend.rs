//! The write pass: every output tensor is a byte copy of one source, a dtype conversion of one source,
//! or a blend α·S + (1−α)·M, computed chunk by chunk and written straight to its final offset.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::budget::BufferPool;
use crate::dtype::{bf16_to_f32, cast, cast_mut, f32_to_bf16, f32_to_f16, Dtype, NOT_FLOAT};
use crate::error::{Error, Result};
use crate::expert::{Expert, Term};
use crate::io::writer::OutputTensor;
use crate::io::{Model, OutputWriter};
use crate::options::Numerics;
use crate::plan::Action;
use crate::progress::Progress;
use crate::stream::{chunks, read_elems};

/// Elements converted at a time inside a chunk (fits in L1 alongside its sources).
const SUB: usize = 2048;
/// Buffers per worker when a source is a LoRA adapter: the three of the plain write pass (two
/// sources, one output) and two float64 value arrays.
pub const BUFFERS_LORA: usize = 5;

/// One output tensor and how to make it.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    /// Where it goes.
    pub out: &'a OutputTensor,
    /// What it is made of.
    pub action: Action,
    /// Refuse NaN/Inf in the sources read for this tensor. Set for the tensors the statistics pass
    /// does not read (embeddings, norms, lm_head), unless the user allowed non-finite values: the
    /// data is in cache here anyway, so the check costs next to nothing.
    pub check_finite: bool,
}

/// Runs the write pass for `jobs` on the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn write(
    jobs: &[Job<'_>],
    base: &Model,
    safety_src: &Expert,
    expert_src: &Expert,
    numerics: Numerics,
    writer: &OutputWriter,
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<()> {
    let numels: Vec<u64> = jobs.iter().map(|j| j.out.shape.iter().product()).collect();
    let work = chunks(&numels, chunk_elems);
    work.par_iter().try_for_each(|c| {
        progress.check()?;
        let job = &jobs[c.tensor];
        let out = job.out;
        let mut bufs = pool.take();
        let out_bytes = c.len * out.dtype.size();
        let dst = out.offset + c.start * out.dtype.size() as u64;
        // Full models (and tensors an adapter leaves alone or saved whole) are bytes; a tensor an
        // adapter updates is B + ΔW, computed in float64 and rounded once.
        let terms = match job.action {
            Action::Safety => [Some(safety_src.term(&out.name, base)), None],
            Action::Expert => [None, Some(expert_src.term(&out.name, base))],
            Action::Blend(_) => [Some(safety_src.term(&out.name, base)), Some(expert_src.term(&out.name, base))],
        };
        let plain = match terms {
            [Some(Term::Bytes(s, ts)), Some(Term::Bytes(m, tm))] => Some((s, m, ts.dtype == tm.dtype)),
            [Some(Term::Bytes(s, _)), None] => Some((s, s, true)),
            [None, Some(Term::Bytes(m, _))] => Some((m, m, true)),
            _ => None,
        };
        let (safety, expert) = match plain {
            Some((s, m, true)) => (s, m),
            _ => {
                let read = write_f64(job, terms, c.start, c.len, &mut bufs, numerics, writer, dst)?;
                progress.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
                progress.bytes_written.fetch_add(out_bytes as u64, Ordering::Relaxed);
                progress.advance(out_bytes as u64);
                return Ok(());
            }
        };
        let [a, b, o] = &mut bufs[..3] else { unreachable!("write pass needs three buffers") };
        let read = match job.action {
            Action::Safety | Action::Expert => {
                let src = if job.action == Action::Safety { safety } else { expert };
                let t = match terms {
                    [Some(Term::Bytes(_, t)), None] | [None, Some(Term::Bytes(_, t))] => t,
                    _ => unreachable!("a copy has one byte source"),
                };
                let verbatim = t.dtype == out.dtype && (numerics == Numerics::Exact || t.dtype == Dtype::BF16 || !t.dtype.is_float());
                if verbatim && !job.check_finite {
                    // A byte copy nobody needs to look at: in the kernel, without passing through us.
                    let (size, n) = (t.dtype.size() as u64, c.len * t.dtype.size());
                    writer.copy_from(out.shard, dst, src.shard_of(t), t.offset + c.start * size, n, a.bytes_mut(n))?;
                    progress.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    progress.bytes_written.fetch_add(out_bytes as u64, Ordering::Relaxed);
                    progress.advance(out_bytes as u64);
                    return Ok(());
                }
                let bytes = read_elems(src, t, c.start, c.len, a)?;
                if job.check_finite && !all_finite(t.dtype, bytes) {
                    return Err(Error::NonFinite { path: src.shard_of(t).path.clone(), tensor: out.name.clone() });
                }
                if verbatim {
                    writer.write_at(out.shard, dst, bytes)?;
                } else {
                    convert(t.dtype, bytes, out.dtype, o.bytes_mut(out_bytes), numerics);
                    writer.write_at(out.shard, dst, o.bytes(out_bytes))?;
                }
                bytes.len()
            }
            Action::Blend(alpha) => {
                let [Some(Term::Bytes(_, ts)), Some(Term::Bytes(_, tm))] = terms else { unreachable!("a plain blend has two byte sources") };
                let s = read_elems(safety, ts, c.start, c.len, a)?;
                let m = read_elems(expert, tm, c.start, c.len, b)?;
                if job.check_finite {
                    for (src, t, bytes) in [(safety, ts, &*s), (expert, tm, &*m)] {
                        if !all_finite(t.dtype, bytes) {
                            return Err(Error::NonFinite { path: src.shard_of(t).path.clone(), tensor: out.name.clone() });
                        }
                    }
                }
                blend(ts.dtype, s, m, out.dtype, o.bytes_mut(out_bytes), alpha, numerics);
                writer.write_at(out.shard, dst, o.bytes(out_bytes))?;
                s.len() + m.len()
            }
        };
        progress.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
        progress.bytes_written.fetch_add(out_bytes as u64, Ordering::Relaxed);
        progress.advance(out_bytes as u64);
        Ok(())
    })
}

/// Writes one chunk of a tensor with a LoRA source, or whose two sources differ in dtype: every term
/// as float64 values, blended in float64 if there are two, rounded once to the output dtype. Returns
/// the bytes read.
#[allow(clippy::too_many_arguments)]
fn write_f64(
    job: &Job<'_>,
    terms: [Option<Term<'_>>; 2],
    start: u64,
    len: usize,
    bufs: &mut [crate::dtype::AlignedBuf],
    numerics: Numerics,
    writer: &OutputWriter,
    dst: u64,
) -> Result<usize> {
    debug_assert_eq!(numerics, Numerics::Exact, "LoRA sources are refused with official numerics");
    let out = job.out;
    let [raw, o, vs, vm, _] = bufs else { unreachable!("{BUFFERS_LORA} buffers with LoRA sources") };
    let mut read = 0;
    let mut values = |term: Term<'_>, v: &mut crate::dtype::AlignedBuf| -> Result<()> {
        let v = &mut cast_mut::<f64>(v.bytes_mut(len * 8))[..];
        let (path, bytes, name) = match term {
            Term::Bytes(model, t) => {
                let bytes = read_elems(model, t, start, len, raw)?;
                decode_f64(t.dtype, bytes, v);
                (model.shard_of(t).path.clone(), bytes.len(), &out.name)
            }
            Term::Delta { adapter, module, base, tensor } => {
                adapter.delta_into(module, start, v)?;
                let bytes = read_elems(base, tensor, start, len, raw)?;
                let mut b = [0f64; SUB];
                for (lo, vv) in (0..len).step_by(SUB).zip(v.chunks_mut(SUB)) {
                    let b = &mut b[..vv.len()];
                    let sz = tensor.dtype.size();
                    decode_f64(tensor.dtype, &bytes[lo * sz..(lo + vv.len()) * sz], b);
                    vv.iter_mut().zip(b.iter()).for_each(|(d, b)| *d += *b);
                }
                (adapter.file.path.clone(), bytes.len(), &module.a)
            }
        };
        if job.check_finite && !v.iter().fold(true, |acc, x| acc & x.is_finite()) {
            return Err(Error::NonFinite { path, tensor: name.clone() });
        }
        read += bytes;
        Ok(())
    };
    let alpha = match job.action {
        Action::Blend(a) => a,
        _ => 1.0,
    };
    match terms {
        [Some(t), None] | [None, Some(t)] => values(t, vs)?,
        [Some(s), Some(m)] => {
            values(s, vs)?;
            values(m, vm)?;
            let (ws, wm) = (alpha, 1.0 - alpha);
            let vm = cast::<f64>(vm.bytes(len * 8));
            cast_mut::<f64>(vs.bytes_mut(len * 8)).iter_mut().zip(vm).for_each(|(a, b)| *a = ws * *a + wm * *b);
        }
        [None, None] => unreachable!("every output tensor has a source"),
    }
    let out_bytes = len * out.dtype.size();
    encode64(cast::<f64>(vs.bytes(len * 8)), out.dtype, o.bytes_mut(out_bytes));
    writer.write_at(out.shard, dst, o.bytes(out_bytes))?;
    Ok(read)
}

/// Decodes raw elements to f64 (exact).
fn decode_f64(dtype: Dtype, src: &[u8], dst: &mut [f64]) {
    for (lo, d) in (0..dst.len()).step_by(SUB).zip(dst.chunks_mut(SUB)) {
        let size = dtype.size();
        decode64(dtype, &src[lo * size..(lo + d.len()) * size], d);
    }
}

/// True when no element of `bytes` is NaN or ±Inf (exponent bits all ones). Branch-free so that it
/// vectorises: it runs over every byte of the unmeasured tensors in the write pass.
pub fn all_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    match dtype {
        Dtype::BF16 => cast::<u16>(bytes).iter().fold(0u16, |acc, &v| acc | u16::from(v & 0x7F80 == 0x7F80)) == 0,
        Dtype::F16 => cast::<u16>(bytes).iter().fold(0u16, |acc, &v| acc | u16::from(v & 0x7C00 == 0x7C00)) == 0,
        Dtype::F32 => cast::<f32>(bytes).iter().fold(true, |acc, v| acc & v.is_finite()),
        Dtype::F64 => cast::<f64>(bytes).iter().fold(true, |acc, v| acc & v.is_finite()),
        Dtype::Opaque(_) => true,
    }
}

/// Decodes raw elements to f32 (exact for BF16/F16/F32).
fn decode32(dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    match dtype {
        Dtype::BF16 => cast::<u16>(src).iter().zip(dst).for_each(|(s, d)| *d = bf16_to_f32(*s)),
        Dtype::F16 => {
            // half's slice conversion: the same instruction (F16C) or software routine it uses per
            // element on this CPU, so the same bits, eight at a time.
            let src = cast::<u16>(src);
            let n = src.len().min(dst.len());
            src[..n].reinterpret_cast::<half::f16>().convert_to_f32_slice(&mut dst[..n]);
        }
        Dtype::F32 => dst.copy_from_slice(cast::<f32>(src)),
        Dtype::F64 => cast::<f64>(src).iter().zip(dst).for_each(|(s, d)| *d = *s as f32),
        Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
    }
}

/// Encodes f32 values, rounding once to nearest even.
fn encode32(src: &[f32], dtype: Dtype, dst: &mut [u8]) {
    match dtype {
        Dtype::BF16 => src.iter().zip(cast_mut::<u16>(dst)).for_each(|(s, d)| *d = f32_to_bf16(*s)),
        Dtype::F16 => {
            // As in `decode32`: half's slice conversion, bit for bit its per-element rounding.
            let dst = cast_mut::<u16>(dst);
            let n = src.len().min(dst.len());
            dst[..n].reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(&src[..n]);
        }
        Dtype::F32 => cast_mut::<f32>(dst).copy_from_slice(src),
        Dtype::F64 => src.iter().zip(cast_mut::<f64>(dst)).for_each(|(s, d)| *d = *s as f64),
        Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
    }
}

fn decode64(dtype: Dtype, src: &[u8], dst: &mut [f64]) {
    match dtype {
        Dtype::F64 => dst.copy_from_slice(cast::<f64>(src)),
        _ => {
            let mut tmp = [0f32; SUB];
            let tmp = &mut tmp[..dst.len()];
            decode32(dtype, src, tmp);
            tmp.iter().zip(dst).for_each(|(s, d)| *d = *s as f64);
        }
    }
}

fn encode64(src: &[f64], dtype: Dtype, dst: &mut [u8]) {
    match dtype {
        Dtype::F64 => cast_mut::<f64>(dst).copy_from_slice(src),
        Dtype::F32 => src.iter().zip(cast_mut::<f32>(dst)).for_each(|(s, d)| *d = *s as f32),
        // f64 -> f32 -> 16-bit would round twice, and half's from_f64 drops the low 32 mantissa bits
        // before deciding a tie (so it rounds some values just above a midpoint down): round to f32
        // *to odd* first, after which one rounding to nearest even gives the correctly rounded value.
        Dtype::BF16 => src.iter().zip(cast_mut::<u16>(dst)).for_each(|(s, d)| *d = f32_to_bf16(f64_to_f32_odd(*s))),
        Dtype::F16 => src.iter().zip(cast_mut::<u16>(dst)).for_each(|(s, d)| *d = f32_to_f16(f64_to_f32_odd(*s))),
        Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
    }
}

/// f64 to f32 rounded to odd: exact values unchanged, inexact ones to the neighbour whose last bit is
/// 1. With 24 bits against bf16's 8 and f16's 11 (at least 2 more), a later rounding to nearest even
/// is then the same as rounding the f64 once.
#[inline(always)]
fn f64_to_f32_odd(x: f64) -> f32 {
    let y = x as f32;
    let bits = y.to_bits();
    if x.is_nan() || y as f64 == x || bits & 1 == 1 {
        return y;
    }
    // y is the even neighbour of x; step one ulp towards x (an overflow to inf steps back to MAX).
    f32::from_bits(if x.abs() > (y as f64).abs() { bits + 1 } else { bits - 1 })
}

#[inline(always)]
fn rb(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// Converts one source's elements to another dtype (official numerics: through bf16, as the authors
/// load every checkpoint in bf16).
pub fn convert(src_dtype: Dtype, src: &[u8], out_dtype: Dtype, out: &mut [u8], numerics: Numerics) {
    let (si, so) = (src_dtype.size(), out_dtype.size());
    let n = src.len() / si;
    if (src_dtype == Dtype::F64 || out_dtype == Dtype::F64) && numerics == Numerics::Exact {
        let mut v = [0f64; SUB];
        for lo in (0..n).step_by(SUB) {
            let hi = (lo + SUB).min(n);
            decode64(src_dtype, &src[lo * si..hi * si], &mut v[..hi - lo]);
            encode64(&v[..hi - lo], out_dtype, &mut out[lo * so..hi * so]);
        }
        return;
    }
    let mut v = [0f32; SUB];
    for lo in (0..n).step_by(SUB) {
        let hi = (lo + SUB).min(n);
        let v = &mut v[..hi - lo];
        decode32(src_dtype, &src[lo * si..hi * si], v);
        if numerics == Numerics::Official {
            v.iter_mut().for_each(|x| *x = rb(*x));
        }
        encode32(v, out_dtype, &mut out[lo * so..hi * so]);
    }
}

/// out = α·S + (1−α)·M. Exact: computed in f32 (f64 when F64 is involved) with the weights rounded
/// to that type, products and sum each in that type, no fused multiply-add, then rounded once to the
/// output dtype. Official: inputs in bf16, α·S, (1−α)·M and their sum each rounded to bf16 (METHOD.md §6).
pub fn blend(in_dtype: Dtype, s: &[u8], m: &[u8], out_dtype: Dtype, out: &mut [u8], alpha: f64, numerics: Numerics) {
    let (si, so) = (in_dtype.size(), out_dtype.size());
    let n = s.len() / si;
    if (in_dtype == Dtype::F64 || out_dtype == Dtype::F64) && numerics == Numerics::Exact {
        let (ws, wm) = (alpha, 1.0 - alpha);
        let (mut vs, mut vm) = ([0f64; SUB], [0f64; SUB]);
        for lo in (0..n).step_by(SUB) {
            let hi = (lo + SUB).min(n);
            let (vs, vm) = (&mut vs[..hi - lo], &mut vm[..hi - lo]);
            decode64(in_dtype, &s[lo * si..hi * si], vs);
            decode64(in_dtype, &m[lo * si..hi * si], vm);
            vs.iter_mut().zip(vm.iter()).for_each(|(a, b)| *a = ws * *a + wm * *b);
            encode64(vs, out_dtype, &mut out[lo * so..hi * so]);
        }
        return;
    }
    let (ws, wm) = (alpha as f32, (1.0 - alpha) as f32);
    let (mut vs, mut vm) = ([0f32; SUB], [0f32; SUB]);
    for lo in (0..n).step_by(SUB) {
        let hi = (lo + SUB).min(n);
        let (vs, vm) = (&mut vs[..hi - lo], &mut vm[..hi - lo]);
        decode32(in_dtype, &s[lo * si..hi * si], vs);
        decode32(in_dtype, &m[lo * si..hi * si], vm);
        match numerics {
            Numerics::Exact => vs.iter_mut().zip(vm.iter()).for_each(|(a, b)| *a = ws * *a + wm * *b),
            Numerics::Official => {
                vs.iter_mut().zip(vm.iter()).for_each(|(a, b)| *a = rb(rb(ws * rb(*a)) + rb(wm * rb(*b))))
            }
        }
        encode32(vs, out_dtype, &mut out[lo * so..hi * so]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_to_16_bit_rounds_once() {
        // Just above the midpoint between 1 and the next bf16 (f16) value: must round up. The extra
        // 2^-40 lives in the low 32 mantissa bits that a truncating conversion ignores.
        let mut out = [0u8; 2];
        encode64(&[1.0 + 2f64.powi(-8) + 2f64.powi(-40)], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f81);
        encode64(&[1.0 + 2f64.powi(-11) + 2f64.powi(-40)], Dtype::F16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3c01);
        // Exact ties still go to even; exact values stay; overflow is infinity.
        encode64(&[1.0 + 2f64.powi(-8)], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        encode64(&[-2.5], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0xc020);
        encode64(&[1e300], Dtype::BF16, &mut out);
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
        decode32(Dtype::F16, &bytes, &mut got);
        for (h, g) in all.iter().zip(&got) {
            assert_eq!(g.to_bits(), crate::dtype::f16_to_f32(*h).to_bits(), "{h:#06x}");
        }
        // Each f16 value, the f32s just around it and the midpoints to its neighbours; odd length.
        let mut vals = vec![];
        for f in got.iter().filter(|f| f.is_finite()) {
            let b = f.to_bits();
            vals.extend([*f, f32::from_bits(b.wrapping_add(1)), f32::from_bits(b.wrapping_sub(1)), f32::from_bits(b.wrapping_add(1 << 12))]);
        }
        vals.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 65520.0, 65519.99, 1e-8, -1e-8, f32::MAX, f32::MIN_POSITIVE]);
        vals.push(0.5);
        let mut out = vec![0u8; vals.len() * 2];
        encode32(&vals, Dtype::F16, &mut out);
        for (v, o) in vals.iter().zip(out.chunks_exact(2)) {
            assert_eq!(u16::from_le_bytes([o[0], o[1]]), f32_to_f16(*v), "{v:e}");
        }
    }
}
