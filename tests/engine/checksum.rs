use layerswap_fast::checksum::{file_checksum, BLOCK};
use layerswap_fast::progress::Progress;

#[test]
fn checksum_sees_any_change_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let data: Vec<u8> = (0..(2 * BLOCK + 1234)).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    let a = file_checksum(&p, &Progress::default()).unwrap();
    assert!(a.starts_with("xxh3-8m:") && a.len() == 8 + 16);
    assert_eq!(a, file_checksum(&p, &Progress::default()).unwrap());
    let mut changed = data.clone();
    changed[BLOCK + 7] ^= 1;
    std::fs::write(&p, &changed).unwrap();
    assert_ne!(a, file_checksum(&p, &Progress::default()).unwrap());
    std::fs::write(&p, &data[..2 * BLOCK]).unwrap();
    assert_ne!(a, file_checksum(&p, &Progress::default()).unwrap());
    std::fs::write(&p, b"").unwrap();
    assert!(file_checksum(&p, &Progress::default()).is_ok());
}
