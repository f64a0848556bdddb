//! `ckptctl`: operator tool.
fn main() {}
