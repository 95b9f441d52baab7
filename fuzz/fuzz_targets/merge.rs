//! The whole engine on one arbitrary safetensors file used as base, safety expert and language expert:
//! open, check, statistics, plan and write. The first byte picks the options. Must end in Ok or an
//! error, never a panic or an abort (zero-sized, scalar and NaN tensors, odd names and dtypes...).
#![no_main]

use layerswap_fast::dtype::Dtype;
use layerswap_fast::progress::Progress;
use layerswap_fast::{open, Granularity, MergeOptions, Numerics};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, file)) = data.split_first() else { return };
    let dir = std::env::temp_dir().join(format!("lsf-fuzz-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, file).unwrap();
    let Ok(session) = open(&path, &path, &[path.as_path()], None, None) else { return };
    let options = MergeOptions {
        granularity: if knobs & 1 == 0 { Granularity::Layer } else { Granularity::Module },
        numerics: if knobs & 2 == 0 { Numerics::Exact } else { Numerics::Official },
        allow_non_finite: knobs & 4 != 0,
        out_dtype: [None, Some(Dtype::BF16), Some(Dtype::F32), Some(Dtype::F64)][(knobs >> 3 & 3) as usize],
        tau: [0.0, 0.001, 0.5, 1e300][(knobs >> 5 & 3) as usize],
        max_memory: 65 << 20,
        threads: 1,
        shard_size: if knobs & 128 == 0 { 5_000_000_000 } else { 64 },
        ..MergeOptions::default()
    };
    let progress = Progress::default();
    let Ok(plans) = session.analyze(&options, &progress) else { return };
    let _ = session.write(0, &plans[0], &dir.join("out"), true, &progress);
});
