//! The generated manifests are committed as `make manifests` writes them: the CRDs, the operator's plain
//! manifest, its OLM bundle and its Helm chart all come from `caracal_operator::install`, and a file edited
//! by hand, left over from an earlier version or missing fails here.

use std::path::Path;

use caracal_operator::install::{self, Release};

#[test]
fn committed_manifests_are_what_make_manifests_writes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let want = install::all_files(&Release::current()).expect("generate");
    let mut stale = Vec::new();
    for (rel, text) in &want {
        match std::fs::read_to_string(root.join(rel)) {
            Ok(have) if have == *text => {}
            Ok(_) => stale.push(format!("{rel} differs")),
            Err(e) => stale.push(format!("{rel}: {e}")),
        }
    }
    for sub in ["crds", "operator", "olm", "helm"] {
        for path in install::walk(&root.join(sub)).expect("list") {
            let rel = path
                .strip_prefix(&root)
                .expect("under manifests")
                .to_string_lossy()
                .into_owned();
            if !want.contains_key(&rel) {
                stale.push(format!("{rel} is not generated"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "manifests/ is stale (run `make manifests`): {stale:#?}"
    );
}
