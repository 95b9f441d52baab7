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
        for k in 0..self.experts.len() {
            self.check_vocab(k, options)?;
        }
        self.analyze_each(&vec![options.clone(); self.experts.len()], None, progress)
    }

    /// Analyzes every language expert with its own options (`options[k]` for expert `k`): one pass
    /// over B, every expert and, unless `saved` already holds its sums, S; then a plan per expert. The
    /// pass itself (numerics, memory, threads) follows the first expert's options. With `saved`
    /// (only `name`, `numel`, `base_ss` and `safety_ss` are used), B's sums are recomputed anyway and
    /// must match the saved ones bit for bit, which proves the saved sums belong to this base model.
    pub fn analyze_each(&self, options: &[MergeOptions], saved: Option<&[TensorStats]>, progress: &Progress) -> Result<Vec<Plan>> {
        if options.len() != self.experts.len() {
            return Err(Error::argument(format!("{} option sets for {} experts", options.len(), self.experts.len())));
        }
        for o in options {
            o.validate()?;
            if o.numerics != options[0].numerics {
                return Err(Error::argument("all experts of one run must use the same numerics (the sums are shared)"));
            }
        }
        let pass = &options[0];
        // Rows of sums, in order: S (unless saved), then every expert. Full models are read element
        // by element in one fused pass; LoRA adapters are measured from their factors.
        let mut sources: Vec<&Expert> = vec![];
        if saved.is_none() {
            sources.push(&self.safety);
        }
        sources.extend(self.experts.iter());
        let lora = sources.iter().any(|e| e.adapter().is_some());
        if lora && pass.numerics == Numerics::Official {
            return Err(Error::argument(
                "numerics 'official' reproduces the authors' scripts, which take full models only; LoRA adapter experts need numerics 'exact'",
            ));
        }
        let models: Vec<&Model> = sources.iter().filter_map(|e| if let Expert::Full(m) = e { Some(m) } else { None }).collect();
        let budget = Budget::plan(pass.max_memory, pass.threads, models.len() + 1, self.widest(pass))?;
        let targets = self.layout.targets();
        let total: u64 = targets.iter().map(|n| self.base.tensor(n).unwrap().nbytes).sum::<u64>() * (models.len() as u64 + 1);
        progress.start(Phase::Analyze, total);
        let sums = run_pool(budget.workers, || -> Result<Vec<sums::Sums>> {
            let pool = BufferPool::new(&budget);
            let full = sums::compute_allowing(&targets, &self.base, &models, pass.numerics, pass.allow_non_finite, budget.chunk_elems, &pool, progress)?;
            if !lora {
                return Ok(full);
            }
            let mut from_factors = vec![];
            for e in &sources {
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
                    s.diff_ss = sources.iter().map(|e| if e.adapter().is_some() { l.next().unwrap()[i] } else { *f.next().unwrap() }).collect();
                    s
                })
                .collect())
        })??;
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
