//! Compile proto/ with protox (pure Rust; the machine has no protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("tre/v1/tre.proto");
    // Relative to this package, so a target directory shared between two
    // clones (a CI cache) watches each clone's own proto, not the first's.
    println!("cargo:rerun-if-changed=../../proto/tre/v1/tre.proto");
    let fds = protox::compile([&file], [&root])?;
    // The encoded descriptors, for gRPC server reflection (issue #14).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tre_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
