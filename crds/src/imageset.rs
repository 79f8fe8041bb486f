//! `ImageSet` (operator.caracal.dev/v1): the digests of one release's component images, so the operator
//! renders `image@sha256:...` references instead of tags.
//!
//! As the Tigera operator's ImageSet: cluster-scoped, named `caracal-<version>` (`caracal-v0.1.0`), and used
//! only by the operator of that release (an ImageSet for the next release can be applied before upgrading).
//! Each entry names an image the operator renders by its default name (`caracal/node`, whatever the
//! Installation's registry, imagePath and imagePrefix) and gives its manifest digest. The API server refuses a
//! malformed digest, an image the operator does not render and an image listed twice; the operator reports
//! Degraded when the set for its release lacks an image it renders.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The prefix of every ImageSet's name; the release (`v0.1.0`) follows it.
pub const IMAGE_SET_PREFIX: &str = "caracal-";

/// Longest digest: `sha256:` and 64 hex digits.
pub const MAX_DIGEST_LEN: u64 = 71;

/// The CEL rule a digest satisfies: SHA-256, lowercase hex, as registries and OCI layouts write it.
pub const DIGEST_RULE: &str = "self.matches('^sha256:[0-9a-f]{64}$')";

/// The message when it does not.
pub const DIGEST_MSG: &str = "a digest is sha256: followed by 64 lowercase hex digits (the image manifest's \
                              digest, as `crane digest` or target/images/images.json give it)";

/// An image the operator renders, by its default name.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum ComponentImage {
    /// The node agent (caracal-node container of the caracal-node DaemonSet).
    #[serde(rename = "caracal/node")]
    Node,
    /// Typha (the caracal-typha Deployment).
    #[serde(rename = "caracal/typha")]
    Typha,
    /// The CNI plugin's installer (install-cni init container of the caracal-node DaemonSet).
    #[serde(rename = "caracal/cni")]
    Cni,
}

impl ComponentImage {
    /// Every image the operator renders.
    pub const ALL: [ComponentImage; 3] = [ComponentImage::Node, ComponentImage::Typha, ComponentImage::Cni];

    /// The image's name without the path: `node`, `typha`, `cni`.
    pub fn name(self) -> &'static str {
        match self {
            ComponentImage::Node => "node",
            ComponentImage::Typha => "typha",
            ComponentImage::Cni => "cni",
        }
    }

    /// The name an ImageSet lists it by: `caracal/node`, ...
    pub fn key(self) -> &'static str {
        match self {
            ComponentImage::Node => "caracal/node",
            ComponentImage::Typha => "caracal/typha",
            ComponentImage::Cni => "caracal/cni",
        }
    }
}

/// One image and its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
pub struct ImageDigest {
    /// The image by its default name (`caracal/node`, `caracal/typha`, `caracal/cni`).
    pub image: ComponentImage,
    /// The manifest digest, `sha256:<64 lowercase hex>`.
    #[schemars(length(max = MAX_DIGEST_LEN))]
    #[x_kube(validation = Rule::new(DIGEST_RULE).message(DIGEST_MSG))]
    pub digest: String,
}

/// The digests of one release's images. Named `caracal-<version>`; the operator of that release uses it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "operator.caracal.dev",
    version = "v1",
    kind = "ImageSet",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[kube(validation = Rule::new("self.metadata.name.matches('^caracal-v[0-9]+[.][0-9]+[.][0-9]+([-+][0-9A-Za-z.+-]+)?$')")
    .message("an ImageSet is named caracal-<release> (caracal-v0.1.0 for release v0.1.0): the operator of that release reads only that name"))]
pub struct ImageSetSpec {
    /// The images and their digests.
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.image == a.image))").message("an image is listed twice: list each image once"))]
    pub images: Vec<ImageDigest>,
}

impl ImageSet {
    /// The name of the ImageSet the operator of `version` (`v0.1.0`) reads.
    pub fn name_for(version: &str) -> String {
        format!("{IMAGE_SET_PREFIX}{version}")
    }

    /// The digest listed for `image`, if any.
    pub fn digest(&self, image: ComponentImage) -> Option<&str> {
        self.spec
            .images
            .iter()
            .find(|i| i.image == image)
            .map(|i| i.digest.as_str())
    }
}

/// True for `sha256:` followed by 64 lowercase hex digits (what [`DIGEST_RULE`] checks at the API server).
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_with_64_lowercase_hex_digits() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert!(is_digest(&good));
        assert!(!is_digest(&good.to_uppercase()));
        assert!(!is_digest(&good[..good.len() - 1]));
        assert!(!is_digest(&format!("{good}0")));
        assert!(!is_digest(&good.replace("sha256", "sha512")));
        assert!(!is_digest(&"0".repeat(64)));
    }

    #[test]
    fn images_are_listed_by_their_default_name() {
        let set: ImageSetSpec = serde_json::from_value(serde_json::json!({
            "images": [{"image": "caracal/typha", "digest": "sha256:x"}]
        }))
        .unwrap();
        assert_eq!(set.images[0].image, ComponentImage::Typha);
        assert!(
            serde_json::from_value::<ImageSetSpec>(serde_json::json!({
                "images": [{"image": "caracal/operator", "digest": "sha256:x"}]
            }))
            .is_err()
        );
        for image in ComponentImage::ALL {
            assert_eq!(
                serde_json::to_value(image).unwrap(),
                serde_json::Value::from(image.key())
            );
            assert_eq!(image.key(), format!("caracal/{}", image.name()));
        }
        assert_eq!(ImageSet::name_for("v0.1.0"), "caracal-v0.1.0");
    }
}
