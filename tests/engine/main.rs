//! Engine integration tests, one module per engine stage. Run with `cargo test`.
#![allow(
    clippy::type_complexity,
    reason = "test fixtures spell out (name, dtype, shape, values) tuples where they are built"
)]
#![allow(
    clippy::needless_range_loop,
    reason = "the checks index two models' values by the same k, as the formulas do"
)]

mod alloc;
mod common;

mod budget;
mod checksum;
mod header;
mod hostile;
mod lora;
mod memory;
mod plan;
mod session;
mod sums;
