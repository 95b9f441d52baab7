//! `official` numerics (METHOD.md §6), all in one place: how the authors' code loads a value
//! ([`load`]), subtracts ([`sub`]), rounds a norm ([`norm`]) and blends ([`blend`]), and [`sums`], the
//! sums of squares behind their norms, accumulated exactly as `torch.norm` does it for a bf16 tensor
//! on the CPU. The analyze and write stages call these wherever `Numerics::Official` is chosen.
//!
//!
//! torch (2.x, `norm_kernel_tensor_iterator_impl`, the contiguous last-dimension path) widens each
//! group of 16 bf16 values to two float32 vectors of 8 lanes, adds the squares of the first 8 and then
//! of the next 8 into 8 float32 lane accumulators, folds the lanes left to right
//! (`((l0 + l1) + l2) + ...`), adds the squares of the last `n % 16` elements one by one, and takes
//! the float32 square root, which is then rounded to bf16. The float32 sums are not associative, so
//! the pass is sequential inside a tensor (tensors run in parallel) and the result is the same for
//! any chunk size and thread count. Squares of bf16 values are exact in float32, so fused or
//! separate multiply-adds give the same result.
//!
//! With float64 sums instead (the exact path), the bf16-rounded norm differs from torch's in about
//! 0.3% of 1M-element tensors and 5% of 16M-element ones (torch's float32 sum drifts by ~6e-4 of
//! the value there), which is what moved the authors' scores away from ours. Measured against torch
//! 2.15 on x86-64, where its DEFAULT, AVX2 and AVX512 kernels all sum this way; a torch build whose
//! float vectors are not 8 lanes wide (e.g. 4-lane NEON on aarch64) would sum, and round, differently.

use rayon::prelude::*;

use crate::analyze::sums::Sums;
use crate::budget::BufferPool;
use crate::dtype::{bf16_to_f32, cast, f16_to_f32, round_bf16, Dtype, BATCH, NOT_FLOAT};
use crate::error::Result;
use crate::io::Model;
use crate::progress::Progress;
use crate::stream::read_elems;

/// Elements torch handles per vector step for bf16 (two float32 vectors of [`LANES`]).
const STEP: u64 = 16;
/// float32 lanes of torch's accumulator.
const LANES: usize = 8;

/// One `torch.norm` accumulation in progress over the elements of a tensor, fed in index order.
#[derive(Debug, Clone)]
pub struct TorchNormSum {
    lanes: [f32; LANES],
    /// Index of the first element handled by the scalar tail (`n - n % 16`).
    main: u64,
    /// The folded lanes plus the tail so far, once the tail has started.
    tail: Option<f32>,
}

impl TorchNormSum {
    /// A new accumulation for a tensor of `numel` elements.
    pub fn new(numel: u64) -> Self {
        TorchNormSum {
            lanes: [0.0; LANES],
            main: numel - numel % STEP,
            tail: None,
        }
    }

    fn fold(&self) -> f32 {
        self.lanes[1..].iter().fold(self.lanes[0], |acc, &l| acc + l)
    }

    /// Adds `values` (already rounded to bf16), which are elements `start..start + values.len()`.
    pub fn add(&mut self, start: u64, values: &[f32]) {
        let mut done = 0;
        if start % LANES as u64 == 0 {
            // Whole groups of 8 before the tail: element k goes to lane k % 8, in order, the loop
            // the compiler turns into vector adds.
            let main = (self.main.saturating_sub(start) as usize).min(values.len());
            done = main / LANES * LANES;
            for group in values[..done].chunks_exact(LANES) {
                for (lane, v) in self.lanes.iter_mut().zip(group) {
                    *lane += v * v;
                }
            }
        }
        for (i, &v) in (start + done as u64..).zip(&values[done..]) {
            if i < self.main {
                self.lanes[(i % LANES as u64) as usize] += v * v;
            } else {
                let b = self.tail.unwrap_or_else(|| self.fold());
                self.tail = Some(b + v * v);
            }
        }
    }

    /// The float32 sum of squares torch takes the square root of.
    pub fn finish(&self) -> f32 {
        self.tail.unwrap_or_else(|| self.fold())
    }
}

/// A value as the authors load every checkpoint: rounded to bf16.
#[inline(always)]
pub fn load(x: f32) -> f32 {
    round_bf16(x)
}

/// X − B of two loaded values, as torch's bf16 subtraction does it: in float32, rounded to bf16.
#[inline(always)]
pub fn sub(b: f32, x: f32) -> f32 {
    round_bf16(x - b)
}

/// A norm as torch returns it for a bf16 tensor: a bf16 scalar.
pub fn norm(n: f64) -> f64 {
    f64::from(round_bf16(n as f32))
}

/// α·S + (1−α)·M as the authors blend two bf16 tensors: inputs in bf16, and α·S, (1−α)·M and their
/// sum each rounded to bf16. `ws` = α and `wm` = 1 − α, already in float32.
#[inline(always)]
pub fn blend(ws: f32, wm: f32, s: f32, m: f32) -> f32 {
    round_bf16(round_bf16(ws * round_bf16(s)) + round_bf16(wm * round_bf16(m)))
}

/// Raw `bytes` of `dtype` as the authors load them: rounded to bf16 (F64 goes through float32 first,
/// as torch converts it).
fn decode(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => cast::<u16>(bytes)
            .iter()
            .zip(out)
            .for_each(|(s, d)| *d = bf16_to_f32(*s)),
        Dtype::F16 => cast::<u16>(bytes)
            .iter()
            .zip(out)
            .for_each(|(s, d)| *d = load(f16_to_f32(*s))),
        Dtype::F32 => cast::<f32>(bytes)
            .iter()
            .zip(out)
            .for_each(|(s, d)| *d = load(*s)),
        Dtype::F64 => cast::<f64>(bytes)
            .iter()
            .zip(out)
            .for_each(|(s, d)| *d = load(*s as f32)),
        Dtype::Opaque(_) => unreachable!("{}", NOT_FLOAT),
    }
}

/// Σ B² and Σ (X − B)² for every tensor in `names`, each summed as `torch.norm` sums a bf16 tensor
/// (X − B rounded to bf16 first, as torch's bf16 subtraction does). Returned as float64 holding the
/// float32 sums exactly; [`crate::score::norm`] takes the square root and rounds it to bf16.
pub fn sums(
    names: &[&str],
    base: &Model,
    models: &[&Model],
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<Vec<Sums>> {
    names
        .par_iter()
        .map(|name| {
            let bt = base.tensor(name).expect("checked by caller");
            let numel = bt.numel();
            let mut acc_b = TorchNormSum::new(numel);
            let mut acc_x = vec![TorchNormSum::new(numel); models.len()];
            let mut start = 0u64;
            while start < numel {
                progress.check()?;
                let len = (numel - start).min(chunk_elems as u64) as usize;
                // Buffers are borrowed per chunk, so a long tensor does not hold a worker's set.
                let mut bufs = pool.take();
                let (first, rest) = bufs.split_first_mut().expect("pool has buffers");
                let b = read_elems(base, bt, start, len, first)?;
                let mut xs = Vec::with_capacity(models.len());
                for (m, buf) in models.iter().zip(rest.iter_mut()) {
                    let t = m.tensor(name).expect("checked by caller");
                    xs.push((t.dtype, read_elems(m, t, start, len, buf)?));
                }
                let size = bt.dtype.size();
                let (mut vb, mut vx) = ([0f32; BATCH], [0f32; BATCH]);
                for lo in (0..len).step_by(BATCH) {
                    let hi = (lo + BATCH).min(len);
                    let (vb, vx) = (&mut vb[..hi - lo], &mut vx[..hi - lo]);
                    decode(bt.dtype, &b[lo * size..hi * size], vb);
                    acc_b.add(start + lo as u64, vb);
                    for ((dtype, x), acc) in xs.iter().zip(acc_x.iter_mut()) {
                        decode(*dtype, &x[lo * size..hi * size], vx);
                        // X - B in bf16: computed in float32 and rounded, as torch's bf16 subtraction.
                        vx.iter_mut().zip(vb.iter()).for_each(|(x, b)| *x = sub(*b, *x));
                        acc.add(start + lo as u64, vx);
                    }
                }
                let bytes = len as u64 * bt.dtype.size() as u64 * (models.len() as u64 + 1);
                progress
                    .bytes_read
                    .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                progress.advance(bytes);
                start += len as u64;
            }
            Ok(Sums {
                name: (*name).to_string(),
                numel,
                base_ss: f64::from(acc_b.finish()),
                diff_ss: acc_x.iter().map(|a| f64::from(a.finish())).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_then_fold_then_tail() {
        // 20 elements: 16 go to the lanes (element i and i + 8 share lane i), 4 to the tail.
        let mut s = TorchNormSum::new(20);
        let v: Vec<f32> = (0..20).map(|i| i as f32).collect();
        s.add(0, &v);
        let lanes: Vec<f32> = (0..8).map(|l| (l * l + (l + 8) * (l + 8)) as f32).collect();
        let folded = lanes[1..].iter().fold(lanes[0], |a, &b| a + b);
        let want = (16..20).fold(folded, |a, i| a + (i * i) as f32);
        assert_eq!(s.finish(), want);
        // Fed in two pieces, the same sum.
        let mut t = TorchNormSum::new(20);
        t.add(0, &v[..7]);
        t.add(7, &v[7..]);
        // Or in groups of 8 and then the rest.
        let mut u = TorchNormSum::new(20);
        u.add(0, &v[..8]);
        u.add(8, &v[8..]);
        assert_eq!(u.finish(), want);
        assert_eq!(t.finish(), want);
    }
}
