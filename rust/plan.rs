//! Decisions (METHOD.md §4) and what they mean for each output tensor (§5).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{Layout, Part, Place};
use crate::options::{Granularity, MergeOptions, SourcePolicy, VocabSource};
use crate::score::{unit_scores, Unit};
use crate::stats::TensorStats;

/// Added to the sum of scores before normalising (METHOD.md §4).
pub const SUM_EPS: f64 = 1e-8;

/// What happens to a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Take the safety expert's unit.
    Safety,
    /// Keep the language expert's unit.
    Expert,
    /// alpha * S + (1 - alpha) * M.
    Blend,
}

/// Who decided a unit. The engine's own plans are `Measured`; the Python package sets the others when
/// it applies fixed bands, a decisions file or per-unit overrides (`layerswap_fast.decisions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The paper's rule on d and tau.
    #[default]
    Measured,
    /// A per-unit override.
    Override,
    /// A decisions file.
    File,
    /// Fixed bands (Bandarkar et al.).
    Band,
}

/// One unit's scores and decision, exactly as thresholded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnitDecision {
    /// The unit.
    #[serde(flatten)]
    pub unit: Unit,
    /// Raw score of the safety expert, A_S.
    pub score_safety: f64,
    /// Raw score of the language expert, A_M.
    pub score_expert: f64,
    /// p_S.
    pub p_safety: f64,
    /// p_M.
    pub p_expert: f64,
    /// d = p_S − p_M.
    pub d: f64,
    /// The decision.
    pub decision: Decision,
    /// The safety expert's weight if the unit is a blend with a weight of its own (a band's
    /// transition layer, an override `blend:0.25`, a decisions file); None blends with the run's alpha.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Who decided the unit.
    #[serde(default)]
    pub source: Source,
}

/// The complete plan for one language expert.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Options the plan was made with.
    pub options: MergeOptions,
    /// Name of the layout used.
    pub layout: String,
    /// Decoder layers.
    pub n_layers: usize,
    /// Per-unit decisions, in unit order.
    pub units: Vec<UnitDecision>,
}

/// What the write pass does for one output tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Copy the safety expert's tensor.
    Safety,
    /// Copy the language expert's tensor.
    Expert,
    /// Blend with this weight on the safety expert.
    Blend(f64),
}

/// Normalises two score vectors and decides every unit.
pub fn decide(a_s: &[f64], a_m: &[f64], tau: f64) -> Vec<(f64, f64, f64, Decision)> {
    let sum_s: f64 = a_s.iter().sum::<f64>() + SUM_EPS;
    let sum_m: f64 = a_m.iter().sum::<f64>() + SUM_EPS;
    a_s.iter()
        .zip(a_m)
        .map(|(s, m)| {
            let (ps, pm) = (s / sum_s, m / sum_m);
            let d = ps - pm;
            let decision = if d > tau {
                Decision::Safety
            } else if d < -tau {
                Decision::Expert
            } else {
                Decision::Blend
            };
            (ps, pm, d, decision)
        })
        .collect()
}

impl Plan {
    /// Builds the plan for expert number `expert` (index into each [`TensorStats::diff_ss`]); expert 0
    /// of the statistics is the safety expert.
    pub fn new(stats: &[TensorStats], layout: &Layout, options: &MergeOptions, expert: usize) -> Plan {
        let g = options.granularity;
        let a_s = unit_scores(stats, layout, g, options.numerics, 0);
        let a_m = unit_scores(stats, layout, g, options.numerics, expert);
        let units = Unit::all(layout.n_layers, g)
            .into_iter()
            .zip(decide(&a_s, &a_m, options.tau))
            .zip(a_s.iter().zip(&a_m))
            .map(|((unit, (p_safety, p_expert, d, decision)), (&score_safety, &score_expert))| UnitDecision {
                unit,
                score_safety,
                score_expert,
                p_safety,
                p_expert,
                d,
                decision,
                alpha: None,
                source: Source::Measured,
            })
            .collect();
        Plan { options: options.clone(), layout: layout.def.name.clone(), n_layers: layout.n_layers, units }
    }

    /// Checks a plan made elsewhere (a decisions file, overrides) before it is written: one unit per
    /// unit of the granularity, in order, and every blend weight in [0, 1].
    pub fn check(&self) -> Result<()> {
        let want = Unit::all(self.n_layers, self.options.granularity);
        if self.units.len() != want.len() || self.units.iter().zip(&want).any(|(u, w)| u.unit != *w) {
            return Err(Error::argument(format!(
                "the plan's units are not the {} units of a {}-layer model in {:?} granularity",
                want.len(),
                self.n_layers,
                self.options.granularity
            )));
        }
        for u in &self.units {
            if let Some(a) = u.alpha.filter(|a| !(0.0..=1.0).contains(a)) {
                return Err(Error::argument(format!("unit {:?}: blend weight {a} is not between 0 and 1", u.unit)));
            }
        }
        Ok(())
    }

    fn from_unit(&self, u: &UnitDecision) -> Action {
        match u.decision {
            Decision::Safety => Action::Safety,
            Decision::Expert => Action::Expert,
            Decision::Blend => Action::Blend(u.alpha.unwrap_or(self.options.alpha)),
        }
    }

    fn from_policy(&self, p: SourcePolicy) -> Action {
        match p {
            SourcePolicy::Safety => Action::Safety,
            SourcePolicy::Expert => Action::Expert,
            SourcePolicy::Blend => Action::Blend(self.options.alpha),
        }
    }

    /// What the output tensor at `place` is made of.
    pub fn action(&self, place: Place) -> Action {
        match (place, self.options.granularity) {
            (Place::Vocab, _) if self.options.vocab_from == VocabSource::Expert => Action::Expert,
            (Place::Outside | Place::Vocab, _) => self.from_policy(self.options.outside),
            // A merge refuses unassigned tensors before it gets here (Layout::check_assigned); should one
            // slip through, it stays the host's rather than follow a decision it was not measured for.
            (Place::Unassigned { .. }, _) => Action::Expert,
            (Place::Layer { layer, .. }, Granularity::Layer) => self.from_unit(&self.units[layer]),
            (Place::Layer { part: Part::Norm, .. }, Granularity::Module) => self.from_policy(self.options.norms),
            (Place::Layer { layer, part, .. }, Granularity::Module) => {
                self.from_unit(&self.units[Unit::index(layer, part, Granularity::Module)])
            }
        }
    }

    /// Units per decision: (safety, expert, blend).
    pub fn counts(&self) -> (usize, usize, usize) {
        let c = |d| self.units.iter().filter(|u| u.decision == d).count();
        (c(Decision::Safety), c(Decision::Expert), c(Decision::Blend))
    }

    /// Serialises the plan to JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plan serialises")
    }
}
