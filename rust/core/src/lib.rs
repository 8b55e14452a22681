//! beam-turbo's core: pure Rust, no Python. Batch sizing, stacking and
//! column-interleaving kernels, model cache.
//!
//! The `beam-turbo-py` crate wraps these for Python as `beam_turbo._native`; every decision
//! is made here, so it can be tested with plain `cargo test`.

pub mod cache;
pub mod columns;
pub mod error;
pub mod memory;
pub mod sizer;
pub mod stack;

pub use error::{CoreError, ErrorKind};
