//! Writes Caracal's CRD manifests: `crdgen [DIR]` (default `manifests/crds` of the workspace).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds"));
    for name in caracal_crds::crdgen::write_all(&dir)? {
        println!("{}", dir.join(name).display());
    }
    Ok(())
}
