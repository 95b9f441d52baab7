//! Decisions (METHOD.md §4) and what they mean for each output tensor (§5). A [`Plan`] holds the
//! decisions for one language expert; "plan" names nothing else.

use serde::{Deserialize, Serialize};

use crate::analyze::score::{unit_scores, Unit};
use crate::error::{Error, Result};
use crate::layout::{Layout, Part, Place};
use crate::options::{Granularity, MergeOptions, VocabSource};

/// The sums of squares behind one measured tensor's relative changes, for one language expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// Tensor name.
    pub name: String,
    /// Element count.
    pub numel: u64,
    /// Σ B² (in `official` numerics, of B rounded to bf16, summed in float32 as torch does).
    pub base_ss: f64,
    /// Σ (S − B)², the safety expert's task vector.
    pub safety_ss: f64,
    /// Σ (M − B)², the language expert's task vector.
    pub expert_ss: f64,
}

/// Added to the sum of scores before normalising (METHOD.md §4).
pub const SUM_EPS: f64 = 1e-8;

/// Where a unit, or any output tensor, is taken from: the one enum of decisions, used for the units
/// (§4) and for the tensors no unit covers (the `outside` and `norms` options, §5).
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Options the plan was made with.
    pub options: MergeOptions,
    /// Name of the layout used.
    pub layout: String,
    /// Decoder layers.
    pub n_layers: usize,
    /// Per-unit decisions, in unit order.
    pub units: Vec<UnitDecision>,
    /// The sums behind the scores, one per measured tensor.
    pub stats: Vec<TensorStats>,
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
    /// Scores and decides every unit from one language expert's sums.
    pub fn new(stats: Vec<TensorStats>, layout: &Layout, options: &MergeOptions) -> Plan {
        let (g, numerics) = (options.granularity, options.numerics);
        let a_s = unit_scores(&stats, layout, g, numerics, |s| s.safety_ss);
        let a_m = unit_scores(&stats, layout, g, numerics, |s| s.expert_ss);
        let units = Unit::all(layout.n_layers, g)
            .into_iter()
            .zip(decide(&a_s, &a_m, options.tau))
            .zip(a_s.iter().zip(&a_m))
            .map(
                |((unit, (p_safety, p_expert, d, decision)), (&score_safety, &score_expert))| UnitDecision {
                    unit,
                    score_safety,
                    score_expert,
                    p_safety,
                    p_expert,
                    d,
                    decision,
                    alpha: None,
                    source: Source::Measured,
                },
            )
            .collect();
        Plan {
            options: options.clone(),
            layout: layout.def.name.clone(),
            n_layers: layout.n_layers,
            units,
            stats,
        }
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
                return Err(Error::argument(format!(
                    "unit {:?}: blend weight {a} is not between 0 and 1",
                    u.unit
                )));
            }
        }
        Ok(())
    }

    /// What the output tensor at `place` is made of, and the safety expert's weight if it is a blend:
    /// a unit's own weight when it has one (in layer granularity the layer's norms go with it), else
    /// the run's alpha.
    pub fn decision_at(&self, place: Place) -> (Decision, f64) {
        let unit = match (place, self.options.granularity) {
            (Place::Layer { layer, .. }, Granularity::Layer) => Some(&self.units[layer]),
            (
                Place::Layer {
                    layer,
                    part: part @ (Part::Attention | Part::Mlp),
                    ..
                },
                Granularity::Module,
            ) => Some(&self.units[Unit::index(layer, part, Granularity::Module)]),
            _ => None,
        };
        let alpha = unit.and_then(|u| u.alpha).unwrap_or(self.options.alpha);
        let decision = match (place, self.options.granularity) {
            (Place::Vocab, _) if self.options.vocab_from == VocabSource::Expert => Decision::Expert,
            (Place::Outside | Place::Vocab, _) => self.options.outside,
            // A merge refuses unassigned tensors before it gets here (Layout::check_assigned); should one
            // slip through, it stays the host's rather than follow a decision it was not measured for.
            (Place::Unassigned { .. }, _) => Decision::Expert,
            (Place::Layer { layer, .. }, Granularity::Layer) => self.units[layer].decision,
            (Place::Layer { part: Part::Norm, .. }, Granularity::Module) => self.options.norms,
            (Place::Layer { layer, part, .. }, Granularity::Module) => {
                self.units[Unit::index(layer, part, Granularity::Module)].decision
            }
        };
        (decision, alpha)
    }
}
