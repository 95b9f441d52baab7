//! One safetensors file from arbitrary bytes: the in-memory header parser, then the file as the engine
//! opens it (length prefix, header, size checks), then every validated byte range is read back. Any
//! panic or abort is a finding. (Layout detection of the names is left to the `merge` target: compiling
//! the built-in layouts' patterns on every input would cut the rate tenfold.)
#![no_main]

use layerswap_fast::io::{Header, Shard};
use libfuzzer_sys::fuzz_target;

fn scratch() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lsf-fuzz-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= 8 {
        let data_len = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 24);
        let _ = Header::parse(&data[8..], data_len);
    }
    let path = scratch().join("f.safetensors");
    std::fs::write(&path, data).unwrap();
    if let Ok(shard) = Shard::open(&path) {
        for t in &shard.header.tensors {
            let mut buf = vec![0u8; t.nbytes() as usize];
            shard.read_at(shard.header.data_start() + t.start, &mut buf).expect("a validated range is readable");
            assert_eq!(t.numel() * t.dtype.size() as u64, t.nbytes());
        }
    }
});
