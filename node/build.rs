//! Compiles the BPF programs (`bpf/policy.c`) with clang (`-target bpf`) into `OUT_DIR`, where
//! `dataplane::bpf` embeds them. clang comes from `make deps` (Debian's `clang`, with `libbpf-dev` for
//! `bpf_helpers.h`); without it the build stops and says so.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        panic!("OUT_DIR is not set: build with cargo");
    };
    let clang = std::env::var("CARACAL_CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The multiarch include directory holds <asm/types.h>, which the UAPI headers include.
    let multiarch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let src = "bpf/policy.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CARACAL_CLANG");
    let obj = out.join("policy.bpf.o");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| {
            panic!("running {clang} for {src} ({e}): run `make deps` (Debian's clang and libbpf-dev)")
        });
    assert!(status.success(), "{clang} failed on {src}");
}
