//! LoRA adapters: the factor statistics and the chunked ΔW against ΔW built whole in the test.

use std::path::Path;

use layerswap_fast::budget::{Budget, BLOCK, RESERVE};
use layerswap_fast::dtype::Dtype;
use layerswap_fast::io::Model;
use layerswap_fast::lora::{Adapter, PEFT_PREFIX};
use layerswap_fast::write::BUFFERS_LORA;

use crate::alloc::peak_of;
use crate::common::{llama_specs, values, write_file};

/// A base model (f32) and a PEFT-style adapter folder: q_proj of every layer at rank 4 (fan-in/out
/// as in a Linear), down_proj at rank 2 via rank_pattern, an embedding LoRA (transposed) and
/// lm_head saved whole. Returns (base, adapter folder, A/B values by module).
fn fixture(dir: &Path, dtype: Dtype) -> (Model, Adapter) {
    let specs = llama_specs(2, 16, 40);
    let base: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, (n, s))| {
            (
                n.clone(),
                s.clone(),
                values(s.iter().product::<u64>() as usize, i as u64 + 1, 0.05),
            )
        })
        .collect();
    write_file(&dir.join("base.safetensors"), &base, Dtype::F32);
    let ad = dir.join("adapter");
    std::fs::create_dir(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"use_rslora":true,"rank_pattern":{"down_proj":2},"alpha_pattern":{"embed_tokens":3},
            "target_modules":["q_proj","down_proj","embed_tokens"],"modules_to_save":["lm_head"],"bias":"none","fan_in_fan_out":false}"#,
    )
    .unwrap();
    let mut t = vec![];
    let mut seed = 100;
    let mut push = |name: String, shape: Vec<u64>| {
        seed += 1;
        t.push((
            format!("{PEFT_PREFIX}{name}"),
            shape.clone(),
            values(shape.iter().product::<u64>() as usize, seed, 0.3),
        ));
    };
    for l in 0..2 {
        push(
            format!("model.layers.{l}.self_attn.q_proj.lora_A.weight"),
            vec![4, 16],
        );
        push(
            format!("model.layers.{l}.self_attn.q_proj.lora_B.weight"),
            vec![16, 4],
        );
        push(
            format!("model.layers.{l}.mlp.down_proj.lora_A.weight"),
            vec![2, 40],
        );
        push(
            format!("model.layers.{l}.mlp.down_proj.lora_B.weight"),
            vec![16, 2],
        );
    }
    push("model.embed_tokens.lora_embedding_A".into(), vec![4, 50]);
    push("model.embed_tokens.lora_embedding_B".into(), vec![16, 4]);
    push("lm_head.weight".into(), vec![50, 16]);
    write_file(&ad.join("adapter_model.safetensors"), &t, dtype);
    let base = Model::open(&dir.join("base.safetensors")).unwrap();
    let adapter = Adapter::open(&ad, &base).unwrap();
    (base, adapter)
}

/// ΔW built whole, the way PEFT's get_delta_weight does (B @ A, transposed for embeddings), in f64.
fn explicit_delta(adapter: &Adapter, target: &str) -> Vec<f64> {
    let m = &adapter.modules[target];
    let read = |n: &str| {
        let t = adapter.file.tensor(n).unwrap();
        layerswap_fast::lora::read_f64(&adapter.file, t, 0, t.numel() as usize).unwrap()
    };
    let (a, b) = (read(&m.a), read(&m.b));
    let r = m.rank as usize;
    let (rows, cols) = (m.rows as usize, m.cols as usize);
    let mut out = vec![0f64; rows * cols];
    // BA has shape (b_rows × a_cols).
    let (b_rows, a_cols) = (b.len() / r, a.len() / r);
    for i in 0..b_rows {
        for j in 0..a_cols {
            let v: f64 = (0..r).map(|k| b[i * r + k] * a[k * a_cols + j]).sum::<f64>() * m.scale;
            if m.transposed {
                out[j * cols + i] = v;
            } else {
                out[i * cols + j] = v;
            }
        }
    }
    out
}

#[test]
fn config_maps_modules_ranks_and_scales() {
    let dir = tempfile::tempdir().unwrap();
    let (_, a) = fixture(dir.path(), Dtype::F32);
    let q = &a.modules["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!((q.rank, q.scale, q.transposed), (4, 8.0 / 2.0, false));
    let d = &a.modules["model.layers.1.mlp.down_proj.weight"];
    assert_eq!((d.rank, d.scale), (2, 8.0 / 2f64.sqrt()));
    let e = &a.modules["model.embed_tokens.weight"];
    assert_eq!(
        (e.rank, e.scale, e.transposed, e.rows, e.cols),
        (4, 3.0 / 2.0, true, 50, 16)
    );
    assert_eq!(a.full.keys().collect::<Vec<_>>(), ["lm_head.weight"]);
    assert_eq!(a.modules.len(), 5);
}

#[test]
fn factor_statistics_equal_the_explicit_norm() {
    for dtype in [Dtype::F32, Dtype::BF16] {
        let dir = tempfile::tempdir().unwrap();
        let (base, a) = fixture(dir.path(), dtype);
        for (name, m) in &a.modules {
            let want: f64 = explicit_delta(&a, name).iter().map(|v| v * v).sum();
            let got = a.delta_sum_sq(m).unwrap();
            assert!((got - want).abs() <= 1e-12 * want, "{name}: {got} vs {want}");
        }
        // A tensor saved whole: against the base; untouched tensors: 0.
        let names = ["lm_head.weight", "model.norm.weight"];
        let got = a.diff_sum_sq(&names, &base, 64).unwrap();
        let read = |m: &Model, n: &str| {
            let t = m.tensor(n).unwrap();
            layerswap_fast::lora::read_f64(m, t, 0, t.numel() as usize).unwrap()
        };
        let (x, b) = (
            read(&a.file, &format!("{PEFT_PREFIX}lm_head.weight")),
            read(&base, "lm_head.weight"),
        );
        let want: f64 = x.iter().zip(&b).map(|(x, b)| (x - b) * (x - b)).sum();
        assert!(
            (got[0] - want).abs() <= 1e-12 * want && got[1] == 0.0,
            "{got:?} {want}"
        );
    }
}

#[test]
fn chunked_delta_equals_the_explicit_delta_for_any_range() {
    let dir = tempfile::tempdir().unwrap();
    let (_, a) = fixture(dir.path(), Dtype::BF16);
    for (name, m) in &a.modules {
        let want = explicit_delta(&a, name);
        let n = want.len();
        // Ranges that start and end mid-row, cover one element, whole rows and the whole tensor.
        for (start, len) in [
            (0, n),
            (3, 1),
            (5, 37),
            (m.cols as usize - 1, m.cols as usize + 2),
            (n - 7, 7),
        ] {
            let mut out = vec![0f64; len];
            a.delta_into(m, start as u64, &mut out).unwrap();
            for (k, (g, w)) in out.iter().zip(&want[start..start + len]).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12 * w.abs().max(1e-3),
                    "{name} element {}: {g} vs {w}",
                    start + k
                );
            }
        }
    }
}

#[test]
fn adapters_that_do_not_fit_the_base_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = fixture(dir.path(), Dtype::F32);
    let ad = dir.path().join("adapter");
    // The configured rank disagrees with the factors.
    let cfg = std::fs::read_to_string(ad.join("adapter_config.json")).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        cfg.replace(r#""down_proj":2"#, r#""down_proj":3"#),
    )
    .unwrap();
    let e = Adapter::open(&ad, &base).unwrap_err().to_string();
    assert!(
        e.contains("down_proj") && e.contains("rank 3") && e.contains("adapter_model.safetensors"),
        "{e}"
    );
    std::fs::write(
        ad.join("adapter_config.json"),
        cfg.replace(r#""LORA""#, r#""LOKR""#),
    )
    .unwrap();
    let e = Adapter::open(&ad, &base).unwrap_err().to_string();
    assert!(e.contains("LoKr") && e.contains("adapter_config.json"), "{e}");
    // A factor for a tensor the base does not have.
    std::fs::write(ad.join("adapter_config.json"), &cfg).unwrap();
    let t = vec![
        (
            format!("{PEFT_PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight"),
            vec![4, 16],
            values(64, 1, 0.1),
        ),
        (
            format!("{PEFT_PREFIX}model.layers.7.self_attn.q_proj.lora_B.weight"),
            vec![16, 4],
            values(64, 2, 0.1),
        ),
    ];
    write_file(&ad.join("adapter_model.safetensors"), &t, Dtype::F32);
    let e = Adapter::open(&ad, &base).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.7.self_attn.q_proj.weight") && e.contains("base model"),
        "{e}"
    );
}

#[test]
fn factor_scratch_stays_within_what_the_budget_counts() {
    // What delta_into and delta_sum_sq allocate, measured by the counting allocator, never exceeds
    // the bounds the memory budget adds per worker: for every module (plain, rank_pattern, the
    // transposed embedding), factor dtype, and chunks that start mid-row or span many rows.
    for dtype in [Dtype::BF16, Dtype::F32, Dtype::F64] {
        let dir = tempfile::tempdir().unwrap();
        let (_, a) = fixture(dir.path(), dtype);
        for (name, m) in &a.modules {
            let n = (m.rows * m.cols) as usize;
            for (start, len) in [
                (0, n),
                (3, 1),
                (5, 37),
                (m.cols as usize - 1, m.cols as usize + 2),
                (n - 7, 7),
            ] {
                let mut out = vec![0f64; len];
                let (res, peak) = peak_of(|| a.delta_into(m, start as u64, &mut out));
                res.unwrap();
                let bound = Adapter::scratch_bytes(m, len);
                assert!(
                    peak > 0 && peak <= bound,
                    "{name} {dtype:?} [{start}, +{len}): {peak} > {bound}"
                );
                assert!(Adapter::write_scratch([&a], len) >= bound);
            }
            let (res, peak) = peak_of(|| a.delta_sum_sq(m));
            res.unwrap();
            assert!(
                peak <= Adapter::stats_scratch_bytes(m),
                "{name} {dtype:?}: stats {peak}"
            );
        }
    }
}

#[test]
fn write_budget_counts_factor_scratch_and_stays_within() {
    // An 8B-shaped rank-16 down_proj (4096 × 14336) and q_proj: the accounted peak (reserve, buffers
    // and every worker's factor scratch) stays within each budget, and the scratch is part of it.
    let dir = tempfile::tempdir().unwrap();
    let (_, a) = fixture(dir.path(), Dtype::F32);
    let mut modules = vec![];
    for (rows, cols) in [(4096u64, 14336u64), (4096, 4096), (14336, 4096)] {
        let mut m = a.modules["model.layers.0.self_attn.q_proj.weight"].clone();
        (m.rows, m.cols, m.rank) = (rows, cols, 16);
        modules.push(m);
    }
    let scratch = |chunk: usize| {
        modules
            .iter()
            .map(|m| Adapter::scratch_bytes(m, chunk))
            .max()
            .unwrap()
    };
    for mem in [80u64 << 20, 128 << 20, 256 << 20, 1 << 30] {
        for threads in [1, 2, 8] {
            let b = Budget::plan_with_scratch(mem, threads, BUFFERS_LORA, 8, scratch).unwrap();
            assert_eq!(b.scratch_bytes, scratch(b.chunk_elems));
            assert!(b.scratch_bytes > 14336 * 16 * 16, "{b:?}");
            assert_eq!(
                b.accounted_peak(),
                RESERVE + b.buffer_total() + b.workers as u64 * b.scratch_bytes
            );
            assert!(b.accounted_peak() <= mem, "{mem} {threads} {b:?}");
        }
    }
    // A budget the buffers alone would fit, but not with the scratch: refused, saying why.
    let buffers_only = RESERVE + (BUFFERS_LORA * 8 * BLOCK) as u64;
    assert!(Budget::plan(buffers_only, 1, BUFFERS_LORA, 8).is_ok());
    match Budget::plan_with_scratch(buffers_only, 1, BUFFERS_LORA, 8, scratch) {
        Err(layerswap_fast::Error::Budget { message }) => {
            assert!(message.contains("LoRA factor scratch"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn chunked_delta_is_the_rank_order_sum_bit_for_bit() {
    // ΔW[i, j] = scale · (((0 + P[i,0]·Q[0,j]) + P[i,1]·Q[1,j]) + …), the order the README states and
    // the torch reference of `verify` follows: the blocked kernel must give exactly these bits, for
    // widths that are not multiples of its column block or tile, for Linear and fan_in_fan_out
    // (transposed) layouts, and for chunks that start and end mid-row.
    let (rows, cols, r) = (7u64, 601u64, 5u64);
    for fan_in_fan_out in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let target = "model.layers.0.self_attn.q_proj";
        let (brows, bcols) = if fan_in_fan_out {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let base = vec![(
            format!("{target}.weight"),
            vec![brows, bcols],
            values((rows * cols) as usize, 1, 0.05),
        )];
        write_file(&dir.path().join("base.safetensors"), &base, Dtype::F32);
        let ad = dir.path().join("adapter");
        std::fs::create_dir(&ad).unwrap();
        std::fs::write(
            ad.join("adapter_config.json"),
            format!(r#"{{"peft_type":"LORA","r":{r},"lora_alpha":3,"fan_in_fan_out":{fan_in_fan_out}}}"#),
        )
        .unwrap();
        // lora_A is (r × in), lora_B (out × r).
        // (Conv1D stores (in, out).)
        let (inn, outn) = if fan_in_fan_out {
            (brows, bcols)
        } else {
            (bcols, brows)
        };
        let t = vec![
            (
                format!("{PEFT_PREFIX}{target}.lora_A.weight"),
                vec![r, inn],
                values((r * inn) as usize, 2, 0.7),
            ),
            (
                format!("{PEFT_PREFIX}{target}.lora_B.weight"),
                vec![outn, r],
                values((outn * r) as usize, 3, 0.7),
            ),
        ];
        write_file(&ad.join("adapter_model.safetensors"), &t, Dtype::F32);
        let b = Model::open(&dir.path().join("base.safetensors")).unwrap();
        let a = Adapter::open(&ad, &b).unwrap();
        let m = &a.modules[&format!("{target}.weight")];
        let read = |n: &str| {
            let t = a.file.tensor(n).unwrap();
            layerswap_fast::lora::read_f64(&a.file, t, 0, t.numel() as usize).unwrap()
        };
        let (fa, fb) = (read(&m.a), read(&m.b));
        let (mr, mc, rk) = (m.rows as usize, m.cols as usize, r as usize);
        // P[i,k] and Q[k,j] in the base tensor's orientation.
        let pq = |i: usize, j: usize, k: usize| -> f64 {
            if m.transposed {
                fa[k * mr + i] * fb[j * rk + k]
            } else {
                fb[i * rk + k] * fa[k * mc + j]
            }
        };
        let want: Vec<f64> = (0..mr * mc)
            .map(|e| m.scale * (0..rk).fold(0f64, |acc, k| acc + pq(e / mc, e % mc, k)))
            .collect();
        let n = mr * mc;
        for (start, len) in [
            (0, n),
            (3, 1),
            (5, 300),
            (mc - 1, mc + 2),
            (2 * mc + 17, 2 * mc + 31),
            (n - 7, 7),
        ] {
            let mut out = vec![0f64; len];
            a.delta_into(m, start as u64, &mut out).unwrap();
            for (k, (g, w)) in out.iter().zip(&want[start..start + len]).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "fan_in_fan_out {fan_in_fan_out} element {}: {g} vs {w}",
                    start + k
                );
            }
        }
    }
}
