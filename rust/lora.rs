//! PEFT LoRA adapters as experts: the adapter's configuration, its factor tensors mapped onto the base
//! model's tensors, the statistics of each update ΔW = scale · B · A computed from the factors alone,
//! and the values B_t + ΔW produced chunk by chunk for the write pass.
//!
//! ΔW is never built whole. Its squared Frobenius norm is `scale² · Σ((BᵀB) ∘ (AAᵀ))` with two r×r
//! Gram matrices in float64; the write pass forms the rows of ΔW it needs, chunk by chunk, in float64.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::io::{Model, TensorRef};

/// The adapter configuration file of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter weights file of a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix PEFT gives every saved tensor name (`PeftModel` -> `LoraModel` -> the base model).
pub const PEFT_PREFIX: &str = "base_model.model.";
/// Largest adapter_config.json read (real ones are a few kilobytes).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// True when `path` is a PEFT adapter folder (it has an `adapter_config.json`).
pub fn is_adapter(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).is_file()
}

/// What `bias` in the configuration says PEFT trained besides the factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasMode {
    /// No bias trained.
    None,
    /// Every bias of the model trained (saved as full tensors).
    All,
    /// The biases of the targeted modules trained (saved as full tensors).
    LoraOnly,
}

/// The fields of `adapter_config.json` that decide what the adapter's tensors mean.
#[derive(Debug, Clone, Serialize)]
pub struct LoraConfig {
    /// Default rank.
    pub r: u64,
    /// Default alpha.
    pub lora_alpha: f64,
    /// rsLoRA: scale = alpha / √r instead of alpha / r.
    pub use_rslora: bool,
    /// Per-module ranks: (pattern, rank), in file order (the first matching pattern wins, as in PEFT).
    pub rank_pattern: Vec<(String, u64)>,
    /// Per-module alphas: (pattern, alpha), in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    /// `target_modules` as written (a list of names or one regex), for the report.
    pub target_modules: serde_json::Value,
    /// Weights stored (in, out) (GPT-2 `Conv1D`): ΔW = scale · (B · A)ᵀ.
    pub fan_in_fan_out: bool,
    /// Trained biases.
    pub bias: BiasMode,
    /// Modules saved whole (full replacements).
    pub modules_to_save: Vec<String>,
    /// Compiled `rank_pattern` and `alpha_pattern` keys, in the same order.
    #[serde(skip)]
    rank_re: Vec<regex::Regex>,
    #[serde(skip)]
    alpha_re: Vec<regex::Regex>,
}

/// PEFT method names (`peft_type`) other than LORA, for the error message.
fn peft_method_name(t: &str) -> String {
    match t {
        "LOHA" => "LoHa".into(),
        "LOKR" => "LoKr".into(),
        "IA3" => "IA³".into(),
        "ADALORA" => "AdaLoRA".into(),
        "VERA" => "VeRA".into(),
        other => other.to_string(),
    }
}

/// PEFT's pattern rule (`get_pattern_key`): key `k` matches module `name` when the whole of `name`
/// matches `(.*\.)?(k)`.
fn pattern_regex(path: &Path, field: &str, key: &str) -> Result<regex::Regex> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
        Error::invalid(
            path,
            format!("{field} key '{key}' is not a valid regular expression: {e}"),
        )
    })
}

impl LoraConfig {
    /// Parses and checks `adapter_config.json` text; `path` names the file in errors. Any PEFT type
    /// or LoRA variant whose update is not `scale · B · A` is an error naming it.
    pub fn parse(path: &Path, text: &str) -> Result<LoraConfig> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid(path, format!("adapter config is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::invalid(path, "adapter config must be a JSON object"))?;
        let unsupported = |what: &str| {
            Error::invalid(path, format!("{what} adapters are not supported: only plain LoRA (peft_type LORA, update scale·B·A) can be scored and merged"))
        };
        match obj.get("peft_type").and_then(|t| t.as_str()) {
            Some("LORA") => {}
            Some(other) => return Err(unsupported(&peft_method_name(other))),
            None => {
                return Err(Error::invalid(
                    path,
                    "adapter config has no 'peft_type': not a PEFT adapter",
                ))
            }
        }
        let truthy = |k: &str| obj.get(k).is_some_and(|x| x.as_bool() == Some(true));
        let present = |k: &str| {
            obj.get(k).is_some_and(|x| {
                !(x.is_null()
                    || x.as_array().is_some_and(std::vec::Vec::is_empty)
                    || x.as_object().is_some_and(serde_json::Map::is_empty))
            })
        };
        if truthy("use_dora") {
            return Err(unsupported("DoRA (use_dora)"));
        }
        if truthy("lora_bias") {
            return Err(unsupported("LoRA with a trained lora_B bias (lora_bias)"));
        }
        if truthy("use_qalora") {
            return Err(unsupported("QALoRA (use_qalora)"));
        }
        for (key, what) in [
            ("layer_replication", "LoRA with layer_replication"),
            (
                "alora_invocation_tokens",
                "Activated LoRA (alora_invocation_tokens)",
            ),
            ("target_parameters", "LoRA on parameters (target_parameters)"),
            ("trainable_token_indices", "LoRA with trainable_token_indices"),
        ] {
            if present(key) {
                return Err(unsupported(what));
            }
        }
        let r = match obj.get("r").and_then(serde_json::Value::as_u64) {
            Some(r) if r > 0 => r,
            _ => {
                return Err(Error::invalid(
                    path,
                    "adapter config needs 'r', a positive integer rank",
                ))
            }
        };
        let lora_alpha = match obj.get("lora_alpha") {
            None | Some(serde_json::Value::Null) => 8.0, // PEFT's default
            Some(x) => x
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| Error::invalid(path, "'lora_alpha' must be a number"))?,
        };
        let use_rslora = truthy("use_rslora");
        let fan_in_fan_out = truthy("fan_in_fan_out");
        let bias = match obj.get("bias").and_then(|b| b.as_str()).unwrap_or("none") {
            "none" => BiasMode::None,
            "all" => BiasMode::All,
            "lora_only" => BiasMode::LoraOnly,
            other => {
                return Err(Error::invalid(
                    path,
                    format!("'bias' is '{other}'; PEFT allows none, all or lora_only"),
                ))
            }
        };
        let map = |key: &str| -> Result<Vec<(String, f64)>> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(vec![]),
                Some(serde_json::Value::Object(m)) => m
                    .iter()
                    .map(|(k, x)| {
                        x.as_f64()
                            .filter(|v| v.is_finite())
                            .map(|v| (k.clone(), v))
                            .ok_or_else(|| {
                                Error::invalid(path, format!("'{key}' entry '{k}' must be a number"))
                            })
                    })
                    .collect(),
                Some(_) => Err(Error::invalid(
                    path,
                    format!("'{key}' must be an object of module pattern -> number"),
                )),
            }
        };
        let mut rank_pattern = vec![];
        for (k, x) in map("rank_pattern")? {
            if x < 1.0 || x.fract() != 0.0 {
                return Err(Error::invalid(
                    path,
                    format!("'rank_pattern' entry '{k}' must be a positive integer, got {x}"),
                ));
            }
            rank_pattern.push((k, x as u64));
        }
        let alpha_pattern = map("alpha_pattern")?;
        let modules_to_save = match obj.get("modules_to_save") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        Error::invalid(path, "'modules_to_save' must be a list of module names")
                    })
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(Error::invalid(
                    path,
                    "'modules_to_save' must be a list of module names",
                ))
            }
        };
        let rank_re = rank_pattern
            .iter()
            .map(|(k, _)| pattern_regex(path, "rank_pattern", k))
            .collect::<Result<_>>()?;
        let alpha_re = alpha_pattern
            .iter()
            .map(|(k, _)| pattern_regex(path, "alpha_pattern", k))
            .collect::<Result<_>>()?;
        Ok(LoraConfig {
            r,
            lora_alpha,
            use_rslora,
            rank_pattern,
            alpha_pattern,
            target_modules: obj
                .get("target_modules")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            fan_in_fan_out,
            bias,
            modules_to_save,
            rank_re,
            alpha_re,
        })
    }

    /// Rank, alpha and scale of module `module` (its name in the base model, e.g.
    /// `model.layers.0.self_attn.q_proj`), as PEFT sets them.
    pub fn module_scale(&self, module: &str) -> (u64, f64, f64) {
        let r = self
            .rank_re
            .iter()
            .zip(&self.rank_pattern)
            .find(|(re, _)| re.is_match(module))
            .map_or(self.r, |(_, (_, r))| *r);
        let alpha = self
            .alpha_re
            .iter()
            .zip(&self.alpha_pattern)
            .find(|(re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |(_, (_, a))| *a);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, alpha, scale)
    }
}

/// One base tensor updated by a low-rank product: ΔW = scale · P · Q with P (rows × r) and Q (r × cols)
/// in the orientation of the base tensor. For a plain linear layer P = lora_B and Q = lora_A; for
/// `fan_in_fan_out` layers and embeddings (whose update PEFT transposes) P = lora_Aᵀ and Q = lora_Bᵀ.
#[derive(Debug, Clone, Serialize)]
pub struct LoraModule {
    /// The base tensor it updates.
    pub target: String,
    /// The module name (`target` without `.weight`), which rank_pattern / alpha_pattern match.
    pub module: String,
    /// Name of the lora_A tensor in the adapter file.
    pub a: String,
    /// Name of the lora_B tensor in the adapter file.
    pub b: String,
    /// Rank.
    pub rank: u64,
    /// Alpha.
    pub alpha: f64,
    /// scale = alpha / r (or alpha / √r with rsLoRA).
    pub scale: f64,
    /// P = lora_Aᵀ, Q = lora_Bᵀ (embeddings, `fan_in_fan_out`).
    pub transposed: bool,
    /// Rows of the base tensor.
    pub rows: u64,
    /// Columns of the base tensor.
    pub cols: u64,
}

/// An opened PEFT LoRA adapter, checked against the base model it was trained on.
#[derive(Debug)]
pub struct Adapter {
    /// The adapter folder.
    pub path: PathBuf,
    /// Its configuration.
    pub config: LoraConfig,
    /// `adapter_model.safetensors`, opened like a model (names as PEFT saved them).
    pub file: Model,
    /// Low-rank updates by base tensor name.
    pub modules: BTreeMap<String, LoraModule>,
    /// Tensors saved whole (`modules_to_save`, trained biases): base tensor name -> name in the file.
    pub full: BTreeMap<String, String>,
}

/// Which factor a saved tensor name holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
    EmbA,
    EmbB,
}

/// Splits a saved name (prefix already removed) into (module, factor), or None for a full tensor.
fn split_factor(name: &str) -> Option<(&str, Factor)> {
    for (suffix, f) in [
        (".lora_A.weight", Factor::A),
        (".lora_B.weight", Factor::B),
        (".lora_embedding_A", Factor::EmbA),
        (".lora_embedding_B", Factor::EmbB),
    ] {
        if let Some(m) = name.strip_suffix(suffix) {
            return Some((m, f));
        }
    }
    None
}

impl Adapter {
    /// Opens the adapter folder `path` and maps its tensors onto `base`: every factor pair must update
    /// an existing 2-D float tensor of the base with matching shapes and the rank the configuration
    /// gives that module; every other saved tensor must replace a base tensor of the same shape (or,
    /// outside a known tensor, add one: an untied `lm_head` in `modules_to_save`).
    pub fn open(path: &Path, base: &Model) -> Result<Adapter> {
        let config_path = path.join(CONFIG_FILE);
        let len = std::fs::metadata(&config_path)
            .map_err(|e| Error::io(&config_path, e))?
            .len();
        if len > MAX_CONFIG_BYTES {
            return Err(Error::invalid(
                &config_path,
                format!("{len} bytes is not an adapter config (limit {MAX_CONFIG_BYTES})"),
            ));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = LoraConfig::parse(&config_path, &text)?;
        let weights = path.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::invalid(path, format!("adapter folder has {CONFIG_FILE} but no {WEIGHTS_FILE} (adapter_model.bin is not read: convert it to safetensors)")));
        }
        let file = Model::open(&weights)?;
        let wpath = weights.as_path();
        let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        let mut embedding: BTreeMap<String, bool> = BTreeMap::new();
        let mut full = BTreeMap::new();
        for (saved, t) in &file.tensors {
            let name = saved.strip_prefix(PEFT_PREFIX).unwrap_or(saved);
            if name.ends_with(".lora_magnitude_vector") || name.contains(".lora_magnitude_vector.") {
                return Err(Error::invalid(
                    wpath,
                    format!("tensor '{saved}' is a DoRA magnitude vector: DoRA adapters are not supported"),
                ));
            }
            if !t.dtype.is_float() {
                return Err(Error::invalid(
                    wpath,
                    format!(
                        "tensor '{saved}' is {}; adapter tensors must be BF16, F16, F32 or F64",
                        t.dtype
                    ),
                ));
            }
            if let Some((module, f)) = split_factor(name) {
                let slot = pairs.entry(module.to_string()).or_default();
                slot[usize::from(matches!(f, Factor::B | Factor::EmbB))] = Some(saved.clone());
                embedding.insert(module.to_string(), matches!(f, Factor::EmbA | Factor::EmbB));
            } else {
                if name.contains(".lora_") {
                    return Err(Error::invalid(
                        wpath,
                        format!("tensor '{saved}' is a LoRA tensor of a kind this tool does not know"),
                    ));
                }
                // A layer PEFT wrapped keeps its own weights under `base_layer`.
                let name = name.replace(".base_layer.", ".");
                let name = name.as_str();
                match base.tensor(name) {
                    Some(bt) if bt.shape != t.shape => {
                        return Err(Error::Incompatible {
                            message: format!(
                                "tensor '{saved}' of the adapter {} has shape {:?} but '{name}' of the base model ({}) has {:?}",
                                wpath.display(),
                                t.shape,
                                base.path.display(),
                                bt.shape
                            ),
                        })
                    }
                    _ => {}
                }
                full.insert(name.to_string(), saved.clone());
            }
        }
        let mut modules = BTreeMap::new();
        for (module, [a, b]) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::invalid(
                    wpath,
                    format!("module '{module}' has only one of its two LoRA factors (lora_A, lora_B)"),
                ));
            };
            let target = format!("{module}.weight");
            let Some(bt) = base.tensor(&target) else {
                return Err(Error::Incompatible {
                    message: format!("tensor '{a}' of the adapter {} updates '{target}', which the base model ({}) does not have", wpath.display(), base.path.display()),
                });
            };
            let (ta, tb) = (file.tensor(&a).unwrap(), file.tensor(&b).unwrap());
            if bt.shape.len() != 2 || !bt.dtype.is_float() {
                return Err(Error::Incompatible {
                    message: format!("tensor '{target}' of the base model ({}) is {:?} {}; a LoRA update needs a 2-D float tensor", base.path.display(), bt.shape, bt.dtype),
                });
            }
            let (rows, cols) = (bt.shape[0], bt.shape[1]);
            let transposed = embedding[&module] || config.fan_in_fan_out;
            let (rank, alpha, scale) = config.module_scale(&module);
            // lora_A is (r × in) and lora_B is (out × r); the base stores (out × in), or (in × out)
            // when transposed.
            let (a_want, b_want) = if transposed {
                ([rank, rows], [cols, rank])
            } else {
                ([rank, cols], [rows, rank])
            };
            if ta.shape != a_want || tb.shape != b_want {
                return Err(Error::Incompatible {
                    message: format!(
                        "module '{module}' of the adapter {}: lora_A {:?} and lora_B {:?} do not fit the base tensor '{target}' {:?} at rank {rank} \
                         (expected {:?} and {:?}; the rank comes from r / rank_pattern in {CONFIG_FILE})",
                        wpath.display(),
                        ta.shape,
                        tb.shape,
                        bt.shape,
                        a_want,
                        b_want
                    ),
                });
            }
            if let Some(other) = full.get(&target) {
                // PEFT saves a targeted embedding layer whole too (save_embedding_layers): harmless
                // when it is the base's own tensor, which loading the adapter puts back unchanged.
                if !same_values(&file, file.tensor(other).unwrap(), base, bt)? {
                    return Err(Error::invalid(
                        wpath,
                        format!("tensor '{other}' replaces '{target}' whole with values other than the base model's, and the adapter also has LoRA factors for it; this combination is not supported"),
                    ));
                }
                full.remove(&target);
            }
            modules.insert(
                target.clone(),
                LoraModule {
                    target,
                    module,
                    a,
                    b,
                    rank,
                    alpha,
                    scale,
                    transposed,
                    rows,
                    cols,
                },
            );
        }
        if modules.is_empty() && full.is_empty() {
            return Err(Error::invalid(
                wpath,
                "adapter holds no LoRA factors and no saved modules",
            ));
        }
        Ok(Adapter {
            path: path.to_path_buf(),
            config,
            file,
            modules,
            full,
        })
    }

    /// The largest rank of any module (the adapter's rank for the report).
    pub fn max_rank(&self) -> u64 {
        self.modules.values().map(|m| m.rank).max().unwrap_or(0)
    }

    /// Reads factor `name` whole as f64, row-major as stored.
    fn read_factor(&self, name: &str) -> Result<Vec<f64>> {
        let t = self.file.tensor(name).expect("module factors exist");
        read_f64(&self.file, t, 0, t.numel() as usize)
    }

    /// Reads P (rows × r) and Q (r × cols), both row-major, as f64.
    pub fn factors(&self, m: &LoraModule) -> Result<(Vec<f64>, Vec<f64>)> {
        let (a, b) = (self.read_factor(&m.a)?, self.read_factor(&m.b)?);
        let r = m.rank as usize;
        if m.transposed {
            // P = Aᵀ: A is (r × rows); Q = Bᵀ: B is (cols × r).
            Ok((
                transpose(&a, r, m.rows as usize),
                transpose(&b, m.cols as usize, r),
            ))
        } else {
            Ok((b, a))
        }
    }

    /// ‖ΔW‖²_F of module `m` from its factors: scale² · Σ((PᵀP) ∘ (QQᵀ)), in float64, never forming
    /// ΔW. A factor holding NaN or Inf is an error naming it.
    pub fn delta_sum_sq(&self, m: &LoraModule) -> Result<f64> {
        let (p, q) = self.factors(m)?;
        for (name, v) in [(&m.b, &p), (&m.a, &q)] {
            if v.iter().any(|x| !x.is_finite()) {
                let bad = if m.transposed {
                    if name == &m.b {
                        &m.a
                    } else {
                        &m.b
                    }
                } else {
                    name
                };
                return Err(Error::NonFinite {
                    path: self.file.path.clone(),
                    tensor: bad.clone(),
                });
            }
        }
        let r = m.rank as usize;
        let gp = gram_cols(&p, m.rows as usize, r);
        let gq = gram_rows(&q, r, m.cols as usize);
        let s: f64 = gp.iter().zip(&gq).map(|(x, y)| x * y).sum();
        // Rounding can make a tiny sum negative; a norm is not.
        Ok((m.scale * m.scale * s).max(0.0))
    }

    /// Σ (X − B)² of a tensor saved whole, against the base, in float64.
    pub fn full_diff_sum_sq(&self, name: &str, base: &Model, chunk_elems: usize) -> Result<f64> {
        let saved = &self.full[name];
        let (t, bt) = (
            self.file.tensor(saved).unwrap(),
            base.tensor(name).expect("caller checked"),
        );
        let n = t.numel();
        let mut acc = 0f64;
        let mut start = 0u64;
        while start < n {
            let len = (n - start).min(chunk_elems as u64) as usize;
            let x = read_f64(&self.file, t, start, len)?;
            let b = read_f64(base, bt, start, len)?;
            acc += x.iter().zip(&b).map(|(x, b)| (x - b) * (x - b)).sum::<f64>();
            start += len as u64;
        }
        if !acc.is_finite() {
            return Err(Error::NonFinite {
                path: self.file.path.clone(),
                tensor: saved.clone(),
            });
        }
        Ok(acc)
    }

    /// Σ (X_t − B_t)² for every tensor of `names` (all in the base): from the factors for updated
    /// tensors, against the base for tensors saved whole, 0 for the others. Runs on the current pool.
    pub fn diff_sum_sq(&self, names: &[&str], base: &Model, chunk_elems: usize) -> Result<Vec<f64>> {
        names
            .par_iter()
            .map(|n| {
                if let Some(m) = self.modules.get(*n) {
                    self.delta_sum_sq(m)
                } else if self.full.contains_key(*n) {
                    self.full_diff_sum_sq(n, base, chunk_elems)
                } else {
                    Ok(0.0)
                }
            })
            .collect()
    }

    /// Bytes of heap memory [`Adapter::delta_into`] holds at most for a chunk of up to `chunk_elems`
    /// elements of module `m`, counting every allocation live at once: Q (r × cols) as f64 with,
    /// while it is read, its raw bytes or (transposed) the untransposed copy (16·r·cols); then Q and
    /// the rows of P the chunk touches with their raw bytes or per-rank segments (16·rows·(r + 1)).
    /// Factor dtypes are at most 8 bytes.
    pub fn scratch_bytes(m: &LoraModule, chunk_elems: usize) -> u64 {
        let rows = (chunk_elems as u64).div_ceil(m.cols).min(m.rows) + 1;
        16 * m.rank * m.cols + 16 * rows * (m.rank + 1)
    }

    /// Bytes of heap memory the statistics of module `m` ([`Adapter::delta_sum_sq`]) hold at most:
    /// both factors as f64 with their raw bytes while read, or their transposed copies
    /// (24·r·(rows + cols)), and the two r × r Gram matrices.
    pub fn stats_scratch_bytes(m: &LoraModule) -> u64 {
        24 * m.rank * (m.rows + m.cols) + 16 * m.rank * m.rank
    }

    /// The scratch bound a worker of a write pass needs at `chunk_elems` for any module of `adapters`
    /// (a worker computes one term at a time, so the largest, not the sum).
    pub fn write_scratch<'a>(adapters: impl IntoIterator<Item = &'a Adapter>, chunk_elems: usize) -> u64 {
        adapters
            .into_iter()
            .flat_map(|a| a.modules.values())
            .map(|m| Adapter::scratch_bytes(m, chunk_elems))
            .max()
            .unwrap_or(0)
    }

    /// The scratch bound a worker of the analyze pass ([`Adapter::diff_sum_sq`] over `names`) needs
    /// for any of them: a module's factors, or a tensor saved whole (two chunks of f64 values and the
    /// raw bytes of one).
    pub fn stats_scratch(&self, names: &[&str], chunk_elems: usize) -> u64 {
        names
            .iter()
            .map(|n| match self.modules.get(*n) {
                Some(m) => Adapter::stats_scratch_bytes(m),
                None if self.full.contains_key(*n) => 32 * chunk_elems as u64,
                None => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// ΔW of module `m` at flat elements `[start, start + out.len())`, in float64: for each element
    /// (i, j), `scale · Σ_k P[i,k]·Q[k,j]`, the sum in k order from 0. Products of factors stored in 32
    /// bits or less are exact in float64, so the only roundings are the r additions and the scale.
    ///
    /// The work goes by blocks of [`COL_BLOCK`] columns, every row of the chunk within a block, so the
    /// block of Q (r × `COL_BLOCK`) stays in the core's cache while the chunk's rows pass over it; the
    /// order of each element's sum is the same whatever the blocking.
    pub fn delta_into(&self, m: &LoraModule, start: u64, out: &mut [f64]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let (cols, r) = (m.cols as usize, m.rank as usize);
        let (row0, row1) = (start / m.cols, (start + out.len() as u64 - 1) / m.cols + 1);
        let nrows = (row1 - row0) as usize;
        let q = self.factor_q(m)?;
        let p = self.factor_p_rows(m, row0, nrows)?;
        let first = (start % m.cols) as usize;
        for cb in (0..cols).step_by(COL_BLOCK) {
            let ce = (cb + COL_BLOCK).min(cols);
            // Row ri of the chunk holds columns [j0, j1) at out[e..].
            let mut e = 0usize;
            for ri in 0..nrows {
                let j0 = if ri == 0 { first } else { 0 };
                let j1 = cols.min(j0 + out.len() - e);
                let (a, b) = (j0.max(cb), j1.min(ce));
                if a < b {
                    let o = e + (a - j0);
                    kernel::row(
                        &p[ri * r..(ri + 1) * r],
                        &q,
                        cols,
                        a,
                        &mut out[o..o + (b - a)],
                        m.scale,
                    );
                }
                e += j1 - j0;
            }
            debug_assert_eq!(e, out.len());
        }
        Ok(())
    }

    /// Q (r × cols) row-major as f64.
    fn factor_q(&self, m: &LoraModule) -> Result<Vec<f64>> {
        if m.transposed {
            let b = self.read_factor(&m.b)?;
            Ok(transpose(&b, m.cols as usize, m.rank as usize))
        } else {
            self.read_factor(&m.a)
        }
    }

    /// Rows `[row0, row0 + n)` of P (n × r) as f64.
    fn factor_p_rows(&self, m: &LoraModule, row0: u64, n: usize) -> Result<Vec<f64>> {
        let r = m.rank as usize;
        if m.transposed {
            // P = Aᵀ: row i of P is column i of A (r × rows): r strided segments of n values.
            let t = self.file.tensor(&m.a).unwrap();
            let mut p = vec![0f64; n * r];
            for k in 0..r {
                let seg = read_f64(&self.file, t, k as u64 * m.rows + row0, n)?;
                for (i, v) in seg.into_iter().enumerate() {
                    p[i * r + k] = v;
                }
            }
            Ok(p)
        } else {
            let t = self.file.tensor(&m.b).unwrap();
            read_f64(&self.file, t, row0 * r as u64, n * r)
        }
    }
}

/// True when two tensors of the same shape hold the same values (compared as f64, in chunks).
fn same_values(a: &Model, ta: &TensorRef, b: &Model, tb: &TensorRef) -> Result<bool> {
    const CHUNK: u64 = 1 << 20;
    let n = ta.numel();
    if tb.numel() != n {
        return Ok(false);
    }
    let mut start = 0;
    while start < n {
        let len = (n - start).min(CHUNK) as usize;
        if read_f64(a, ta, start, len)? != read_f64(b, tb, start, len)? {
            return Ok(false);
        }
        start += len as u64;
    }
    Ok(true)
}

/// Reads elements `[start, start + len)` of tensor `t` of `model` as f64 (exact for every float type).
pub fn read_f64(model: &Model, t: &TensorRef, start: u64, len: usize) -> Result<Vec<f64>> {
    let size = t.dtype.size();
    let mut bytes = vec![0u8; len * size];
    model
        .shard_of(t)
        .read_at(t.offset + start * size as u64, &mut bytes)?;
    Ok(decode_f64(t.dtype, &bytes))
}

/// Decodes little-endian float bytes to f64 (exact).
pub fn decode_f64(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f64::from(crate::dtype::bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f64::from(crate::dtype::f16_to_f32(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::Opaque(_) => unreachable!("{}", crate::dtype::NOT_FLOAT),
    }
}

/// Transposes a row-major (rows × cols) matrix.
fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

/// XᵀX (r × r) of a row-major (n × r) matrix.
fn gram_cols(x: &[f64], n: usize, r: usize) -> Vec<f64> {
    let mut g = vec![0f64; r * r];
    for i in 0..n {
        let row = &x[i * r..(i + 1) * r];
        for k in 0..r {
            let v = row[k];
            for (gl, w) in g[k * r..(k + 1) * r].iter_mut().zip(row) {
                *gl += v * w;
            }
        }
    }
    g
}

/// XXᵀ (r × r) of a row-major (r × n) matrix.
fn gram_rows(x: &[f64], r: usize, n: usize) -> Vec<f64> {
    let mut g = vec![0f64; r * r];
    for k in 0..r {
        for l in 0..r {
            g[k * r + l] = x[k * n..(k + 1) * n]
                .iter()
                .zip(&x[l * n..(l + 1) * n])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    g
}

/// Columns of ΔW formed per pass over a chunk's rows: a block of Q is r × 256 float64 (32 KiB at rank
/// 16), which stays in a core's L1/L2 cache while every row of the chunk uses it.
pub const COL_BLOCK: usize = 256;

/// The inner loop of [`Adapter::delta_into`], compiled twice on x86-64 (baseline and AVX2) and chosen
/// at run time. Separate multiply and add in both (no FMA): identical results.
mod kernel {
    /// Columns accumulated at once, in registers.
    const TILE: usize = 16;

    #[inline(always)]
    fn generic(p: &[f64], q: &[f64], cols: usize, j0: usize, out: &mut [f64], scale: f64) {
        let n = out.len();
        let mut j = 0;
        while j + TILE <= n {
            let mut acc = [0f64; TILE];
            for (k, &pk) in p.iter().enumerate() {
                let at = k * cols + j0 + j;
                let qk: &[f64; TILE] = q[at..at + TILE].try_into().expect("TILE elements");
                for (a, &v) in acc.iter_mut().zip(qk) {
                    *a += pk * v;
                }
            }
            for (o, a) in out[j..j + TILE].iter_mut().zip(acc) {
                *o = scale * a;
            }
            j += TILE;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            let mut a = 0f64;
            for (k, &pk) in p.iter().enumerate() {
                a += pk * q[k * cols + j0 + jj];
            }
            *o = scale * a;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn avx2(p: &[f64], q: &[f64], cols: usize, j0: usize, out: &mut [f64], scale: f64) {
        generic(p, q, cols, j0, out, scale);
    }

    /// out[j − j0] = scale · Σ_k p[k] · q[k, j] for j in `[j0, j0 + out.len())`, each sum in k order
    /// from 0.
    pub(super) fn row(p: &[f64], q: &[f64], cols: usize, j0: usize, out: &mut [f64], scale: f64) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just detected.
            return unsafe { avx2(p, q, cols, j0, out, scale) };
        }
        generic(p, q, cols, j0, out, scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<LoraConfig> {
        LoraConfig::parse(Path::new("adapter_config.json"), text)
    }

    #[test]
    fn scale_rank_and_alpha_patterns() {
        let c = cfg(r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"down_proj":4,"layers\\.1\\.self_attn\\.q_proj":2},
                      "alpha_pattern":{"v_proj":3}}"#)
        .unwrap();
        assert_eq!(c.module_scale("model.layers.0.self_attn.q_proj"), (8, 16.0, 2.0));
        assert_eq!(c.module_scale("model.layers.1.self_attn.q_proj"), (2, 16.0, 8.0));
        assert_eq!(c.module_scale("model.layers.3.mlp.down_proj"), (4, 16.0, 4.0));
        assert_eq!(
            c.module_scale("model.layers.3.self_attn.v_proj"),
            (8, 3.0, 3.0 / 8.0)
        );
        // A key matches whole dotted components only: 'proj' is not a suffix match of 'q_proj'.
        let c =
            cfg(r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"use_rslora":true,"rank_pattern":{"proj":1}}"#)
                .unwrap();
        assert_eq!(
            c.module_scale("model.layers.0.self_attn.q_proj"),
            (8, 16.0, 16.0 / 8f64.sqrt())
        );
    }

    #[test]
    fn unsupported_types_are_named() {
        for (text, word) in [
            (r#"{"peft_type":"LOHA","r":8}"#, "LoHa"),
            (r#"{"peft_type":"IA3"}"#, "IA³"),
            (r#"{"peft_type":"LORA","r":8,"use_dora":true}"#, "DoRA"),
            (r#"{"peft_type":"LORA","r":8,"lora_bias":true}"#, "lora_bias"),
            (r#"{"r":8}"#, "peft_type"),
            (r#"{"peft_type":"LORA","r":0}"#, "positive"),
            (r#"{"peft_type":"LORA","r":4,"bias":"some"}"#, "lora_only"),
        ] {
            let e = cfg(text).unwrap_err().to_string();
            assert!(e.contains(word) && e.contains("adapter_config.json"), "{e}");
        }
    }

    #[test]
    fn gram_identity_matches_explicit_product() {
        // ‖scale·P·Q‖² from the Gram matrices equals the sum over the explicit product.
        let (n, r, c) = (7usize, 3usize, 5usize);
        let p: Vec<f64> = (0..n * r).map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0).collect();
        let q: Vec<f64> = (0..r * c).map(|i| ((i * 13 % 9) as f64 - 4.0) / 3.0).collect();
        let mut explicit = 0.0;
        for i in 0..n {
            for j in 0..c {
                let v: f64 = (0..r).map(|k| p[i * r + k] * q[k * c + j]).sum();
                explicit += v * v;
            }
        }
        let s: f64 = gram_cols(&p, n, r)
            .iter()
            .zip(gram_rows(&q, r, c))
            .map(|(a, b)| a * b)
            .sum();
        assert!((s - explicit).abs() <= 1e-12 * explicit, "{s} {explicit}");
        assert_eq!(transpose(&transpose(&p, n, r), r, n), p);
    }
}
