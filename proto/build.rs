use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: a fresh machine needs nothing but cargo.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ferry_descriptor.bin"))
        .compile_protos(&["proto/ferry/v1/ferry.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
