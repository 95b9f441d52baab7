use layerswap_fast::analyze::plan::{decide, Decision, Plan, Source, UnitDecision};
use layerswap_fast::analyze::score::{norm, relative_change, Unit};
use layerswap_fast::layout::{Part, Place};
use layerswap_fast::options::MergeOptions;
use layerswap_fast::Numerics;

#[test]
fn relative_change_falls_back_to_absolute_for_zero_base() {
    assert_eq!(relative_change(4.0, 1.0, Numerics::Exact), 0.5);
    assert_eq!(relative_change(0.0, 9.0, Numerics::Exact), 3.0);
    assert_eq!(relative_change(1e-17, 9.0, Numerics::Exact), 3.0);
}

#[test]
fn official_norm_is_rounded_to_bf16() {
    let n = norm(2.0, Numerics::Official);
    assert_eq!(n, 1.414_062_5); // sqrt(2) in bf16
    assert_eq!(norm(2.0, Numerics::Exact), 2f64.sqrt());
}

#[test]
fn decisions_follow_the_threshold_with_ties_blending() {
    // p_S = [0.5, 0.25, 0.25], p_M = [0.25, 0.5, 0.25] (up to the 1e-8 in the sums).
    let out = decide(&[2.0, 1.0, 1.0], &[1.0, 2.0, 1.0], 0.001);
    let d: Vec<Decision> = out.iter().map(|o| o.3).collect();
    assert_eq!(d, [Decision::Safety, Decision::Expert, Decision::Blend]);
    // |d| exactly equal to tau blends; just below it decides.
    let d = decide(&[0.75, 0.25], &[0.5, 0.5], 0.0)[0].2;
    assert_eq!(decide(&[0.75, 0.25], &[0.5, 0.5], d)[0].3, Decision::Blend);
    assert_eq!(decide(&[0.75, 0.25], &[0.5, 0.5], d)[1].3, Decision::Blend);
    assert_eq!(
        decide(&[0.75, 0.25], &[0.5, 0.5], d * 0.999)[0].3,
        Decision::Safety
    );
    let big = decide(&[0.75, 0.25], &[0.5, 0.5], 1.0);
    assert!(big.iter().all(|o| o.3 == Decision::Blend));
    // tau = 0: any nonzero d decides, zero d blends.
    let zero = decide(&[1.0, 1.0], &[1.0, 1.0], 0.0);
    assert!(zero.iter().all(|o| o.3 == Decision::Blend));
}

#[test]
fn all_zero_scores_blend() {
    let out = decide(&[0.0; 4], &[0.0; 4], 0.001);
    assert!(out.iter().all(|o| o.0 == 0.0 && o.3 == Decision::Blend));
}

fn unit(layer: usize, decision: Decision, alpha: Option<f64>) -> UnitDecision {
    UnitDecision {
        unit: Unit { layer, part: None },
        score_safety: 0.0,
        score_expert: 0.0,
        p_safety: 0.0,
        p_expert: 0.0,
        d: 0.0,
        decision,
        alpha,
        source: Source::Override,
    }
}

fn plan_of(units: Vec<UnitDecision>) -> Plan {
    let options = MergeOptions {
        alpha: 0.5,
        ..MergeOptions::default()
    };
    Plan {
        options,
        layout: "llama".into(),
        n_layers: units.len(),
        units,
        stats: vec![],
    }
}

#[test]
fn a_unit_blends_with_its_own_weight_and_its_norms_follow_it() {
    let plan = plan_of(vec![
        unit(0, Decision::Blend, Some(0.25)),
        unit(1, Decision::Blend, None),
        unit(2, Decision::Safety, Some(0.9)),
    ]);
    plan.check().unwrap();
    let at = |layer, part| {
        plan.decision_at(Place::Layer {
            layer,
            part,
            target: false,
        })
    };
    assert_eq!(at(0, Part::Attention), (Decision::Blend, 0.25));
    assert_eq!(at(0, Part::Norm), (Decision::Blend, 0.25));
    assert_eq!(at(1, Part::Mlp), (Decision::Blend, 0.5));
    assert_eq!(at(2, Part::Mlp).0, Decision::Safety);
    assert_eq!(plan.decision_at(Place::Outside), (Decision::Blend, 0.5));
}

#[test]
fn a_plan_from_elsewhere_is_checked() {
    assert!(plan_of(vec![unit(0, Decision::Blend, Some(1.5))])
        .check()
        .is_err());
    assert!(plan_of(vec![unit(0, Decision::Blend, Some(f64::NAN))])
        .check()
        .is_err());
    let mut short = plan_of(vec![
        unit(0, Decision::Expert, None),
        unit(1, Decision::Expert, None),
    ]);
    short.n_layers = 3;
    assert!(short.check().is_err());
    let swapped = plan_of(vec![
        unit(1, Decision::Expert, None),
        unit(0, Decision::Expert, None),
    ]);
    assert!(swapped.check().is_err());
}

#[test]
fn in_module_granularity_a_layers_norms_keep_the_runs_weight() {
    let mut attention = unit(0, Decision::Blend, Some(0.25));
    attention.unit = Unit {
        layer: 0,
        part: Some(Part::Attention),
    };
    let mut mlp = unit(0, Decision::Blend, Some(0.75));
    mlp.unit = Unit {
        layer: 0,
        part: Some(Part::Mlp),
    };
    let mut plan = plan_of(vec![attention, mlp]);
    plan.n_layers = 1;
    plan.options.granularity = layerswap_fast::Granularity::Module;
    plan.options.norms = Decision::Blend;
    plan.check().unwrap();
    let at = |part| {
        plan.decision_at(Place::Layer {
            layer: 0,
            part,
            target: true,
        })
    };
    assert_eq!(at(Part::Attention), (Decision::Blend, 0.25));
    assert_eq!(at(Part::Mlp), (Decision::Blend, 0.75));
    assert_eq!(at(Part::Norm), (Decision::Blend, 0.5));
}
