use layerswap_fast::budget::{Budget, BLOCK, MAX_CHUNK, RESERVE};
use layerswap_fast::Error;

#[test]
fn large_budget_gets_full_chunks_and_all_workers() {
    let b = Budget::plan(1 << 30, 4, 4, 2).unwrap();
    assert_eq!((b.chunk_elems, b.workers), (MAX_CHUNK, 4));
    assert!(RESERVE + b.buffer_total() <= 1 << 30);
}

#[test]
fn small_budget_shrinks_chunks_then_workers_and_stays_within() {
    for mem in [RESERVE + (1 << 20), RESERVE + (8 << 20), 256 << 20, 512 << 20] {
        for threads in [1, 2, 8] {
            let b = Budget::plan(mem, threads, 4, 4).unwrap();
            assert!(b.chunk_elems % BLOCK == 0 && b.workers >= 1 && b.workers <= threads);
            assert!(RESERVE + b.buffer_total() <= mem, "{mem} {threads} {b:?}");
        }
    }
}

#[test]
fn too_small_budget_is_a_clear_error() {
    match Budget::plan(32 << 20, 2, 3, 2) {
        Err(Error::Budget { message }) => assert!(message.contains("too small"), "{message}"),
        other => panic!("{other:?}"),
    }
}
