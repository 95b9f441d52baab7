//! Models in memory (state dicts) beside files: the same plans and the same output bytes, read in
//! place and written into the caller's buffers.

use layerswap_fast::dtype::Dtype;
use layerswap_fast::expert::Expert;
use layerswap_fast::io::{MemoryRegion, Model};
use layerswap_fast::open::from_models;
use layerswap_fast::progress::Progress;
use layerswap_fast::{open, Error, Granularity, MergeOptions};

use crate::common::write_trio;

/// Every tensor of a file model, copied into its own heap buffer (u64 words, so aligned like a
/// torch or numpy allocation) from byte `offset` on.
fn load(model: &Model, offset: usize) -> Vec<(String, Dtype, Vec<u64>, Vec<u64>)> {
    model
        .tensors
        .iter()
        .map(|(name, t)| {
            let mut words = vec![0u64; (t.nbytes as usize + offset).div_ceil(8)];
            // SAFETY: u64 storage viewed as bytes, within its length.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>().add(offset), t.nbytes as usize)
            };
            model.shard_of(t).read_at(t.offset, bytes).unwrap();
            (name.clone(), t.dtype, t.shape.clone(), words)
        })
        .collect()
}

fn full(e: &Expert) -> &Model {
    match e {
        Expert::Full(m) => m,
        Expert::Lora { .. } => panic!("a full model was opened"),
    }
}

fn in_memory(label: &str, tensors: &mut [(String, Dtype, Vec<u64>, Vec<u64>)], offset: usize) -> Model {
    let entries = tensors
        .iter_mut()
        .map(|(name, dtype, shape, words)| {
            let len = shape.iter().product::<u64>() as usize * dtype.size();
            // SAFETY: the buffers outlive the model (they live until the end of the test) and are
            // not written meanwhile; `offset` stays within the allocation (len + offset <= 8 * words).
            let region = unsafe { MemoryRegion::new(words.as_mut_ptr().cast::<u8>().add(offset), len) };
            (name.clone(), *dtype, shape.clone(), region)
        })
        .collect();
    Model::from_memory(std::path::Path::new(label), entries).unwrap()
}

#[test]
fn memory_models_give_the_file_plan_and_bytes() {
    for (dtype, granularity) in [
        (Dtype::BF16, Granularity::Layer),
        (Dtype::F16, Granularity::Module),
        (Dtype::F32, Granularity::Layer),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let [b, s, m] = write_trio(dir.path(), 4, dtype, &[0.1, 1.0, 3.0, 3.0], &[3.0, 1.0, 0.1, 0.1]);
        let options = MergeOptions {
            granularity,
            threads: 2,
            max_memory: 66 << 20,
            ..Default::default()
        };
        let files = open(&b, &s, &[m.as_path()], None, None).unwrap();
        let plan = files.analyze(&options, &Progress::default()).unwrap().remove(0);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        files.write(0, &plan, &out, false, &Progress::default()).unwrap();
        let written = Model::open(&out).unwrap();

        // The expert's F32 tensors start 2 bytes into their buffers: misaligned, so the engine must
        // take its copying path there and still give the same bytes.
        let offset = if dtype == Dtype::F32 { 2 } else { 0 };
        let (mut tb, mut ts, mut tm) = (
            load(&files.base, 0),
            load(full(&files.safety), 0),
            load(full(&files.experts[0]), offset),
        );
        let memory = from_models(
            in_memory("base state dict", &mut tb, 0),
            in_memory("safety state dict", &mut ts, 0),
            vec![in_memory("expert state dict", &mut tm, offset)],
            None,
            None,
        )
        .unwrap();
        let mem_plan = memory.analyze(&options, &Progress::default()).unwrap().remove(0);
        assert_eq!(
            serde_json::to_value(&mem_plan).unwrap(),
            serde_json::to_value(&plan).unwrap(),
            "{dtype:?}"
        );

        let outputs = memory.outputs(0, &mem_plan).unwrap();
        let mut buffers: Vec<Vec<u8>> = outputs
            .iter()
            .map(|(_, d, shape)| vec![0xAB; shape.iter().product::<u64>() as usize * d.size()])
            .collect();
        // SAFETY: each buffer lives until the end of the test and is only written by the engine.
        let regions = buffers
            .iter_mut()
            .map(|b| unsafe { MemoryRegion::new(b.as_mut_ptr(), b.len()) })
            .collect();
        let summary = memory
            .write_memory(0, &mem_plan, regions, &Progress::default())
            .unwrap();
        assert!(summary.files.is_empty());
        assert_eq!(outputs.len(), written.tensors.len());
        for ((name, _, _), got) in outputs.iter().zip(&buffers) {
            let t = written.tensor(name).unwrap();
            let mut want = vec![0u8; t.nbytes as usize];
            written.shard_of(t).read_at(t.offset, &mut want).unwrap();
            assert!(*got == want, "{name} differs ({dtype:?})");
        }
    }
}

#[test]
fn memory_models_refuse_what_files_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let [b, s, m] = write_trio(dir.path(), 2, Dtype::BF16, &[1.0; 2], &[1.0; 2]);
    let files = open(&b, &s, &[m.as_path()], None, None).unwrap();
    let (mut tb, mut ts, mut tm) = (
        load(&files.base, 0),
        load(full(&files.safety), 0),
        load(full(&files.experts[0]), 0),
    );
    ts.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
    let err = from_models(
        in_memory("base state dict", &mut tb, 0),
        in_memory("safety state dict", &mut ts, 0),
        vec![in_memory("expert state dict", &mut tm, 0)],
        None,
        None,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Incompatible { .. }), "{msg}");
    assert!(
        msg.contains("'model.layers.1.mlp.up_proj.weight'") && msg.contains("safety state dict"),
        "{msg}"
    );

    // A buffer of the wrong size for its dtype and shape.
    let (name, dtype, shape, words) = &mut tb[0];
    // SAFETY: one byte short of the tensor, inside the buffer.
    let region = unsafe {
        MemoryRegion::new(
            words.as_mut_ptr().cast::<u8>(),
            shape.iter().product::<u64>() as usize * dtype.size() - 1,
        )
    };
    let err = Model::from_memory(
        std::path::Path::new("base state dict"),
        vec![(name.clone(), *dtype, shape.clone(), region)],
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("base state dict: tensor '"), "{err}");

    // Output buffers of the wrong size are refused before anything is written.
    let (mut tb, mut ts, mut tm) = (
        load(&files.base, 0),
        load(full(&files.safety), 0),
        load(full(&files.experts[0]), 0),
    );
    let memory = from_models(
        in_memory("base state dict", &mut tb, 0),
        in_memory("safety state dict", &mut ts, 0),
        vec![in_memory("expert state dict", &mut tm, 0)],
        None,
        None,
    )
    .unwrap();
    let plan = memory
        .analyze(&MergeOptions::default(), &Progress::default())
        .unwrap()
        .remove(0);
    let outputs = memory.outputs(0, &plan).unwrap();
    let mut buffers: Vec<Vec<u8>> = outputs.iter().map(|_| vec![0u8; 4]).collect();
    // SAFETY: as above.
    let regions = buffers
        .iter_mut()
        .map(|b| unsafe { MemoryRegion::new(b.as_mut_ptr(), b.len()) })
        .collect();
    let err = memory
        .write_memory(0, &plan, regions, &Progress::default())
        .unwrap_err();
    assert!(err.to_string().contains("output buffer for tensor"), "{err}");
}
