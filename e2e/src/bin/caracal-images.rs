//! `caracal-images`: builds Caracal's OCI images without a container engine (`make images` runs it).
//!
//! Each image is a root filesystem of Debian packages (their files only, extracted by `mmdebstrap
//! --variant=extract`: no maintainer scripts run, so what they would have made, such as the iptables
//! alternatives, is made here) and a layer of Caracal's release binaries in `/usr/local/bin`. The images:
//!
//! | image | Debian packages | binary |
//! | --- | --- | --- |
//! | `operator` | libc6, libgcc-s1 | caracal-operator |
//! | `node` | the above, iptables (nft), ipset, bird2, iproute2, conntrack, nftables | caracal-node, caracal-cni |
//! | `cni` | libc6, libgcc-s1 | caracal-cni (its `install` step copies it to the host) |
//! | `typha` | libc6, libgcc-s1 | caracal-typha |
//! | `pause` | libc6, libgcc-s1 | caracal-pause (the pod sandbox of the real-node lab) |
//! | `echo` | libc6, libgcc-s1 | caracal-echo (the real-node lab's workload pods) |
//!
//! Written to `<out>/<image>/` (an OCI image layout) and `<out>/<image>.oci.tar` (the layout as one
//! archive, for `ctr images import`), named `<registry><path>/<image>:<version>` as the operator renders
//! them; `<out>/images.json` lists references, digests and sizes. The Debian root filesystems are cached in
//! `<out>/rootfs/` or `--rootfs-cache` (delete them to take the mirror's current packages).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use caracal_e2e::oci::{Config, EPOCH, Entry, Image, Layer};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Build Caracal's OCI images (no container engine needed)")]
struct Args {
    /// Where the layouts, archives and cached root filesystems go.
    #[arg(long, default_value = "target/images")]
    out: PathBuf,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The registry the references name, with its trailing `/` (containerd's default is docker.io).
    #[arg(long, default_value = "docker.io/")]
    registry: String,
    /// The path between the registry and the image name (the operator's default).
    #[arg(long, default_value = "caracal")]
    image_path: String,
    /// The tag (the release's version, as the operator renders it).
    #[arg(long, default_value = concat!("v", env!("CARGO_PKG_VERSION")))]
    tag: String,
    /// Only these images (default: all).
    #[arg(long = "only")]
    only: Vec<String>,
    /// Where the Debian root filesystems are cached (default: `<out>/rootfs`); the previous release's images
    /// share the current one's.
    #[arg(long)]
    rootfs_cache: Option<PathBuf>,
}

/// Debian packages every image has: the C library and the unwinder Rust binaries link against.
const BASE: &[&str] = &["libc6", "libgcc-s1", "usr-is-merged"];
/// What the node agent runs besides itself.
const NODE_TOOLS: &[&str] = &["iptables", "ipset", "bird2", "iproute2", "conntrack", "nftables"];

/// One image: its name, Debian packages beyond [`BASE`], and binaries.
struct Spec {
    name: &'static str,
    packages: &'static [&'static str],
    binaries: &'static [&'static str],
}

const IMAGES: &[Spec] = &[
    Spec {
        name: "operator",
        packages: &[],
        binaries: &["caracal-operator"],
    },
    Spec {
        name: "node",
        packages: NODE_TOOLS,
        binaries: &["caracal-node", "caracal-cni"],
    },
    Spec {
        name: "cni",
        packages: &[],
        binaries: &["caracal-cni"],
    },
    Spec {
        name: "typha",
        packages: &[],
        binaries: &["caracal-typha"],
    },
    // The real-node lab's own: the pod sandbox (containerd's pinned sandbox image) and the workload pods'
    // echo server (`e2e/testpod`).
    Spec {
        name: "pause",
        packages: &[],
        binaries: &["caracal-pause"],
    },
    Spec {
        name: "echo",
        packages: &[],
        binaries: &["caracal-echo"],
    },
];

/// The Debian mirror's suites (the machine's release).
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// The root filesystem of `packages` (and what they depend on), extracted once into `<cache>/<key>`.
fn rootfs(cache: &Path, packages: &[&str]) -> anyhow::Result<PathBuf> {
    let key = if packages.len() == BASE.len() {
        "base".to_owned()
    } else {
        packages[BASE.len()..].join("-")
    };
    let dir = cache.join(&key);
    let done = dir.with_extension("done");
    if done.exists() {
        return Ok(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    println!(
        "==> extracting Debian packages into {}: {}",
        dir.display(),
        packages.join(", ")
    );
    let started = Instant::now();
    let mut cmd = Command::new("mmdebstrap");
    cmd.env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .args(["--mode=root", "--variant=extract", "--skip=chroot/mount", "--skip=output/dev", "--quiet"])
        .args([
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--dpkgopt=path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*",
        ])
        // Merged /usr, as Debian's own root filesystems are.
        .arg("--setup-hook=for d in bin sbin lib lib64; do mkdir -p \"$1/usr/$d\"; ln -s usr/$d \"$1/$d\"; done")
        .arg("--extract-hook=rm -f \"$1/etc/resolv.conf\" \"$1/etc/hostname\"")
        .arg(format!("--include={}", packages.join(",")))
        .arg("bookworm")
        .arg(&dir)
        .args(SOURCES);
    let status = cmd
        .status()
        .context("running mmdebstrap (Debian package mmdebstrap; make deps installs it)")?;
    if !status.success() {
        bail!("mmdebstrap failed ({status}) for {}", packages.join(","));
    }
    std::fs::write(&done, packages.join("\n"))?;
    println!("    {:.0} s", started.elapsed().as_secs_f64());
    Ok(dir)
}

/// What the packages' maintainer scripts would have made that the binaries need: the iptables commands
/// (Debian's alternatives, the nft backend as on the host), and `/etc/passwd` and `/etc/group` for root and
/// nobody.
fn system_files(layer: &mut Layer, packages: &[&str]) {
    if packages.contains(&"iptables") {
        for cmd in [
            "iptables",
            "iptables-save",
            "iptables-restore",
            "ip6tables",
            "ip6tables-save",
            "ip6tables-restore",
        ] {
            layer.add(
                format!("usr/sbin/{cmd}"),
                Entry::Symlink {
                    target: "xtables-nft-multi".into(),
                },
            );
        }
    }
    layer.add(
        "etc/passwd",
        Entry::File {
            mode: 0o644,
            data: b"root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n".to_vec(),
        },
    );
    layer.add(
        "etc/group",
        Entry::File {
            mode: 0o644,
            data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        },
    );
}

/// Paths of the extracted root filesystem that do not go into an image.
fn keep(path: &Path) -> bool {
    ![
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "var/cache/apt",
        "var/lib/apt/lists",
        "var/log",
        "etc/resolv.conf",
        "etc/hostname",
    ]
    .iter()
    .any(|p| path == Path::new(p))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let started = Instant::now();
    let mut listed = serde_json::Map::new();
    let cache = args
        .rootfs_cache
        .clone()
        .unwrap_or_else(|| args.out.join("rootfs"));
    for spec in IMAGES {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == spec.name) {
            continue;
        }
        let packages: Vec<&str> = BASE.iter().chain(spec.packages).copied().collect();
        let root = rootfs(&cache, &packages)?;
        let mut base = Layer::new();
        base.add_tree(&root, &keep)
            .with_context(|| format!("reading {}", root.display()))?;
        system_files(&mut base, &packages);
        let mut app = Layer::new();
        for bin in spec.binaries {
            let path = args.bin_dir.join(bin);
            app.add_file(format!("usr/local/bin/{bin}"), &path, 0o755)
                .with_context(|| format!("{} (build the release binaries first)", path.display()))?;
        }
        let reference = format!("{}{}/{}:{}", args.registry, args.image_path, spec.name, args.tag);
        let config = Config {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            // The program is the entrypoint: a pod's `args` are its arguments (`caracal-echo 80/TCP`), and a
            // pod's `command` replaces it.
            entrypoint: vec![spec.binaries[0].to_owned()],
            labels: [
                (
                    "org.opencontainers.image.title".to_owned(),
                    format!("caracal-{}", spec.name),
                ),
                ("org.opencontainers.image.version".to_owned(), args.tag.clone()),
            ]
            .into(),
            ..Config::default()
        };
        let image = Image::build(&reference, &[base, app], &config)?;
        image.write_layout(&args.out.join(spec.name))?;
        let archive = args.out.join(format!("{}.oci.tar", spec.name));
        std::fs::write(&archive, image.archive()?)
            .with_context(|| format!("writing {}", archive.display()))?;
        println!(
            "{:<9} {reference:<40} {}  {:.1} MB compressed, {:.1} MB unpacked",
            spec.name,
            image.manifest,
            image.compressed as f64 / 1e6,
            image.uncompressed as f64 / 1e6
        );
        listed.insert(
            spec.name.to_owned(),
            serde_json::json!({
                "reference": reference,
                "digest": image.manifest,
                "compressed_bytes": image.compressed,
                "uncompressed_bytes": image.uncompressed,
                "layout": args.out.join(spec.name),
                "archive": archive,
            }),
        );
    }
    let list = args.out.join("images.json");
    std::fs::write(&list, serde_json::to_vec_pretty(&listed)?)?;
    println!(
        "==> {} images in {:.0} s; {}",
        listed.len(),
        started.elapsed().as_secs_f64(),
        list.display()
    );
    // The ImageSet of the images the operator renders (node, typha, cni), so it renders them by digest:
    // `kubectl apply -f <out>/imageset.yaml`. Written only when this run built all three.
    {
        use caracal_crds::imageset::{ComponentImage, ImageDigest, ImageSet, ImageSetSpec};
        let images: Vec<ImageDigest> = ComponentImage::ALL
            .iter()
            .filter_map(|&image| {
                let digest = listed.get(image.name())?["digest"].as_str()?.to_owned();
                Some(ImageDigest { image, digest })
            })
            .collect();
        if images.len() == ComponentImage::ALL.len() {
            let set = ImageSet::new(&ImageSet::name_for(&args.tag), ImageSetSpec { images });
            let path = args.out.join("imageset.yaml");
            std::fs::write(&path, serde_yaml::to_string(&set)?)?;
            println!("==> {}", path.display());
        }
    }
    Ok(())
}
