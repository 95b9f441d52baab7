use layerswap_fast::analyze::sums::{compute, kernels};
use layerswap_fast::budget::{Budget, BufferPool};
use layerswap_fast::dtype::{AlignedBuf, Dtype};
use layerswap_fast::io::Model;
use layerswap_fast::progress::Progress;
use layerswap_fast::Numerics;

use crate::common::{values, write_file};

#[test]
fn kernels_match_naive_sums_for_odd_lengths() {
    for n in [0usize, 1, 7, 8, 9, 1000, 4099] {
        let b = values(n, 1, 1.0);
        let x = values(n, 2, 1.0);
        for dtype in [Dtype::F32, Dtype::F64] {
            let aligned = |v: Vec<u8>| {
                let mut buf = AlignedBuf::new(v.len());
                buf.bytes_mut(v.len()).copy_from_slice(&v);
                (buf, v.len())
            };
            let (bb, lb) = aligned(crate::common::encode(&b, dtype));
            let (xb, lx) = aligned(crate::common::encode(&x, dtype));
            let (bb, xb) = (bb.bytes(lb), xb.bytes(lx));
            let naive_b: f64 = b.iter().map(|v| f64::from(*v).powi(2)).sum();
            let naive_d: f64 = b
                .iter()
                .zip(&x)
                .map(|(b, x)| (f64::from(*x) - f64::from(*b)).powi(2))
                .sum();
            assert!(
                (kernels::sum_sq(dtype, Numerics::Exact, bb) - naive_b).abs() <= 1e-12 * naive_b.max(1.0)
            );
            assert!(
                (kernels::sum_sq_diff(dtype, Numerics::Exact, bb, xb) - naive_d).abs()
                    <= 1e-12 * naive_d.max(1.0)
            );
        }
    }
}

#[test]
fn statistics_are_independent_of_chunk_size_and_threads() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3 * 65_536 + 123;
    let t = |seed| vec![("w".to_string(), vec![n as u64], values(n, seed, 0.1))];
    let paths: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("{i}.safetensors")))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        write_file(p, &t(i as u64 + 1), Dtype::BF16);
    }
    let models: Vec<Model> = paths.iter().map(|p| Model::open(p).unwrap()).collect();
    let mut results = vec![];
    for (mem, threads) in [(1u64 << 30, 1usize), (66 << 20, 2), (80 << 20, 3)] {
        let budget = Budget::plan(mem, threads, 3, 2).unwrap();
        let pool = BufferPool::new(&budget);
        let rayon = rayon::ThreadPoolBuilder::new()
            .num_threads(budget.workers)
            .build()
            .unwrap();
        let stats = rayon
            .install(|| {
                compute(
                    &["w"],
                    &models[0],
                    &[&models[1], &models[2]],
                    Numerics::Exact,
                    budget.chunk_elems,
                    &pool,
                    &Progress::default(),
                )
            })
            .unwrap();
        results.push((budget.chunk_elems, stats));
    }
    assert!(results[0].0 != results[1].0, "test needs different chunk sizes");
    assert_eq!(results[0].1, results[1].1);
    assert_eq!(results[0].1, results[2].1);
}

#[test]
fn block_sums_for_any_number_of_experts_equal_the_separate_kernels_bit_for_bit() {
    // A bulk run's statistics must be exactly those of a run with one expert, so that its outputs are
    // byte-identical to single runs.
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        for n in [1usize, 9, 1000, 65_536 + 13] {
            let aligned = |seed: u64| {
                let v = crate::common::encode(&values(n, seed, 1.0), dtype);
                let mut buf = AlignedBuf::new(v.len());
                buf.bytes_mut(v.len()).copy_from_slice(&v);
                buf
            };
            let len = n * dtype.size();
            let b = aligned(1);
            let xs: Vec<AlignedBuf> = (2..8).map(aligned).collect();
            for k in 1..=xs.len() {
                let refs: Vec<&[u8]> = xs[..k].iter().map(|x| x.bytes(len)).collect();
                let mut out = vec![0f64; k + 1];
                kernels::block_sums(dtype, Numerics::Exact, b.bytes(len), &refs, &mut out);
                assert_eq!(
                    out[0].to_bits(),
                    kernels::sum_sq(dtype, Numerics::Exact, b.bytes(len)).to_bits()
                );
                for (i, x) in refs.iter().enumerate() {
                    let want = kernels::sum_sq_diff(dtype, Numerics::Exact, b.bytes(len), x);
                    assert_eq!(
                        out[i + 1].to_bits(),
                        want.to_bits(),
                        "{dtype} n={n} k={k} expert {i}"
                    );
                }
            }
        }
    }
}
