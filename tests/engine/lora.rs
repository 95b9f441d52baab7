//! LoRA adapters: the factor statistics and the chunked ΔW against ΔW built whole in the test.

use std::path::Path;

use layerswap_fast::dtype::Dtype;
use layerswap_fast::io::Model;
use layerswap_fast::lora::{Adapter, PEFT_PREFIX};

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
