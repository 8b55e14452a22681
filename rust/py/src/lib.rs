//! `beam_turbo._native`: thin `PyO3` wrappers over `beam-turbo-core`. Each wrapper converts its
//! arguments, calls the core (with the GIL released where there is real work) and converts
//! the result; the decisions live in the core.

mod cache;
mod columns;
mod error;
mod filling;
mod records;
mod sizer;
mod stack;

use pyo3::prelude::*;

#[pymodule]
mod _native {
    #[pymodule_export]
    use crate::cache::ModelCache;
    #[pymodule_export]
    use crate::columns::interleave;
    #[pymodule_export]
    use crate::filling::UnitFiller;
    #[pymodule_export]
    use crate::records::records;
    #[pymodule_export]
    use crate::sizer::BatchSizer;
    #[pymodule_export]
    use crate::stack::{BatchMemory, check_bounds, empty, first_unlike, pool_usage, set_pool_limit, stack};
}
