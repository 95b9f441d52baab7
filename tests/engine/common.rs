//! Helpers: write small safetensors files and models from f32 values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use layerswap_fast::dtype::{f32_to_bf16, Dtype};
use layerswap_fast::io::header::encode_header;

/// Encodes f32 values as `dtype` bytes.
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| f32_to_bf16(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F64 => values.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect(),
        Dtype::Opaque(_) => values
            .iter()
            .flat_map(|v| (*v as i64).to_le_bytes()[..dtype.size()].to_vec())
            .collect(),
    }
}

/// Writes a safetensors file of the given tensors (name, shape, values) in `dtype`.
pub fn write_file(path: &Path, tensors: &[(String, Vec<u64>, Vec<f32>)], dtype: Dtype) {
    let mut entries = vec![];
    let mut data = vec![];
    for (name, shape, values) in tensors {
        let bytes = encode(values, dtype);
        entries.push((
            name.clone(),
            dtype,
            shape.clone(),
            data.len() as u64,
            (data.len() + bytes.len()) as u64,
        ));
        data.extend(bytes);
    }
    let mut out = encode_header(&entries, &BTreeMap::new());
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Deterministic pseudo-random values (xorshift), roughly uniform in [-scale, scale].
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Llama tensor names and shapes for a toy model.
pub fn llama_specs(layers: usize, hidden: u64, inter: u64) -> Vec<(String, Vec<u64>)> {
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![50, hidden])];
    for i in 0..layers {
        let p = format!("model.layers.{i}.");
        out.push((p.clone() + "input_layernorm.weight", vec![hidden]));
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push((format!("{p}self_attn.{proj}.weight"), vec![hidden, hidden]));
        }
        out.push((p.clone() + "post_attention_layernorm.weight", vec![hidden]));
        out.push((p.clone() + "mlp.gate_proj.weight", vec![inter, hidden]));
        out.push((p.clone() + "mlp.up_proj.weight", vec![inter, hidden]));
        out.push((p.clone() + "mlp.down_proj.weight", vec![hidden, inter]));
    }
    out.push(("model.norm.weight".to_string(), vec![hidden]));
    out.push(("lm_head.weight".to_string(), vec![50, hidden]));
    out
}

/// Writes base/safety/expert single-file models; the safety delta is `s_scale[layer]`, the expert's
/// `m_scale[layer]`. Returns the three paths.
pub fn write_trio(dir: &Path, layers: usize, dtype: Dtype, s_scale: &[f32], m_scale: &[f32]) -> [PathBuf; 3] {
    let specs = llama_specs(layers, 16, 40);
    let mut sets: [Vec<(String, Vec<u64>, Vec<f32>)>; 3] = [vec![], vec![], vec![]];
    for (i, (name, shape)) in specs.iter().enumerate() {
        let n = shape.iter().product::<u64>() as usize;
        let base = values(n, i as u64 + 1, 0.05);
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        let (ss, ms) = match layer {
            Some(l) => (s_scale[l], m_scale[l]),
            None => (0.01, 0.01),
        };
        let ds = values(n, 1000 + i as u64, 0.05 * ss);
        let dm = values(n, 2000 + i as u64, 0.05 * ms);
        sets[0].push((name.clone(), shape.clone(), base.clone()));
        sets[1].push((
            name.clone(),
            shape.clone(),
            base.iter().zip(&ds).map(|(b, d)| b + d).collect(),
        ));
        sets[2].push((
            name.clone(),
            shape.clone(),
            base.iter().zip(&dm).map(|(b, d)| b + d).collect(),
        ));
    }
    let paths = ["base", "safety", "expert"].map(|r| dir.join(format!("{r}.safetensors")));
    for (p, set) in paths.iter().zip(&sets) {
        write_file(p, set, dtype);
    }
    paths
}
