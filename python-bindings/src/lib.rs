//! Python bindings for ckptd.
//!
//! The PyO3 extension module (`ckptd._native`), the typed `ckptd` package and the `ckptd.torch`
//! helpers arrive with the trainer-side library issue (#3). This crate already builds against the
//! `ckptd` library so that the workspace layout of `../shared/DESIGN.md` holds from the start.

/// The ckptd version the bindings are built from.
pub const VERSION: &str = ckptd::VERSION;
