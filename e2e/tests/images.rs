//! The OCI images `make images` built (`target/images`, which `make test` builds first): each passes umoci's
//! unpack (every blob's digest, and every layer's uncompressed digest against the config's `diff_ids`) and
//! skopeo's inspection, which reports the digest `images.json` lists; its binaries run inside its own root
//! filesystem (chroot: the image's C library, not the host's), `--version` reporting the release, and the
//! node image's kernel tools run; a second build of the same inputs (Debian packages extracted again into
//! another directory, the same binaries) gives the same digests. Needs root, mmdebstrap, umoci and skopeo
//! (`make deps`).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use caracal_e2e::controlplane::workspace_root;
use serde_json::Value;

fn images() -> (PathBuf, serde_json::Map<String, Value>) {
    let dir = workspace_root().join("target/images");
    let list = std::fs::read(dir.join("images.json")).unwrap_or_else(|e| {
        panic!(
            "{}/images.json: {e}: run `make images` first (make test does)",
            dir.display()
        )
    });
    let v: Value = serde_json::from_slice(&list).expect("images.json");
    (dir, v.as_object().cloned().expect("an object"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// Unpacks image `name` with umoci (which checks it) into a temporary bundle; its root filesystem.
fn unpack(layout: &Path, reference: &str, into: &Path) -> PathBuf {
    let bundle = into.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{reference}", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

#[test]
fn every_image_is_valid_oci_and_its_binaries_run_on_its_own_libraries() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (chroot)");
    let (_, list) = images();
    assert_eq!(
        list.len(),
        6,
        "operator, node, cni, typha, and the real-node lab's pause and echo: {list:?}"
    );
    let version = concat!("v", env!("CARGO_PKG_VERSION"));
    for (name, img) in &list {
        let layout = PathBuf::from(img["layout"].as_str().expect("layout"));
        let reference = img["reference"].as_str().expect("reference");
        assert!(
            reference.ends_with(&format!("caracal/{name}:{version}")),
            "{reference}"
        );
        let inspected: Value = serde_json::from_str(&run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:{reference}", layout.display()))))
        .expect("skopeo's JSON");
        assert_eq!(inspected["Digest"], img["digest"], "{name}");
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = unpack(&layout, reference, tmp.path());
        let chroot = |args: &[&str]| run(Command::new("chroot").arg(&root).args(args));
        let mut bins: Vec<String> = std::fs::read_dir(root.join("usr/local/bin"))
            .expect("usr/local/bin")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        bins.sort();
        let want: &[&str] = match name.as_str() {
            "node" => &["caracal-cni", "caracal-node"],
            "cni" => &["caracal-cni"],
            "operator" => &["caracal-operator"],
            "pause" => &["caracal-pause"],
            "echo" => &["caracal-echo"],
            _ => &["caracal-typha"],
        };
        assert_eq!(bins, want, "{name}");
        for bin in want {
            let out = chroot(&[&format!("/usr/local/bin/{bin}"), "--version"]);
            assert!(out.contains(version), "{name}: {bin} --version: {out}");
        }
        if name == "node" {
            assert!(chroot(&["iptables", "--version"]).contains("nf_tables"));
            assert!(chroot(&["ip6tables-save", "--version"]).contains("nf_tables"));
            assert!(chroot(&["ipset", "--version"]).contains("ipset v"));
            assert!(chroot(&["bird", "--version"]).contains("BIRD version 2"));
            // birdc has no version option: it runs (its libraries load) and finds no BIRD to talk to.
            let out = Command::new("chroot")
                .arg(&root)
                .args(["birdc", "-s", "/nonexistent.ctl", "show", "status"])
                .output()
                .expect("birdc");
            let text =
                String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("Unable to connect to server control socket"),
                "birdc: {text}"
            );
            assert!(chroot(&["conntrack", "--version"]).contains("conntrack"));
            assert!(chroot(&["ip", "-V"]).contains("iproute2"));
        }
    }
}

#[test]
fn building_the_same_inputs_again_gives_the_same_digests() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (mmdebstrap)");
    let (_, list) = images();
    let out = tempfile::tempdir().expect("tempdir");
    run(
        Command::new(caracal_e2e::controlplane::workspace_bin("caracal-images"))
            .arg("--out")
            .arg(out.path())
            .arg("--bin-dir")
            .arg(workspace_root().join("target/release")),
    );
    let again: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("images.json")).expect("images.json"))
            .expect("JSON");
    for (name, img) in &list {
        assert_eq!(again[name]["digest"], img["digest"], "{name}");
    }
}

/// The lab's demo names Caracal's images by this release's tag (the one `make images` builds and every real
/// node imports): a version bump that leaves it behind would leave the demo's pods without an image.
#[test]
fn the_lab_demo_names_this_releases_images() {
    let text = std::fs::read_to_string(workspace_root().join("e2e/lab/demo.yaml")).expect("demo.yaml");
    let tag = concat!(":v", env!("CARGO_PKG_VERSION"));
    let images: Vec<&str> = text
        .split("image: ")
        .skip(1)
        .filter_map(|rest| rest.split([',', '}', '\n']).next())
        .collect();
    assert!(!images.is_empty(), "the demo runs pods");
    for image in images {
        assert!(
            image.starts_with("caracal/") && image.ends_with(tag),
            "e2e/lab/demo.yaml names {image}: Caracal's images of this release end in {tag}"
        );
    }
}
