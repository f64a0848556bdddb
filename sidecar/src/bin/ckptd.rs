//! `ckptd`: the daemon binary.
fn main() {}
