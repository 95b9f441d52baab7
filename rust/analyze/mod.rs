//! The analyze stage: one pass over B, S and every language expert for the sums of squares of every
//! measured tensor ([`sums`]; [`crate::official`] for the authors' arithmetic), the scores of every
//! unit ([`score`], METHOD.md §2–§3), and one [`Plan`] of decisions per expert ([`plan`], §4).

pub mod plan;
pub mod score;
pub mod sums;

use std::collections::HashMap;

use crate::budget::{run_pool, Budget, BufferPool};
use crate::error::{Error, Result};
use crate::expert::Expert;
use crate::io::Model;
use crate::open::Session;
use crate::options::{MergeOptions, Numerics};
use crate::progress::{Phase, Progress};

pub use plan::{Decision, Plan, TensorStats, UnitDecision};

impl Session {
    /// Analyzes every language expert of the session with the same options: one plan per expert.
    pub fn analyze(&self, options: &MergeOptions, progress: &Progress) -> Result<Vec<Plan>> {
        // Fail before reading anything rather than after; bulk runs (analyze_each) leave this to each
        // expert's write, so that one expert's vocabulary does not stop the others.
        let each = vec![options.clone(); self.experts.len()];
        self.check_vocab_each(&each)?;
        self.analyze_each(&each, None, progress)
    }

    /// Analyzes every language expert with its own options (`options[k]` for expert `k`): one pass
    /// over B, every expert and, unless `saved` already holds its sums, S; then a plan per expert. The
    /// pass itself (numerics, memory, threads) follows the first expert's options. With `saved`
    /// (only `name`, `numel`, `base_ss` and `safety_ss` are used), B's sums are recomputed anyway and
    /// must match the saved ones bit for bit, which proves the saved sums belong to this base model.
    pub fn analyze_each(
        &self,
        options: &[MergeOptions],
        saved: Option<&[TensorStats]>,
        progress: &Progress,
    ) -> Result<Vec<Plan>> {
        if options.len() != self.experts.len() {
            return Err(Error::argument(format!(
                "{} option sets for {} experts",
                options.len(),
                self.experts.len()
            )));
        }
        check_run_options(options)?;
        let pass = &options[0];
        // Rows of sums, in order: S (unless saved), then every expert. Full models are read element
        // by element in one fused pass; LoRA adapters are measured from their factors.
        let mut sources: Vec<&Expert> = vec![];
        if saved.is_none() {
            sources.push(&self.safety);
        }
        sources.extend(self.experts.iter());
        let sums = self.sums(&sources, pass, progress)?;
        let safety_ss: Vec<f64> = match saved {
            Some(saved) => saved_safety_sums(&sums, saved, &self.base)?,
            None => sums.iter().map(|s| s.diff_ss[0]).collect(),
        };
        let first_expert = usize::from(saved.is_none());
        Ok(options
            .iter()
            .enumerate()
            .map(|(k, o)| {
                let stats: Vec<TensorStats> = sums
                    .iter()
                    .zip(&safety_ss)
                    .map(|(s, &safety_ss)| TensorStats {
                        name: s.name.clone(),
                        numel: s.numel,
                        base_ss: s.base_ss,
                        safety_ss,
                        expert_ss: s.diff_ss[first_expert + k],
                    })
                    .collect();
                Plan::new(stats, &self.layout, o)
            })
            .collect())
    }

    /// The pass over B and `sources`: Σ B² and Σ (X − B)² per measured tensor, one `diff_ss` entry
    /// per source in order. Full models are read element by element in one fused pass; LoRA adapters
    /// are measured from their factors.
    fn sums(
        &self,
        sources: &[&Expert],
        options: &MergeOptions,
        progress: &Progress,
    ) -> Result<Vec<sums::Sums>> {
        let lora = sources.iter().any(|e| e.adapter().is_some());
        if lora && options.numerics == Numerics::Official {
            return Err(Error::argument(
                "numerics 'official' reproduces the authors' scripts, which take full models only; LoRA adapter experts need numerics 'exact'",
            ));
        }
        let models: Vec<&Model> = sources
            .iter()
            .filter_map(|e| if let Expert::Full(m) = e { Some(m) } else { None })
            .collect();
        let targets = self.layout.targets();
        // The factor statistics run after the pass over full models, on the same workers, while the
        // buffers are still held: their scratch is counted on top.
        let budget = Budget::plan_with_scratch(
            options.max_memory,
            options.threads,
            models.len() + 1,
            self.widest(options),
            |chunk| {
                sources
                    .iter()
                    .filter_map(|e| e.adapter())
                    .map(|a| a.stats_scratch(&targets, chunk))
                    .max()
                    .unwrap_or(0)
            },
        )?;
        let total: u64 = targets
            .iter()
            .map(|n| self.base.tensor(n).unwrap().nbytes)
            .sum::<u64>()
            * (models.len() as u64 + 1);
        progress.start(Phase::Analyze, total);
        let sums = run_pool(budget.workers, || -> Result<Vec<sums::Sums>> {
            let pool = BufferPool::new(&budget);
            // B's pages are of no use to the write pass of full models: dropped as they are summed
            // when the inputs do not fit in memory anyway.
            let drop_base = self.bigger_than_memory()
                && std::iter::once(&self.safety)
                    .chain(&self.experts)
                    .all(|e| e.adapter().is_none());
            let full = sums::compute_streaming(
                &targets,
                &self.base,
                &models,
                options.numerics,
                options.allow_non_finite,
                drop_base,
                budget.chunk_elems,
                &pool,
                progress,
            )?;
            if !lora {
                return Ok(full);
            }
            let mut from_factors = vec![];
            for e in sources {
                if let Some(a) = e.adapter() {
                    progress.check()?;
                    from_factors.push(a.diff_sum_sq(&targets, &self.base, budget.chunk_elems)?);
                }
            }
            // Each source takes its next column from its own kind.
            Ok(full
                .into_iter()
                .enumerate()
                .map(|(i, mut s)| {
                    let (mut f, mut l) = (s.diff_ss.iter(), from_factors.iter());
                    s.diff_ss = sources
                        .iter()
                        .map(|e| {
                            if e.adapter().is_some() {
                                l.next().unwrap()[i]
                            } else {
                                *f.next().unwrap()
                            }
                        })
                        .collect();
                    s
                })
                .collect())
        })??;
        Ok(sums)
    }

    /// One share of a pass split across machines: B and one model only (the safety expert, or
    /// language expert `k`), with one `diff_ss` entry. Every sum keeps its own lanes whatever the
    /// other models of a pass are, so these are the same bits the single pass over all models gives;
    /// [`Session::plans_from_shares`] puts the shares together.
    pub fn sums_of(
        &self,
        model: Measured,
        options: &MergeOptions,
        progress: &Progress,
    ) -> Result<Vec<sums::Sums>> {
        options.validate()?;
        let m = match model {
            Measured::Safety => &self.safety,
            Measured::Expert(k) => self
                .experts
                .get(k)
                .ok_or_else(|| Error::argument(format!("no language expert {k} in this session")))?,
        };
        self.sums(&[m], options, progress)
    }

    /// Path and stamp of the files a share of `model` reads (B's and the model's), to carry with
    /// its sums (see [`Session::check_stamps`]).
    pub fn stamps_of(&self, model: Measured) -> Vec<(std::path::PathBuf, crate::io::Stamp)> {
        let mut stamps = self.base.stamps();
        stamps.extend(match model {
            Measured::Safety => self.safety.stamps(),
            Measured::Expert(k) => self.experts.get(k).map(Expert::stamps).unwrap_or_default(),
        });
        stamps
    }

    /// Plans from a pass computed in shares ([`Session::sums_of`], or saved sums of the safety
    /// expert): `safety` holds the safety expert's share and `experts[k]` language expert `k`'s, with
    /// `options[k]` its options. Every share must cover the measured tensors of this session with
    /// bit-identical base sums (else they were not computed from the same base model). The same plans
    /// as [`Session::analyze_each`] over the same models.
    pub fn plans_from_shares(
        &self,
        options: &[MergeOptions],
        safety: &[sums::Sums],
        experts: &[Vec<sums::Sums>],
    ) -> Result<Vec<Plan>> {
        if options.len() != self.experts.len() || experts.len() != self.experts.len() {
            return Err(Error::argument(format!(
                "{} option sets and {} shares of sums for {} experts",
                options.len(),
                experts.len(),
                self.experts.len()
            )));
        }
        check_run_options(options)?;
        let targets = self.layout.targets();
        let share = |part: &[sums::Sums], whose: &dyn Fn() -> String| -> Result<Vec<(f64, f64)>> {
            let by_name: HashMap<&str, &sums::Sums> = part.iter().map(|s| (s.name.as_str(), s)).collect();
            if by_name.len() != targets.len() {
                return Err(Error::argument(format!(
                    "sums for {} cover {} tensors; this model has {} measured tensors",
                    whose(),
                    by_name.len(),
                    targets.len()
                )));
            }
            targets
                .iter()
                .map(|n| {
                    let numel = self.base.tensor(n).unwrap().numel();
                    match by_name.get(n) {
                        Some(p) if p.numel == numel && p.diff_ss.len() == 1 => Ok((p.base_ss, p.diff_ss[0])),
                        _ => Err(Error::argument(format!(
                            "sums for {} have no entry for tensor '{n}' of {numel} elements",
                            whose()
                        ))),
                    }
                })
                .collect()
        };
        let s = share(safety, &|| "the safety expert".to_string())?;
        let mut plans = vec![];
        for (k, (part, o)) in experts.iter().zip(options).enumerate() {
            let m = share(part, &|| self.experts[k].path().display().to_string())?;
            let mut stats = Vec::with_capacity(targets.len());
            for (i, n) in targets.iter().enumerate() {
                if m[i].0.to_bits() != s[i].0.to_bits() {
                    return Err(Error::argument(format!(
                        "sums for {} were not computed from the same base model as the safety expert's (tensor '{n}' differs)",
                        self.experts[k].path().display()
                    )));
                }
                stats.push(TensorStats {
                    name: (*n).to_string(),
                    numel: self.base.tensor(n).unwrap().numel(),
                    base_ss: s[i].0,
                    safety_ss: s[i].1,
                    expert_ss: m[i].1,
                });
            }
            plans.push(Plan::new(stats, &self.layout, o));
        }
        Ok(plans)
    }
}

/// The model a share of a pass split across machines measures against B ([`Session::sums_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measured {
    /// The safety expert S.
    Safety,
    /// Language expert number `k` of the session.
    Expert(usize),
}

/// The saved safety-expert sums, in the order of `sums`, after checking that the saved base sums
/// equal the fresh ones.
fn saved_safety_sums(sums: &[sums::Sums], saved: &[TensorStats], base: &Model) -> Result<Vec<f64>> {
    let by_name: HashMap<&str, &TensorStats> = saved.iter().map(|s| (s.name.as_str(), s)).collect();
    sums.iter()
        .map(|s| {
            let Some(old) = by_name.get(s.name.as_str()) else {
                return Err(Error::argument(format!("saved statistics have no entry for tensor '{}'", s.name)));
            };
            if old.base_ss.to_bits() != s.base_ss.to_bits() || old.numel != s.numel {
                return Err(Error::argument(format!(
                    "saved statistics do not belong to the base model {} (tensor '{}' differs); recompute them",
                    base.path.display(),
                    s.name
                )));
            }
            Ok(old.safety_ss)
        })
        .collect()
}

/// Each expert's options are valid, and all use the same numerics: the sums of one pass are shared.
fn check_run_options(options: &[MergeOptions]) -> Result<()> {
    for o in options {
        o.validate()?;
        if o.numerics != options[0].numerics {
            return Err(Error::argument(
                "all experts of one run must use the same numerics (the sums are shared)",
            ));
        }
    }
    Ok(())
}
