//! Compiles `ckptd/v1/*.proto` with the pure-Rust `protox` compiler (no system `protoc`) and
//! generates the prost messages and tonic clients and servers from the descriptor set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["ckptd/v1/trainer.proto", "ckptd/v1/isolator.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
