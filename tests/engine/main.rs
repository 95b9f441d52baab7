//! Engine integration tests, one module per engine stage. Run with `cargo test`.

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
