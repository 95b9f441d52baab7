//! Micro-benchmarks of the engine's inner loops on hot (in-memory) data, in GB/s of input:
//!
//! - `stats/*`: the statistics kernel as the pass runs it on one chunk of B, S and M (per 65 536-element
//!   block: Σ B², Σ (S − B)², Σ (M − B)² in one fused pass), and the two single-sum kernels alone;
//! - `blend/*`: α·S + (1−α)·M decoded, blended in f32 and encoded back, and a plain dtype conversion;
//! - `stats_threads/*`: the whole statistics computation over 3 × 64 Mi elements held in memory, on a
//!   rayon pool of 1 and of 2 threads (the compute-bound part of a merge, for the scaling ratio).
//!
//! Run: `cargo bench --bench engine` (add `-- stats` to filter). See benches/README.md.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use layerswap_fast::analyze::sums::kernels::{block_sums, sum_sq, sum_sq_diff};
use layerswap_fast::budget::BLOCK;
use layerswap_fast::dtype::{f32_to_bf16, f32_to_f16, AlignedBuf, Dtype};
use layerswap_fast::write::{blend, convert};
use layerswap_fast::Numerics;
use rayon::prelude::*;

/// One engine chunk (budget::MAX_CHUNK elements).
const CHUNK: usize = 1 << 20;

/// Deterministic pseudo-normal-ish values around 0 with scale 0.02 (xorshift; no rand dependency).
fn values(n: usize, seed: u64, delta_of: Option<&[f32]>) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            match delta_of {
                Some(b) => b[i] + 0.002 * u,
                None => 0.04 * u,
            }
        })
        .collect()
}

fn encode(v: &[f32], dtype: Dtype) -> AlignedBuf {
    let mut buf = AlignedBuf::new(v.len() * dtype.size());
    let bytes = buf.bytes_mut(v.len() * dtype.size());
    match dtype {
        Dtype::BF16 => bytes
            .chunks_exact_mut(2)
            .zip(v)
            .for_each(|(d, x)| d.copy_from_slice(&f32_to_bf16(*x).to_le_bytes())),
        Dtype::F16 => bytes
            .chunks_exact_mut(2)
            .zip(v)
            .for_each(|(d, x)| d.copy_from_slice(&f32_to_f16(*x).to_le_bytes())),
        Dtype::F32 => bytes
            .chunks_exact_mut(4)
            .zip(v)
            .for_each(|(d, x)| d.copy_from_slice(&x.to_le_bytes())),
        Dtype::F64 => bytes
            .chunks_exact_mut(8)
            .zip(v)
            .for_each(|(d, x)| d.copy_from_slice(&f64::from(*x).to_le_bytes())),
        other @ Dtype::Opaque(_) => unreachable!("the benchmarks use float dtypes, not {other}"),
    }
    buf
}

/// B, S, M of `n` elements of `dtype`.
fn trio(n: usize, dtype: Dtype) -> [AlignedBuf; 3] {
    let b = values(n, 1, None);
    let s = values(n, 2, Some(&b));
    let m = values(n, 3, Some(&b));
    [encode(&b, dtype), encode(&s, dtype), encode(&m, dtype)]
}

/// What the analyze pass does with one chunk of B and k experts: per block, Σ B² and Σ (X − B)².
fn chunk_sums(dtype: Dtype, b: &[u8], xs: &[&[u8]], out: &mut Vec<f64>) {
    let step = BLOCK * dtype.size();
    let k = xs.len();
    out.clear();
    out.resize(b.len().div_ceil(step) * (k + 1), 0.0);
    let mut blk: Vec<&[u8]> = Vec::with_capacity(k);
    for (i, lo) in (0..b.len()).step_by(step).enumerate() {
        let hi = (lo + step).min(b.len());
        blk.clear();
        blk.extend(xs.iter().map(|x| &x[lo..hi]));
        block_sums(
            dtype,
            Numerics::Exact,
            &b[lo..hi],
            &blk,
            &mut out[i * (k + 1)..(i + 1) * (k + 1)],
        );
    }
}

fn stats(c: &mut Criterion) {
    let mut g = c.benchmark_group("stats");
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let [b, s, m] = trio(CHUNK, dtype);
        let n = CHUNK * dtype.size();
        let (b, s, m) = (b.bytes(n), s.bytes(n), m.bytes(n));
        let mut out = Vec::new();
        g.throughput(Throughput::Bytes(3 * n as u64));
        g.bench_function(format!("chunk_B_S_M/{dtype}"), |bch| {
            bch.iter(|| chunk_sums(dtype, black_box(b), &[black_box(s), black_box(m)], &mut out));
        });
        g.throughput(Throughput::Bytes(2 * n as u64));
        g.bench_function(format!("sum_sq_diff/{dtype}"), |bch| {
            bch.iter(|| sum_sq_diff(dtype, Numerics::Exact, black_box(b), black_box(s)));
        });
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_function(format!("sum_sq/{dtype}"), |bch| {
            bch.iter(|| sum_sq(dtype, Numerics::Exact, black_box(b)));
        });
    }
    g.finish();
}

fn blends(c: &mut Criterion) {
    let mut g = c.benchmark_group("blend");
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let [_, s, m] = trio(CHUNK, dtype);
        let n = CHUNK * dtype.size();
        let (s, m) = (s.bytes(n), m.bytes(n));
        let mut o = AlignedBuf::new(n);
        g.throughput(Throughput::Bytes(2 * n as u64));
        g.bench_function(format!("alpha_S_M/{dtype}"), |bch| {
            bch.iter(|| {
                blend(
                    dtype,
                    black_box(s),
                    black_box(m),
                    dtype,
                    o.bytes_mut(n),
                    0.5,
                    Numerics::Exact,
                );
            });
        });
    }
    let [_, s, _] = trio(CHUNK, Dtype::BF16);
    let s = s.bytes(CHUNK * 2);
    let mut o = AlignedBuf::new(CHUNK * 4);
    g.throughput(Throughput::Bytes(CHUNK as u64 * 2));
    g.bench_function("convert/BF16_to_F32", |bch| {
        bch.iter(|| {
            convert(
                Dtype::BF16,
                black_box(s),
                Dtype::F32,
                o.bytes_mut(CHUNK * 4),
                Numerics::Exact,
            );
        });
    });
    g.finish();
}

fn stats_threads(c: &mut Criterion) {
    let total = 64 << 20;
    let [b, s, m] = trio(total, Dtype::BF16);
    let n = total * 2;
    let (b, s, m) = (b.bytes(n), s.bytes(n), m.bytes(n));
    let mut g = c.benchmark_group("stats_threads");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(3 * n as u64));
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        g.bench_function(format!("BF16/{threads}"), |bch| {
            bch.iter(|| {
                pool.install(|| {
                    let step = CHUNK * 2;
                    (0..n / step)
                        .into_par_iter()
                        .map(|i| {
                            let r = i * step..(i + 1) * step;
                            let mut out = Vec::new();
                            chunk_sums(Dtype::BF16, &b[r.clone()], &[&s[r.clone()], &m[r]], &mut out);
                            out
                        })
                        .collect::<Vec<_>>()
                })
            });
        });
    }
    g.finish();
}

/// The kernels alone, without memory traffic: every task works on chunk buffers already in cache (as
/// after each read in the pass), 64 tasks of one 256 Ki-element chunk of B, S and M per iteration.
fn stats_threads_cached(c: &mut Criterion) {
    let n_elems = 1 << 18;
    let n = n_elems * 2;
    let sets: Vec<[AlignedBuf; 3]> = (0..2).map(|_| trio(n_elems, Dtype::BF16)).collect();
    let tasks = 64;
    let mut g = c.benchmark_group("stats_threads_cached");
    g.throughput(Throughput::Bytes((3 * n * tasks) as u64));
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        g.bench_function(format!("BF16/{threads}"), |bch| {
            bch.iter(|| {
                pool.install(|| {
                    (0..tasks)
                        .into_par_iter()
                        .map(|i| {
                            let [b, s, m] = &sets[rayon::current_thread_index().unwrap_or(i) % 2];
                            let mut out = Vec::new();
                            chunk_sums(Dtype::BF16, b.bytes(n), &[s.bytes(n), m.bytes(n)], &mut out);
                            out
                        })
                        .collect::<Vec<_>>()
                })
            });
        });
    }
    g.finish();
}

criterion_group!(benches, stats, blends, stats_threads, stats_threads_cached);
criterion_main!(benches);
