use layerswap_fast::analyze::plan::{decide, Decision};
use layerswap_fast::analyze::score::{norm, relative_change};
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
    assert_eq!(n, 1.4140625); // sqrt(2) in bf16
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
    assert_eq!(decide(&[0.75, 0.25], &[0.5, 0.5], d * 0.999)[0].3, Decision::Safety);
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
