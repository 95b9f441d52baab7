//! Hostile input: property tests that throw random and mutated headers, files and index files at the
//! parsers (they must return an error or a model whose invariants hold, never panic or abort), and
//! targeted tests for non-finite values and files that change during a run.
//!
//! Cases per property: 2 000 by default (500 for those that write files); `PROPTEST_CASES=200000 cargo test --release hostile` for a
//! long run. The coverage-guided fuzzers in `fuzz/` cover the same entry points.

use std::collections::BTreeMap;
use std::path::Path;

use layerswap_fast::analyze::sums::{compute, compute_allowing};
use layerswap_fast::budget::{Budget, BufferPool};
use layerswap_fast::dtype::{AlignedBuf, Dtype};
use layerswap_fast::io::header::encode_header;
use layerswap_fast::io::{Header, Model, Shard};
use layerswap_fast::layout::Layout;
use layerswap_fast::progress::Progress;
use layerswap_fast::write::all_finite;
use layerswap_fast::{Error, Numerics};
use proptest::prelude::*;

use crate::common::{values, write_file};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// A valid header + data section for up to 6 tensors of random dtype and shape.
fn valid_file() -> impl Strategy<Value = (Vec<(String, Dtype, Vec<u64>, u64, u64)>, Vec<u8>)> {
    let dtype = prop_oneof![
        Just(Dtype::BF16),
        Just(Dtype::F16),
        Just(Dtype::F32),
        Just(Dtype::F64)
    ];
    let names = prop_oneof![
        Just("model.layers.0.self_attn.q_proj.weight".to_string()),
        Just("model.layers.1.mlp.up_proj.weight".to_string()),
        Just("model.embed_tokens.weight".to_string()),
        "[a-z.0-9]{1,12}",
    ];
    prop::collection::vec((names, dtype, prop::collection::vec(0u64..5, 0..3)), 0..6).prop_map(|specs| {
        let mut entries = vec![];
        let mut pos = 0u64;
        let mut seen = std::collections::HashSet::new();
        for (name, dtype, shape) in specs {
            if name == "__metadata__" || !seen.insert(name.clone()) {
                continue;
            }
            let n = shape.iter().product::<u64>() * dtype.size() as u64;
            entries.push((name, dtype, shape, pos, pos + n));
            pos += n;
        }
        (entries, vec![0x3fu8; pos as usize])
    })
}

/// One way to damage a file, applied at `at` (a byte position or tensor index, modulo the size).
#[derive(Debug, Clone)]
enum Damage {
    FlipByte(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
    Insert(usize, Vec<u8>),
    SetPrefix(u64),
    ReplaceText(&'static str, &'static str),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Damage::FlipByte(a, b)),
        any::<usize>().prop_map(Damage::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(a, b)| Damage::Insert(a, b)),
        prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 40), 0u64..4096].prop_map(Damage::SetPrefix),
        prop_oneof![
            Just(("\"BF16\"", "\"I8\"")),
            Just(("\"F32\"", "\"F16\"")),
            Just(("\"shape\":[", "\"shape\":[4294967296,4294967296,")),
            Just(("\"shape\":[", "\"shape\":[-1,")),
            Just(("\"data_offsets\":[", "\"data_offsets\":[1,")),
            Just(("\"data_offsets\":[", "\"data_offsets\":[18446744073709551615,")),
            Just(("]}", "]},\"model.layers.0.self_attn.q_proj.weight\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}")),
            Just(("model.layers.0", "model.layers.99999999999999")),
            Just(("model.layers.1", "model.layers.4294967296")),
            Just(("{\"__metadata__\":{", "{\"__metadata__\":[{")),
            Just(("\"pt\"", "7")),
        ]
        .prop_map(|(a, b)| Damage::ReplaceText(a, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, d: &Damage) {
    match d {
        Damage::FlipByte(at, b) if !bytes.is_empty() => {
            let i = at % bytes.len();
            bytes[i] ^= b | 1;
        }
        Damage::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
        Damage::Append(tail) => bytes.extend(tail),
        Damage::Insert(at, junk) => {
            let i = at % (bytes.len() + 1);
            drop(bytes.splice(i..i, junk.iter().copied()));
        }
        Damage::SetPrefix(n) if bytes.len() >= 8 => bytes[..8].copy_from_slice(&n.to_le_bytes()),
        Damage::ReplaceText(from, to) => {
            let text = String::from_utf8_lossy(bytes).into_owned();
            if text.contains(from) && std::str::from_utf8(bytes).is_ok() {
                *bytes = text.replacen(from, to, 1).into_bytes();
            } else if let Some(i) = bytes.windows(from.len()).position(|w| w == from.as_bytes()) {
                drop(bytes.splice(i..i + from.len(), to.bytes()));
            }
        }
        _ => {}
    }
}

fn file_bytes(entries: &[(String, Dtype, Vec<u64>, u64, u64)], data: &[u8]) -> Vec<u8> {
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut out = encode_header(entries, &meta);
    out.extend_from_slice(data);
    out
}

/// What a successfully opened file must satisfy: contiguous in-bounds ranges whose sizes match the
/// shapes, every one of them readable.
fn check_shard(shard: &Shard) {
    let h = &shard.header;
    let mut pos = 0;
    for t in &h.tensors {
        assert_eq!(t.start, pos);
        assert_eq!(t.numel() * t.dtype.size() as u64, t.nbytes());
        pos = t.end;
        let mut buf = vec![0u8; t.nbytes() as usize];
        shard.read_at(h.data_start() + t.start, &mut buf).unwrap();
    }
    assert_eq!(h.data_start() + pos, shard.len);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes as a header's JSON, against any data length.
    #[test]
    fn header_parse_of_random_bytes_never_panics(json in prop::collection::vec(any::<u8>(), 0..300), data_len in any::<u64>()) {
        let _ = Header::parse(&json, data_len);
    }

    /// Random JSON-ish text built from header tokens (reaches deeper than random bytes).
    #[test]
    fn header_parse_of_token_soup_never_panics(
        tokens in prop::collection::vec(prop_oneof![
            Just("{"), Just("}"), Just("["), Just("]"), Just(","), Just(":"), Just("\"dtype\""), Just("\"shape\""),
            Just("\"data_offsets\""), Just("\"__metadata__\""), Just("\"BF16\""), Just("\"F64\""), Just("\"x\""),
            Just("0"), Just("8"), Just("-1"), Just("1e30"), Just("18446744073709551615"), Just("null"), Just("true"),
        ], 0..60),
        data_len in 0u64..64,
    ) {
        let _ = Header::parse(tokens.concat().as_bytes(), data_len);
    }

}

proptest! {
    // These write files: a quarter of the cases.
    #![proptest_config(ProptestConfig { cases: (cases() / 4).max(1), failure_persistence: None, ..ProptestConfig::default() })]

    /// A valid file with one to three kinds of damage, opened as the engine opens files.
    #[test]
    fn damaged_files_open_cleanly_or_fail_with_an_error((entries, data) in valid_file(), damages in prop::collection::vec(damage(), 1..4)) {
        let mut bytes = file_bytes(&entries, &data);
        for d in &damages {
            apply(&mut bytes, d);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        match Shard::open(&path) {
            Ok(shard) => check_shard(&shard),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("model.safetensors"), "error does not name the file: {msg}");
                prop_assert!(!msg.contains('\n'), "error is not one line: {msg}");
            }
        }
        // The whole model path too: folder discovery and layout detection on whatever opened.
        if let Ok(model) = Model::open(dir.path()) {
            let names: Vec<&str> = model.tensors.keys().map(std::string::String::as_str).collect();
            let _ = Layout::detect(&names, None, None);
        }
    }

    /// An index.json of random entries (names, shard files, duplicates, escapes) next to two shards.
    #[test]
    fn random_index_files_open_cleanly_or_fail_with_an_error(
        entries in prop::collection::vec((
            prop_oneof![Just("a"), Just("b"), Just("c"), Just("d"), Just("e"), Just("__metadata__")],
            prop_oneof![Just("\"s1.safetensors\""), Just("\"s2.safetensors\""), Just("\"s3.safetensors\""),
                        Just("\"../s1.safetensors\""), Just("\"\""), Just("\".\""), Just("1"), Just("null"), Just("[]")],
        ), 0..8),
        wrap in prop_oneof![Just(0u8), Just(1), Just(2)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_file(&dir.path().join("s1.safetensors"), &[("a".into(), vec![2], vec![1.0, 2.0]), ("b".into(), vec![1], vec![3.0])], Dtype::F32);
        write_file(&dir.path().join("s2.safetensors"), &[("c".into(), vec![1], vec![4.0]), ("d".into(), vec![], vec![5.0])], Dtype::F32);
        let body: Vec<String> = entries.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let text = match wrap {
            0 => format!("{{\"metadata\":{{}},\"weight_map\":{{{}}}}}", body.join(",")),
            1 => format!("{{\"weight_map\":[{}]}}", body.join(",")),
            _ => format!("{{{}}}", body.join(",")),
        };
        std::fs::write(dir.path().join("model.safetensors.index.json"), text).unwrap();
        match Model::open(dir.path()) {
            Ok(model) => {
                // Opened: the index named exactly the tensors of the shards it lists.
                let names: Vec<&str> = model.tensors.keys().map(std::string::String::as_str).collect();
                prop_assert!(names == ["a", "b"] || names == ["c", "d"] || names == ["a", "b", "c", "d"], "{names:?}");
            }
            Err(e) => prop_assert!(e.to_string().contains("safetensors"), "{e}"),
        }
    }
}

#[test]
fn layer_index_far_beyond_the_tensor_count_is_an_error_not_an_abort() {
    for index in ["1000000000000", "18446744073709551615", "4294967296"] {
        let names = [
            format!("model.layers.{index}.self_attn.q_proj.weight"),
            format!("model.layers.{index}.mlp.up_proj.weight"),
        ];
        let refs: Vec<&str> = names.iter().map(std::string::String::as_str).collect();
        assert!(Layout::detect(&refs, None, None).is_err());
        assert!(Layout::detect(&refs, Some("LlamaForCausalLM"), None).is_err());
    }
}

fn aligned(bytes: &[u8]) -> AlignedBuf {
    let mut buf = AlignedBuf::new(bytes.len());
    buf.bytes_mut(bytes.len()).copy_from_slice(bytes);
    buf
}

#[test]
fn all_finite_sees_every_nan_and_inf_and_nothing_else() {
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let fine = [0.0f32, -0.0, 1.0, -65504.0, 1e-40, f32::MIN_POSITIVE, 6.0e-8];
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64] {
        for n in [1usize, 7, 64, 1000] {
            let ok: Vec<f32> = (0..n).map(|i| fine[i % fine.len()]).collect();
            let bytes = crate::common::encode(&ok, dtype);
            let buf = aligned(&bytes);
            assert!(all_finite(dtype, buf.bytes(bytes.len())), "{dtype:?} {n}");
            for s in specials {
                for at in [0, n / 2, n - 1] {
                    let mut bad = ok.clone();
                    bad[at] = s;
                    let bytes = crate::common::encode(&bad, dtype);
                    let buf = aligned(&bytes);
                    assert!(
                        !all_finite(dtype, buf.bytes(bytes.len())),
                        "{dtype:?} {s} at {at} of {n}"
                    );
                }
            }
        }
    }
    // F16 overflows to Inf at 65520 and beyond; that is an Inf, and found.
    let bytes = crate::common::encode(&[70000.0], Dtype::F16);
    assert!(!all_finite(Dtype::F16, aligned(&bytes).bytes(2)));
}

fn open_three(dir: &Path, poison: Option<(usize, usize, f32)>) -> Vec<Model> {
    let n = 3 * 1000 + 17;
    for i in 0..3 {
        let mut v = values(n, i as u64 + 1, 0.1);
        if let Some((model, at, value)) = poison {
            if model == i {
                v[at] = value;
            }
        }
        write_file(
            &dir.join(format!("{i}.safetensors")),
            &[("w".to_string(), vec![n as u64], v)],
            Dtype::BF16,
        );
    }
    (0..3)
        .map(|i| Model::open(&dir.join(format!("{i}.safetensors"))).unwrap())
        .collect()
}

fn stats_of(
    models: &[Model],
    allow: bool,
) -> layerswap_fast::Result<Vec<layerswap_fast::analyze::sums::Sums>> {
    let budget = Budget::plan(1 << 30, 1, 3, 2).unwrap();
    let pool = BufferPool::new(&budget);
    let p = Progress::default();
    let rayon = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    rayon.install(|| {
        compute_allowing(
            &["w"],
            &models[0],
            &[&models[1], &models[2]],
            Numerics::Exact,
            allow,
            1 << 16,
            &pool,
            &p,
        )
    })
}

#[test]
fn non_finite_values_are_refused_or_left_out_of_the_sums() {
    let dir = tempfile::tempdir().unwrap();
    let clean = open_three(dir.path(), None);
    let reference = stats_of(&clean, false).unwrap();
    drop(clean);
    for (model, value) in [(0usize, f32::NAN), (1, f32::INFINITY), (2, f32::NEG_INFINITY)] {
        let dir = tempfile::tempdir().unwrap();
        let models = open_three(dir.path(), Some((model, 1234, value)));
        match stats_of(&models, false) {
            Err(Error::NonFinite { path, tensor }) => {
                assert_eq!(tensor, "w");
                assert_eq!(path, dir.path().join(format!("{model}.safetensors")));
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        // Allowed: every sum is finite and equals the clean sums minus element 1234's terms.
        let got = stats_of(&models, true).unwrap();
        let s = &got[0];
        assert!(s.base_ss.is_finite() && s.diff_ss.iter().all(|v| v.is_finite()));
        let b = values(3017, 1, 0.1);
        let x = [values(3017, 2, 0.1), values(3017, 3, 0.1)];
        let bf = |v: f32| {
            f64::from(layerswap_fast::dtype::bf16_to_f32(
                layerswap_fast::dtype::f32_to_bf16(v),
            ))
        };
        let (b0, x0) = (bf(b[1234]), [bf(x[0][1234]), bf(x[1][1234])]);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-300);
        if model == 0 {
            assert!(close(s.base_ss, reference[0].base_ss - b0 * b0));
            for k in 0..2 {
                assert!(close(
                    s.diff_ss[k],
                    reference[0].diff_ss[k] - (x0[k] - b0).powi(2)
                ));
            }
        } else {
            assert_eq!(
                s.base_ss, reference[0].base_ss,
                "B is clean: its sum keeps the fast path's bits"
            );
            let k = model - 1;
            assert!(close(
                s.diff_ss[k],
                reference[0].diff_ss[k] - (x0[k] - b0).powi(2)
            ));
            assert_eq!(s.diff_ss[1 - k], reference[0].diff_ss[1 - k]);
        }
    }
    // `compute` (no opt-in) refuses.
    let dir = tempfile::tempdir().unwrap();
    let models = open_three(dir.path(), Some((1, 0, f32::NAN)));
    let budget = Budget::plan(1 << 30, 1, 3, 2).unwrap();
    let pool = BufferPool::new(&budget);
    let r = compute(
        &["w"],
        &models[0],
        &[&models[1], &models[2]],
        Numerics::Exact,
        1 << 16,
        &pool,
        &Progress::default(),
    );
    assert!(matches!(r, Err(Error::NonFinite { .. })));
}

#[test]
fn files_that_change_after_opening_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let write = || {
        write_file(
            &path,
            &[("w".to_string(), vec![64], values(64, 1, 1.0))],
            Dtype::F32,
        );
    };
    write();
    let model = Model::open(&path).unwrap();
    model.check_unchanged().unwrap();

    // Truncated: reads past the end fail with an error naming the file; the check fails too.
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let t = model.tensor("w").unwrap();
    let mut buf = vec![0u8; t.nbytes as usize];
    let err = model
        .shard_of(t)
        .read_at(t.offset, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("m.safetensors") && err.contains("truncated"),
        "{err}"
    );
    assert!(model.check_unchanged().is_err());
    drop(model);

    // Rewritten in place with the same size (mtime moves on).
    write();
    let model = Model::open(&path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0u8; 4], len - 4).unwrap();
    }
    let err = model.check_unchanged().unwrap_err().to_string();
    assert!(
        err.contains("m.safetensors") && err.contains("changed or replaced"),
        "{err}"
    );
    drop(model);

    // Replaced by a rename: the open file is intact but no longer the one at the path.
    write();
    let model = Model::open(&path).unwrap();
    let other = dir.path().join("other");
    std::fs::copy(&path, &other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    assert!(model.check_unchanged().is_err());
}

#[test]
fn custom_layout_whose_index_group_does_not_take_part_is_an_error_not_a_panic() {
    let llama = layerswap_fast::layout::BUILTIN_LAYOUTS
        .iter()
        .find(|(n, _)| *n == "llama")
        .unwrap()
        .1;
    let mut def: serde_json::Value = serde_json::from_str(llama).unwrap();
    def["layer"] = r"^model\.(?:layers\.(\d+)|embed_tokens)\.".into();
    let def = layerswap_fast::layout::LayoutDef::from_json(&def.to_string()).unwrap();
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ];
    let err = Layout::detect(&names, None, Some(&def)).unwrap_err().to_string();
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("group"),
        "{err}"
    );
}

#[test]
fn a_fifo_posing_as_a_shard_is_refused_instead_of_blocking_forever() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model-00001-of-00001.safetensors");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: plain syscall with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dir.path().to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Model::open(&path).map(|_| ()).map_err(|e| e.to_string()));
    });
    let outcome = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("opening a FIFO blocked");
    let err = outcome.unwrap_err();
    assert!(
        err.contains("model-00001-of-00001.safetensors") && err.contains("not a regular file"),
        "{err}"
    );
}

#[test]
fn absurd_thread_counts_are_refused_by_the_engine_too() {
    let options = layerswap_fast::MergeOptions {
        threads: 1 << 62,
        ..Default::default()
    };
    let err = options.validate().unwrap_err().to_string();
    assert!(err.contains("threads must be at most"), "{err}");
}

#[test]
fn a_huge_index_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        &dir.path().join("s1.safetensors"),
        &[("a".into(), vec![1], vec![1.0])],
        Dtype::F32,
    );
    let index = std::fs::File::create(dir.path().join("model.safetensors.index.json")).unwrap();
    index.set_len(1 << 40).unwrap(); // sparse: a terabyte that takes no disk
    let err = Model::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("limit"),
        "{err}"
    );
}

/// Which files of a folder are the model: without an index, Hugging Face shard names only; other
/// .safetensors files beside them (Mistral's consolidated file, a PEFT adapter) are never read.
#[test]
fn only_hugging_face_shard_names_are_the_model_without_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(
        &d.join("model-00001-of-00002.safetensors"),
        &[("a".into(), vec![1], vec![1.0])],
        Dtype::F32,
    );
    write_file(
        &d.join("model-00002-of-00002.safetensors"),
        &[("b".into(), vec![1], vec![2.0])],
        Dtype::F32,
    );
    write_file(
        &d.join("consolidated.safetensors"),
        &[("c".into(), vec![1], vec![3.0])],
        Dtype::F32,
    );
    write_file(
        &d.join("adapter_model.safetensors"),
        &[("base_model.lora_A".into(), vec![1], vec![4.0])],
        Dtype::F32,
    );
    let model = Model::open(d).unwrap();
    assert_eq!(
        model
            .tensors
            .keys()
            .map(std::string::String::as_str)
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    // One shard of the set missing: an error naming the set, not a model with half its tensors.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Model::open(d).unwrap_err().to_string();
    assert!(err.contains("1 of the 2 shards"), "{err}");
    // Nothing but foreign files: an error (their tensors are never taken).
    std::fs::remove_file(d.join("model-00001-of-00002.safetensors")).unwrap();
    let err = Model::open(d).unwrap_err().to_string();
    assert!(err.contains("no shard named like"), "{err}");
}

#[test]
fn a_model_safetensors_and_an_index_naming_other_shards_disagree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(
        &d.join("model.safetensors"),
        &[("old".into(), vec![1], vec![1.0])],
        Dtype::F32,
    );
    write_file(
        &d.join("model-00001-of-00001.safetensors"),
        &[("a".into(), vec![1], vec![1.0])],
        Dtype::F32,
    );
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    let err = Model::open(d).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors and model.safetensors.index.json disagree"),
        "{err}"
    );
    // An index that names model.safetensors itself agrees with it.
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"old": "model.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(Model::open(d).unwrap().tensors.len(), 1);
}
