//! The write stage's other output: when both experts are LoRA adapters, the merge as an exact PEFT
//! adapter for B instead of a full model. A module taken from S gets S's factors, one taken from M
//! gets M's, and a blended module gets the rank concatenation `[α·B_S | (1−α)·B_M] · [A_S ; A_M]`,
//! which is α·ΔW_S + (1−α)·ΔW_M exactly (PEFT's `cat` combination). Each module keeps its own rank
//! and scale through `rank_pattern` / `alpha_pattern` in the configuration the caller writes.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::analyze::plan::{Decision, Plan};
use crate::dtype::{encode_f64, Dtype};
use crate::error::{Error, Result};
use crate::io::header::encode_header;
use crate::io::Model;
use crate::lora::{read_f64, Adapter, LoraModule, PEFT_PREFIX, WEIGHTS_FILE};
use crate::open::Session;
use crate::progress::{Phase, Progress};

/// Bytes copied at a time for tensors saved whole.
const COPY_BYTES: usize = 8 << 20;

/// One module of the emitted adapter.
#[derive(Debug, Clone, Serialize)]
pub struct EmittedModule {
    /// Module name in the base model (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// "safety", "expert" or "blend".
    pub source: &'static str,
    /// Its rank.
    pub rank: u64,
    /// Its alpha (scale = alpha / rank: the emitted configuration does not use rsLoRA).
    pub alpha: f64,
}

/// What emitting an adapter did, and what its `adapter_config.json` must say.
#[derive(Debug, Clone, Serialize)]
pub struct EmitSummary {
    /// Files written, inside the output folder.
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    /// Seconds spent.
    pub seconds: f64,
    /// Every LoRA module, in name order.
    pub modules: Vec<EmittedModule>,
    /// Modules saved whole (PEFT `modules_to_save`).
    pub modules_to_save: Vec<String>,
    /// Both adapters store Conv1D-style (in, out) weights.
    pub fan_in_fan_out: bool,
}

/// One tensor of the output file and how to make it.
enum Piece<'a> {
    /// Bytes of one adapter tensor.
    Copy(&'a Model, &'a crate::io::TensorRef),
    /// lora_A rows stacked: [A_S ; A_M] (or one of them).
    StackA(Vec<(&'a Adapter, &'a LoraModule)>),
    /// lora_B columns side by side, each scaled: [c_S·B_S | c_M·B_M] (or one of them).
    JoinB(Vec<(&'a Adapter, &'a LoraModule, f64)>),
}

fn factor_names(m: &LoraModule) -> (String, String) {
    if m.a.ends_with(".lora_embedding_A") {
        (
            format!("{PEFT_PREFIX}{}.lora_embedding_A", m.module),
            format!("{PEFT_PREFIX}{}.lora_embedding_B", m.module),
        )
    } else {
        (
            format!("{PEFT_PREFIX}{}.lora_A.weight", m.module),
            format!("{PEFT_PREFIX}{}.lora_B.weight", m.module),
        )
    }
}

fn widest(ds: &[Dtype]) -> Dtype {
    if ds.iter().all(|d| *d == ds[0]) {
        ds[0]
    } else if ds.contains(&Dtype::F64) {
        Dtype::F64
    } else {
        Dtype::F32
    }
}

/// The module a tensor saved whole belongs to, if the adapter lists it in `modules_to_save`.
fn saved_module(adapter: &Adapter, tensor: &str) -> Option<String> {
    let module = tensor.rsplit_once('.').map_or(tensor, |(m, _)| m);
    adapter
        .config
        .modules_to_save
        .iter()
        .any(|k| module == k || module.ends_with(&format!(".{k}")))
        .then(|| module.to_string())
}

impl Session {
    /// Refuses, before any work, an adapter output for language expert `expert` unless the safety
    /// expert and it are both LoRA adapters.
    pub fn check_adapters(&self, expert: usize) -> Result<()> {
        let Some(host) = self.experts.get(expert) else {
            return Err(Error::argument(format!(
                "no language expert {expert} in a session of {}",
                self.experts.len()
            )));
        };
        match [&self.safety, host].into_iter().find(|e| e.adapter().is_none()) {
            Some(full) => Err(Error::argument(format!(
                "--emit adapter needs two LoRA adapter experts, but {} is a full model; write a full model instead",
                full.path().display()
            ))),
            None => Ok(()),
        }
    }

    /// Writes language expert `expert`'s merge, as `plan` decides it, as a PEFT adapter file
    /// (`adapter_model.safetensors`) into the existing, empty folder `out_dir`; the summary says what
    /// the adapter configuration must hold. Both experts must be LoRA adapters. A tensor the decisions
    /// make a blend of something an adapter saved whole cannot be expressed: an error naming it.
    pub fn emit_adapter(
        &self,
        expert: usize,
        plan: &Plan,
        out_dir: &Path,
        progress: &Progress,
    ) -> Result<EmitSummary> {
        plan.options.validate()?;
        self.check_adapters(expert)?;
        let host = &self.experts[expert];
        let (Some(sa), Some(ma)) = (self.safety.adapter(), host.adapter()) else {
            unreachable!("check_adapters found both adapters");
        };
        if sa.config.fan_in_fan_out != ma.config.fan_in_fan_out {
            return Err(Error::argument(
                "the two adapters disagree on fan_in_fan_out; one adapter cannot hold both",
            ));
        }
        self.check_vocab(expert, &plan.options)?;
        let started = Instant::now();
        let mut pieces: Vec<(String, Dtype, Vec<u64>, Piece)> = vec![];
        let mut modules = vec![];
        let mut to_save = vec![];
        for name in host.tensors().keys() {
            let place = self.layout.place(name);
            let (decision, alpha) = if self.safety.tensor(name).is_none() {
                (Decision::Expert, 0.0)
            } else {
                plan.decision_at(place)
            };
            let (ws, wm) = match decision {
                Decision::Safety => (1.0, 0.0),
                Decision::Expert => (0.0, 1.0),
                Decision::Blend => (alpha, 1.0 - alpha),
            };
            let full_s = sa.full.get(name).filter(|_| ws != 0.0);
            let full_m = ma.full.get(name).filter(|_| wm != 0.0);
            if decision == Decision::Blend && (full_s.is_some() || full_m.is_some()) && ws != 0.0 && wm != 0.0
            {
                let who = if full_s.is_some() {
                    "safety expert's"
                } else {
                    "language expert's"
                };
                return Err(Error::argument(format!(
                    "tensor '{name}' would be a blend of a tensor the {who} adapter saved whole (modules_to_save), which an adapter \
                     cannot express; pass --outside expert or --outside safety, or write a full model (no --emit adapter)"
                )));
            }
            for (a, saved) in [(sa, full_s), (ma, full_m)] {
                if let Some(saved) = saved {
                    let Some(module) = saved_module(a, name) else {
                        return Err(Error::argument(format!(
                            "tensor '{name}' of {} is a trained bias (bias = {:?}), which the emitted adapter cannot hold; write a full model",
                            a.path.display(),
                            a.config.bias
                        )));
                    };
                    let t = a.file.tensor(saved).expect("listed");
                    pieces.push((
                        format!("{PEFT_PREFIX}{name}"),
                        t.dtype,
                        t.shape.clone(),
                        Piece::Copy(&a.file, t),
                    ));
                    to_save.push(module);
                }
            }
            let parts: Vec<(&Adapter, &LoraModule, f64)> = [(sa, ws), (ma, wm)]
                .into_iter()
                .filter(|(_, w)| *w != 0.0)
                .filter_map(|(a, w)| a.modules.get(name).map(|m| (a, m, w)))
                .collect();
            if parts.is_empty() {
                continue;
            }
            let rank: u64 = parts.iter().map(|(_, m, _)| m.rank).sum();
            let one = parts.len() == 1 && parts[0].2 == 1.0;
            // One adapter's module unchanged: its own alpha (rsLoRA turned into the plain scale). Else
            // the output keeps a shared scale when the parts have one, and folds them into B if not.
            let same_scale = parts.iter().all(|p| p.1.scale == parts[0].1.scale);
            let scale_out = if same_scale { parts[0].1.scale } else { 1.0 };
            let alpha_out = if one && !parts[0].0.config.use_rslora {
                parts[0].1.alpha
            } else {
                scale_out * rank as f64
            };
            let m0 = parts[0].1;
            let (a_name, b_name) = factor_names(m0);
            let ta: Vec<Dtype> = parts
                .iter()
                .map(|(a, m, _)| a.file.tensor(&m.a).unwrap().dtype)
                .collect();
            let tb: Vec<Dtype> = parts
                .iter()
                .map(|(a, m, _)| a.file.tensor(&m.b).unwrap().dtype)
                .collect();
            let a_shape = a_of(parts[0].0, m0).shape.clone();
            let b_shape = a_of_b(parts[0].0, m0).shape.clone();
            pieces.push((
                a_name,
                widest(&ta),
                vec![rank, a_shape[1]],
                Piece::StackA(parts.iter().map(|(a, m, _)| (*a, *m)).collect()),
            ));
            pieces.push((
                b_name,
                widest(&tb),
                vec![b_shape[0], rank],
                Piece::JoinB(
                    parts
                        .iter()
                        .map(|(a, m, w)| (*a, *m, if one { 1.0 } else { w * m.scale / scale_out }))
                        .collect(),
                ),
            ));
            let source = match decision {
                Decision::Blend => "blend",
                Decision::Safety => "safety",
                Decision::Expert => "expert",
            };
            modules.push(EmittedModule {
                module: m0.module.clone(),
                source,
                rank,
                alpha: alpha_out,
            });
        }
        if pieces.is_empty() {
            return Err(Error::argument(
                "the merge leaves every tensor as the base model has it, so there is no adapter to emit (the base model itself is the result)",
            ));
        }
        to_save.sort();
        to_save.dedup();
        // Header first (sizes are known), then every tensor at its offset.
        let mut entries = vec![];
        let mut pos = 0u64;
        for (name, dtype, shape, _) in &pieces {
            let n = shape.iter().product::<u64>() * dtype.size() as u64;
            entries.push((name.clone(), *dtype, shape.clone(), pos, pos + n));
            pos += n;
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        let header = encode_header(&entries, &metadata);
        let path = out_dir.join(WEIGHTS_FILE);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.write_all_at(&header, 0).map_err(|e| Error::io(&path, e))?;
        progress.start(Phase::Write, pos);
        let base_off = header.len() as u64;
        for ((_, dtype, shape, piece), (_, _, _, start, _)) in pieces.iter().zip(&entries) {
            progress.check()?;
            let at = base_off + start;
            match piece {
                Piece::Copy(model, t) => {
                    let mut done = 0u64;
                    while done < t.nbytes {
                        progress.check()?;
                        let n = (t.nbytes - done).min(COPY_BYTES as u64) as usize;
                        let mut buf = vec![0u8; n];
                        model.shard_of(t).read_at(t.offset + done, &mut buf)?;
                        file.write_all_at(&buf, at + done)
                            .map_err(|e| Error::io(&path, e))?;
                        done += n as u64;
                    }
                }
                Piece::StackA(parts) => {
                    let mut off = at;
                    for (a, m) in parts {
                        let t = a_of(a, m);
                        let v = read_f64(&a.file, t, 0, t.numel() as usize)?;
                        off += write_values(&file, &path, off, &v, *dtype)?;
                    }
                }
                Piece::JoinB(parts) => {
                    let (rows, rank) = (shape[0] as usize, shape[1] as usize);
                    let mut out = vec![0f64; rows * rank];
                    let mut col = 0;
                    for (a, m, c) in parts {
                        let t = a_of_b(a, m);
                        let r = m.rank as usize;
                        let v = read_f64(&a.file, t, 0, t.numel() as usize)?;
                        for i in 0..rows {
                            for k in 0..r {
                                out[i * rank + col + k] =
                                    if *c == 1.0 { v[i * r + k] } else { c * v[i * r + k] };
                            }
                        }
                        col += r;
                    }
                    write_values(&file, &path, at, &out, *dtype)?;
                }
            }
            progress.advance(shape.iter().product::<u64>() * dtype.size() as u64);
        }
        progress.start(Phase::Sync, 0);
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        self.base.check_unchanged()?;
        for m in [&self.safety, host] {
            m.check_unchanged()?;
        }
        Ok(EmitSummary {
            files: vec![path],
            tensors: pieces.len(),
            bytes_written: pos,
            seconds: started.elapsed().as_secs_f64(),
            modules,
            modules_to_save: to_save,
            fan_in_fan_out: sa.config.fan_in_fan_out,
        })
    }
}

fn a_of<'a>(a: &'a Adapter, m: &LoraModule) -> &'a crate::io::TensorRef {
    a.file.tensor(&m.a).expect("module factor")
}

fn a_of_b<'a>(a: &'a Adapter, m: &LoraModule) -> &'a crate::io::TensorRef {
    a.file.tensor(&m.b).expect("module factor")
}

/// Encodes f64 values to `dtype` (rounding once) and writes them at `at`; returns the bytes written.
fn write_values(file: &File, path: &Path, at: u64, v: &[f64], dtype: Dtype) -> Result<u64> {
    let mut bytes = crate::dtype::AlignedBuf::new(v.len() * dtype.size());
    let out = bytes.bytes_mut(v.len() * dtype.size());
    encode_f64(v, dtype, out);
    file.write_all_at(out, at).map_err(|e| Error::io(path, e))?;
    Ok(out.len() as u64)
}
