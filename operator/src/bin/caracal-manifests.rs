//! Writes every generated manifest of the workspace's release (`make manifests`): Caracal's CRDs
//! (`manifests/crds`), the operator's plain manifest (`manifests/operator/operator.yaml`), its OLM bundle
//! (`manifests/olm/<version>/`, the only version kept: earlier ones are in their release tags) and its Helm
//! chart (`manifests/helm/caracal/`). `caracal-manifests [ROOT]` writes under ROOT (default: the workspace).

use std::path::PathBuf;

use caracal_operator::install::{self, Release};

fn main() -> anyhow::Result<()> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests"));
    for written in install::write_all(&root, &Release::current())? {
        println!("{}", root.join(written).display());
    }
    Ok(())
}
