use layerswap_fast::dtype::Dtype;
use layerswap_fast::io::Model;
use layerswap_fast::progress::Progress;
use layerswap_fast::Decision;
use layerswap_fast::{open, Error, Granularity, MergeOptions};

use crate::common::write_trio;

#[test]
fn planted_layers_are_found_and_output_copies_are_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let [b, s, m] = write_trio(
        dir.path(),
        4,
        Dtype::BF16,
        &[0.1, 0.1, 3.0, 3.0],
        &[3.0, 3.0, 0.1, 0.1],
    );
    let session = open(&b, &s, &[m.as_path()], None, None).unwrap();
    let options = MergeOptions {
        threads: 2,
        ..Default::default()
    };
    let plans = session.analyze(&options, &Progress::default()).unwrap();
    let d: Vec<Decision> = plans[0].units.iter().map(|u| u.decision).collect();
    assert_eq!(
        d,
        [
            Decision::Expert,
            Decision::Expert,
            Decision::Safety,
            Decision::Safety
        ]
    );
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    session
        .write(0, &plans[0], &out, true, &Progress::default())
        .unwrap();
    let merged = Model::open(&out).unwrap();
    let read = |model: &Model, name: &str| {
        let t = model.tensor(name).unwrap();
        let mut buf = vec![0u8; t.nbytes as usize];
        model.shard_of(t).read_at(t.offset, &mut buf).unwrap();
        buf
    };
    let (sm, mm) = (Model::open(&s).unwrap(), Model::open(&m).unwrap());
    assert_eq!(
        read(&merged, "model.layers.3.mlp.up_proj.weight"),
        read(&sm, "model.layers.3.mlp.up_proj.weight")
    );
    assert_eq!(
        read(&merged, "model.layers.0.input_layernorm.weight"),
        read(&mm, "model.layers.0.input_layernorm.weight")
    );
    assert_eq!(merged.tensors.len(), mm.tensors.len());
}

#[test]
fn module_granularity_has_two_units_per_layer() {
    let dir = tempfile::tempdir().unwrap();
    let [b, s, m] = write_trio(dir.path(), 3, Dtype::F32, &[1.0; 3], &[1.0; 3]);
    let session = open(&b, &s, &[m.as_path()], None, None).unwrap();
    let options = MergeOptions {
        granularity: Granularity::Module,
        ..Default::default()
    };
    let plans = session.analyze(&options, &Progress::default()).unwrap();
    assert_eq!(plans[0].units.len(), 6);
}

#[test]
fn mismatched_shapes_name_the_tensor_and_models() {
    let dir = tempfile::tempdir().unwrap();
    let [b, s, _] = write_trio(dir.path(), 2, Dtype::BF16, &[1.0; 2], &[1.0; 2]);
    let other = tempfile::tempdir().unwrap();
    let [_, _, m] = write_trio(other.path(), 2, Dtype::F32, &[1.0; 2], &[1.0; 2]);
    let err = open(&b, &s, &[m.as_path()], None, None).unwrap_err();
    assert!(matches!(err, Error::Incompatible { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("BF16") && msg.contains("F32") && msg.contains("tensor '"),
        "{msg}"
    );
}

#[test]
fn unknown_layout_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    crate::common::write_file(
        &p,
        &[("encoder.foo.weight".into(), vec![2], vec![1.0, 2.0])],
        Dtype::F32,
    );
    let err = open(&p, &p, &[p.as_path()], None, None).unwrap_err();
    assert!(err.to_string().contains("unknown model layout"), "{err}");
}

/// A pass split into shares (B + S, B + each expert), as the Ray executor runs it, gives the same
/// sums bit for bit and the same plans as one pass over everything; shares from another base model
/// are refused by name.
#[test]
fn sums_in_shares_equal_one_pass() {
    use layerswap_fast::Measured;
    let dir = tempfile::tempdir().unwrap();
    let [b, s, m] = write_trio(
        dir.path(),
        4,
        Dtype::BF16,
        &[0.1, 0.1, 3.0, 3.0],
        &[3.0, 3.0, 0.1, 0.1],
    );
    let other = tempfile::tempdir().unwrap();
    let [_, _, m2] = write_trio(
        other.path(),
        4,
        Dtype::BF16,
        &[0.1, 2.0, 0.1, 3.0],
        &[1.0, 0.1, 3.0, 0.1],
    );
    for numerics in [
        layerswap_fast::Numerics::Exact,
        layerswap_fast::Numerics::Official,
    ] {
        let session = open(&b, &s, &[m.as_path(), m2.as_path()], None, None).unwrap();
        let options = [
            MergeOptions {
                threads: 2,
                numerics,
                ..Default::default()
            },
            MergeOptions {
                threads: 2,
                numerics,
                granularity: Granularity::Module,
                ..Default::default()
            },
        ];
        let plans = session
            .analyze_each(&options, None, &Progress::default())
            .unwrap();
        // Each share on its own session, as on another node, and with another chunk size.
        let small = MergeOptions {
            threads: 1,
            max_memory: 65 << 20,
            numerics,
            ..Default::default()
        };
        let s_share = open(&b, &s, &[m.as_path()], None, None)
            .unwrap()
            .sums_of(Measured::Safety, &small, &Progress::default())
            .unwrap();
        let shares: Vec<_> = [&m, &m2]
            .iter()
            .map(|x| {
                open(&b, &s, &[x.as_path()], None, None)
                    .unwrap()
                    .sums_of(Measured::Expert(0), &small, &Progress::default())
                    .unwrap()
            })
            .collect();
        let from_shares = session.plans_from_shares(&options, &s_share, &shares).unwrap();
        // Same bits in every sum, hence the same plans.
        assert_eq!(
            serde_json::to_string(&from_shares).unwrap(),
            serde_json::to_string(&plans).unwrap()
        );
        // A share computed against another base model does not fit.
        let mut wrong = shares.clone();
        wrong[1][3].base_ss *= 1.0 + f64::EPSILON;
        let err = session
            .plans_from_shares(&options, &s_share, &wrong)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("same base model") && err.contains(&wrong[1][3].name),
            "{err}"
        );
    }
}
