//! OCI images written without a container engine: deterministic layers (tar archives of a directory or of
//! named files), an image config, a manifest and an image index, laid out as the OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/...`) and as an archive of that layout (what `ctr images
//! import` reads).
//!
//! Same inputs, same digest: entries in name order, every time stamp [`EPOCH`], owners 0, no user or group
//! names, gzip without a time stamp or a file name at a fixed level, JSON in a fixed key order. The digest of
//! the uncompressed layer (its `diff_id`) depends only on the files; the compressed one also on the
//! compressor (flate2's, pinned by Cargo.lock).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The modification time of every entry (2026-01-01T00:00:00Z): the images' `SOURCE_DATE_EPOCH`.
pub const EPOCH: u64 = 1_767_225_600;

/// Errors writing images.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Reading the inputs or writing the layout.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in hash {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("sha256:{hex}")
}

/// One entry of a layer, by its path in the image (relative, no leading `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Permission bits.
        mode: u32,
        /// Its content.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: PathBuf,
    },
}

/// A layer being assembled: entries by path (so they come out in name order whatever order they were
/// added in; a later addition of a path replaces an earlier one).
#[derive(Clone, Debug, Default)]
pub struct Layer {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `entry` at `path` (relative to the image's root), with every missing parent directory (0755).
    pub fn add(&mut self, path: impl AsRef<Path>, entry: Entry) {
        let path = path
            .as_ref()
            .strip_prefix("/")
            .unwrap_or(path.as_ref())
            .to_path_buf();
        let mut parent = path.parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_path_buf())
                .or_insert(Entry::Dir { mode: 0o755 });
            parent = p.parent();
        }
        self.entries.insert(path, entry);
    }

    /// Adds the file at `source` as `path` with permission bits `mode`.
    pub fn add_file(&mut self, path: impl AsRef<Path>, source: &Path, mode: u32) -> Result<(), OciError> {
        let data = std::fs::read(source).map_err(io(source))?;
        self.add(path, Entry::File { mode, data });
        Ok(())
    }

    /// Adds everything under the directory `root` (directories, regular files, symbolic links; sockets,
    /// devices and the like are left out), at the same paths in the image, keeping permission bits. Paths
    /// for which `keep` is false are left out with what is under them.
    pub fn add_tree(&mut self, root: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<(), OciError> {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let full = root.join(&rel);
            let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&full)
                .map_err(io(&full))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io(&full))?;
            names.sort();
            for name in names {
                let rel = rel.join(&name);
                if !keep(&rel) {
                    continue;
                }
                let path = root.join(&rel);
                let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
                let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
                let kind = meta.file_type();
                if kind.is_symlink() {
                    let target = std::fs::read_link(&path).map_err(io(&path))?;
                    self.add(&rel, Entry::Symlink { target });
                } else if kind.is_dir() {
                    self.add(&rel, Entry::Dir { mode });
                    stack.push(rel);
                } else if kind.is_file() {
                    self.add_file(&rel, &path, mode)?;
                }
            }
        }
        Ok(())
    }

    /// The layer as an uncompressed tar archive.
    pub fn tar(&self) -> Result<Vec<u8>, OciError> {
        let here = Path::new("<layer>");
        let mut b = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(EPOCH);
            match entry {
                Entry::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, path, std::io::empty()).map_err(io(here))?;
                }
                Entry::File { mode, data } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice()).map_err(io(here))?;
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target).map_err(io(here))?;
                }
            }
        }
        b.into_inner().map_err(io(here))
    }
}

/// Gzip without a time stamp or a file name, at level 6.
fn gzip(data: &[u8]) -> Result<Vec<u8>, OciError> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::new(6));
    gz.write_all(data).map_err(io(Path::new("<gzip>")))?;
    gz.finish().map_err(io(Path::new("<gzip>")))
}

/// What an image runs.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value`.
    pub env: Vec<String>,
    /// `User` (empty: root).
    pub user: String,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
}

/// One image, ready to be written.
#[derive(Clone, Debug)]
pub struct Image {
    /// Its full reference (`docker.io/caracal/node:v0.1.0`): the index names the manifest with it.
    pub reference: String,
    /// Blobs by digest (layers, config, manifest).
    pub blobs: BTreeMap<String, Vec<u8>>,
    /// The manifest's digest.
    pub manifest: String,
    /// The manifest's size.
    pub manifest_size: usize,
    /// The compressed layers' total size.
    pub compressed: usize,
    /// The uncompressed layers' total size.
    pub uncompressed: usize,
}

impl Image {
    /// An image of `layers` (bottom first) running `config`, named `reference`.
    pub fn build(reference: &str, layers: &[Layer], config: &Config) -> Result<Self, OciError> {
        let mut blobs = BTreeMap::new();
        let (mut diff_ids, mut descriptors) = (Vec::new(), Vec::new());
        let (mut compressed, mut uncompressed) = (0, 0);
        for layer in layers {
            let tar = layer.tar()?;
            diff_ids.push(digest(&tar));
            let gz = gzip(&tar)?;
            let d = digest(&gz);
            descriptors.push(json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d,
                "size": gz.len(),
            }));
            uncompressed += tar.len();
            compressed += gz.len();
            blobs.insert(d, gz);
        }
        let mut run = serde_json::Map::new();
        for (key, list) in [
            ("Entrypoint", &config.entrypoint),
            ("Cmd", &config.cmd),
            ("Env", &config.env),
        ] {
            if !list.is_empty() {
                run.insert(key.into(), json!(list));
            }
        }
        if !config.user.is_empty() {
            run.insert("User".into(), json!(config.user));
        }
        if !config.labels.is_empty() {
            run.insert("Labels".into(), json!(config.labels));
        }
        let config_json = canonical(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": Value::Object(run),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }));
        let config_digest = digest(&config_json);
        let manifest = canonical(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_json.len(),
            },
            "layers": descriptors,
        }));
        blobs.insert(config_digest, config_json);
        let manifest_digest = digest(&manifest);
        let manifest_size = manifest.len();
        blobs.insert(manifest_digest.clone(), manifest);
        Ok(Self {
            reference: reference.to_owned(),
            blobs,
            manifest: manifest_digest,
            manifest_size,
            compressed,
            uncompressed,
        })
    }

    /// The layout's `index.json`: the manifest, named by the reference in both annotations a reader looks
    /// for (the OCI one, and containerd's, which it takes verbatim).
    pub fn index(&self) -> Vec<u8> {
        canonical(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.manifest,
                "size": self.manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": self.reference,
                    "org.opencontainers.image.ref.name": self.reference,
                },
            }],
        }))
    }

    /// The layout's files: (path in the layout, content), in name order.
    fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = vec![
            (PathBuf::from("index.json"), self.index()),
            (
                PathBuf::from("oci-layout"),
                canonical(&json!({"imageLayoutVersion": "1.0.0"})),
            ),
        ];
        for (d, blob) in &self.blobs {
            let hex = d.trim_start_matches("sha256:");
            files.push((Path::new("blobs/sha256").join(hex), blob.clone()));
        }
        files.sort();
        files
    }

    /// Writes the image as an OCI image layout in the directory `dir` (replacing what was there).
    pub fn write_layout(&self, dir: &Path) -> Result<(), OciError> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        for (rel, data) in self.files() {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, data).map_err(io(&path))?;
        }
        Ok(())
    }

    /// The layout as one tar archive (what `ctr images import` takes), deterministic as the layers are.
    pub fn archive(&self) -> Result<Vec<u8>, OciError> {
        let mut layer = Layer::new();
        for (rel, data) in self.files() {
            layer.add(rel, Entry::File { mode: 0o644, data });
        }
        layer.tar()
    }
}

/// JSON as written into blobs: compact, keys in the order they were built (serde_json's map).
fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) {
        std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
        std::fs::write(dir.join("usr/bin/tool"), b"#!tool\n").unwrap();
        std::os::unix::fs::symlink("usr/bin", dir.join("bin")).unwrap();
        std::fs::write(dir.join("etc-file"), b"x").unwrap();
    }

    fn image(dir: &Path) -> Image {
        let mut base = Layer::new();
        base.add_tree(dir, &|p| p != Path::new("etc-file")).unwrap();
        let mut app = Layer::new();
        app.add(
            "usr/local/bin/app",
            Entry::File {
                mode: 0o755,
                data: b"app".to_vec(),
            },
        );
        let config = Config {
            entrypoint: vec!["/usr/local/bin/app".into()],
            env: vec!["PATH=/usr/local/bin:/usr/bin".into()],
            ..Config::default()
        };
        Image::build("docker.io/caracal/test:v0", &[base, app], &config).unwrap()
    }

    #[test]
    fn the_same_inputs_give_the_same_digest_whenever_and_wherever_the_files_were_made() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sample(a.path());
        std::thread::sleep(std::time::Duration::from_millis(20));
        sample(b.path());
        let (x, y) = (image(a.path()), image(b.path()));
        assert_eq!(x.manifest, y.manifest);
        assert_eq!(x.archive().unwrap(), y.archive().unwrap());
        // A changed byte changes it.
        std::fs::write(b.path().join("usr/bin/tool"), b"#!tool2\n").unwrap();
        assert_ne!(image(b.path()).manifest, x.manifest);
    }

    #[test]
    fn layers_hold_the_tree_in_name_order_with_parents_links_and_fixed_owners_and_times() {
        let a = tempfile::tempdir().unwrap();
        sample(a.path());
        let mut base = Layer::new();
        base.add_tree(a.path(), &|p| p != Path::new("etc-file")).unwrap();
        let tar = base.tar().unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let got: Vec<(String, tar::EntryType, u64, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.entry_type(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(names, ["bin", "usr", "usr/bin", "usr/bin/tool"]);
        assert_eq!(got[0].1, tar::EntryType::Symlink);
        assert!(got.iter().all(|g| g.2 == EPOCH && g.3 == 0), "{got:?}");
    }

    #[test]
    fn the_config_lists_the_uncompressed_layers_and_the_index_names_the_manifest() {
        let a = tempfile::tempdir().unwrap();
        sample(a.path());
        let img = image(a.path());
        let manifest: Value = serde_json::from_slice(&img.blobs[&img.manifest]).unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap();
        let config: Value = serde_json::from_slice(&img.blobs[config_digest]).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/app");
        for layer in manifest["layers"].as_array().unwrap() {
            let d = layer["digest"].as_str().unwrap();
            assert_eq!(digest(&img.blobs[d]), d);
            assert_eq!(img.blobs[d].len() as u64, layer["size"].as_u64().unwrap());
        }
        let index: Value = serde_json::from_slice(&img.index()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], img.manifest.as_str());
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "docker.io/caracal/test:v0"
        );
    }
}
