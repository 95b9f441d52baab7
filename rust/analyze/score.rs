//! Specialisation scores per unit (METHOD.md §2–§3). Nothing but the formulas.

use serde::{Deserialize, Serialize};

use crate::analyze::plan::TensorStats;
use crate::layout::{Layout, Part, Place};
use crate::official;
use crate::options::{Granularity, Numerics};

/// Below this base norm the relative change is not divided (METHOD.md §2).
pub const NORM_EPS: f64 = 1e-8;

/// A unit: a decoder layer, or one of its two submodules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// Layer index.
    pub layer: usize,
    /// None for a whole layer; Attention or Mlp in module granularity.
    pub part: Option<Part>,
}

impl Unit {
    /// The units of a model with `n_layers` layers, in report order (module: attention then MLP per layer).
    pub fn all(n_layers: usize, granularity: Granularity) -> Vec<Unit> {
        match granularity {
            Granularity::Layer => (0..n_layers).map(|layer| Unit { layer, part: None }).collect(),
            Granularity::Module => (0..n_layers)
                .flat_map(|layer| [Part::Attention, Part::Mlp].map(|p| Unit { layer, part: Some(p) }))
                .collect(),
        }
    }

    /// Index of the unit a measured tensor of (layer, part) belongs to.
    pub fn index(layer: usize, part: Part, granularity: Granularity) -> usize {
        match granularity {
            Granularity::Layer => layer,
            Granularity::Module => 2 * layer + usize::from(part == Part::Mlp),
        }
    }
}

/// A Frobenius norm from a sum of squares, as the numerics mode computes it: exact in float64, or
/// rounded to bf16 (torch returns the norm of a bf16 tensor as a bf16 scalar).
pub fn norm(ss: f64, numerics: Numerics) -> f64 {
    let n = ss.sqrt();
    match numerics {
        Numerics::Exact => n,
        Numerics::Official => official::norm(n),
    }
}

/// r_X(t) = ‖X − B‖ / ‖B‖, or ‖X − B‖ when ‖B‖ ≤ 1e-8.
pub fn relative_change(base_ss: f64, diff_ss: f64, numerics: Numerics) -> f64 {
    let nb = norm(base_ss, numerics);
    let nd = norm(diff_ss, numerics);
    if nb <= NORM_EPS {
        nd
    } else {
        nd / nb
    }
}

/// Scores A_X(u) of every unit for the task vector whose sums `diff_ss` picks (the safety or the
/// language expert's).
pub fn unit_scores(
    stats: &[TensorStats],
    layout: &Layout,
    granularity: Granularity,
    numerics: Numerics,
    diff_ss: impl Fn(&TensorStats) -> f64,
) -> Vec<f64> {
    let n_units = Unit::all(layout.n_layers, granularity).len();
    let mut acc = vec![0f64; n_units];
    for s in stats {
        let Place::Layer {
            layer,
            part,
            target: true,
        } = layout.place(&s.name)
        else {
            continue;
        };
        let r = relative_change(s.base_ss, diff_ss(s), numerics);
        let u = Unit::index(layer, part, granularity);
        match granularity {
            Granularity::Layer => acc[u] += r,
            Granularity::Module => acc[u] += r * r,
        }
    }
    if granularity == Granularity::Module {
        for a in &mut acc {
            *a = a.sqrt();
        }
    }
    acc
}
