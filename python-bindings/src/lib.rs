//! Python bindings for ckptd: the private extension module `ckptd._native`.
//!
//! It is a thin layer over [`ckptd::client`]: the typed, documented API lives in the pure-Python
//! package `python/ckptd/` (the `Checkpointer`, the state flattening and the `ckptd.torch`
//! helpers), and `python/ckptd/_native.pyi` describes this module for type checkers. Errors become
//! Python exceptions in [`errors`] only.

use pyo3::prelude::*;

pub mod checkpointer;
pub mod errors;

/// The ckptd version the bindings are built from.
pub const VERSION: &str = ckptd::VERSION;

/// Whether the engine's test hooks (`CKPTD_TEST_COPY_DELAY_US`) are compiled in.
pub const TEST_HOOKS: bool = cfg!(feature = "test-hooks");

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", VERSION)?;
    m.add("_TEST_HOOKS", TEST_HOOKS)?;
    m.add("EXIT_RESTART", ckptd::client::EXIT_RESTART)?;
    m.add("EXIT_STOP", ckptd::client::EXIT_STOP)?;
    m.add_class::<checkpointer::PyCheckpointer>()?;
    m.add_class::<checkpointer::PySaveHandle>()?;
    errors::register(m)?;
    Ok(())
}
