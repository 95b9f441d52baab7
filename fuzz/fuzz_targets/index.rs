//! A model folder whose `model.safetensors.index.json` is arbitrary bytes, beside two valid shards.
//! Opening it must either fail with an error or give a model whose tensors are exactly the shards'.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use layerswap_fast::dtype::Dtype;
use layerswap_fast::io::header::encode_header;
use layerswap_fast::io::Model;
use libfuzzer_sys::fuzz_target;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lsf-fuzz-index-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, names) in [("model-00001-of-00002.safetensors", ["a", "b"]), ("model-00002-of-00002.safetensors", ["c", "d"])] {
            let entries: Vec<_> = names.iter().enumerate().map(|(i, n)| (n.to_string(), Dtype::F32, vec![2], 8 * i as u64, 8 * i as u64 + 8)).collect();
            let mut bytes = encode_header(&entries, &BTreeMap::new());
            bytes.extend([0u8; 16]);
            std::fs::write(dir.join(file), bytes).unwrap();
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dir.join("model.safetensors.index.json"), data).unwrap();
    if let Ok(model) = Model::open(dir) {
        let names: Vec<&str> = model.tensors.keys().map(|s| s.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }
});
