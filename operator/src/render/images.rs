//! Image references: `{registry}{imagePath}/{imagePrefix}{name}` with the release's tag, or with the digest
//! the release's ImageSet (`caracal-<version>`) gives, as the Tigera operator composes them; and the checks
//! that make an ImageSet unusable (the Installation is then Degraded and nothing changes).

use caracal_crds::imageset::{ComponentImage, ImageSet, is_digest};
use caracal_crds::installation::InstallationSpec;

use super::common::VERSION;
use super::{ClusterFacts, SpecError};

/// The reason of every ImageSet problem.
pub const INVALID_IMAGE_SET: &str = "InvalidImageSet";

/// The name of the ImageSet this operator reads: `caracal-<its release>`.
pub fn image_set_name() -> String {
    ImageSet::name_for(VERSION)
}

/// The reference of `image`: by digest when `set` lists it, else by the release's tag. Registry ends with `/`
/// when set; imagePath defaults to `caracal`.
pub fn reference(spec: &InstallationSpec, set: Option<&ImageSet>, image: ComponentImage) -> String {
    let registry = spec.registry.as_deref().unwrap_or("");
    let path = spec.image_path.as_deref().unwrap_or("caracal");
    let prefix = spec.image_prefix.as_deref().unwrap_or("");
    let name = image.name();
    match set.and_then(|s| s.digest(image)) {
        Some(digest) => format!("{registry}{path}/{prefix}{name}@{digest}"),
        None => format!("{registry}{path}/{prefix}{name}:{VERSION}"),
    }
}

/// The reference of `image` for what `facts` hold (the ImageSet, when there is one).
pub fn image(spec: &InstallationSpec, facts: &ClusterFacts, component: ComponentImage) -> String {
    reference(spec, facts.image_set.as_ref(), component)
}

/// Why the ImageSet in `facts` cannot be used: a digest that is not `sha256:<64 hex>` (the CRD refuses it, but
/// an object stored under an older definition may hold one), an image the operator renders that it does not
/// list (partial pinning would silently pull the rest by tag), or an object that does not decode.
pub fn check(facts: &ClusterFacts) -> Vec<SpecError> {
    let name = image_set_name();
    let field = |f: &str| format!("ImageSet {name}: {f}");
    let mut errors = Vec::new();
    if let Some(e) = &facts.image_set_error {
        errors.push(SpecError {
            field: field("spec"),
            reason: INVALID_IMAGE_SET,
            message: format!("{e}: fix it to match the ImageSet schema, or delete it to use tags"),
        });
    }
    let Some(set) = &facts.image_set else {
        return errors;
    };
    for (i, entry) in set.spec.images.iter().enumerate() {
        if !is_digest(&entry.digest) {
            errors.push(SpecError {
                field: field(&format!("spec.images[{i}].digest")),
                reason: INVALID_IMAGE_SET,
                message: format!(
                    "{:?} for {} is not sha256: followed by 64 lowercase hex digits: give the image manifest's \
                     digest",
                    entry.digest,
                    entry.image.key()
                ),
            });
        }
    }
    for image in ComponentImage::ALL {
        if set.digest(image).is_none() {
            errors.push(SpecError {
                field: field("spec.images"),
                reason: INVALID_IMAGE_SET,
                message: format!(
                    "no digest for {}: add {{image: {}, digest: sha256:...}}, or delete the ImageSet to render \
                     every image by tag",
                    image.key(),
                    image.key()
                ),
            });
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use caracal_crds::imageset::{ImageDigest, ImageSetSpec};

    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn set(images: &[(ComponentImage, String)]) -> ImageSet {
        ImageSet::new(
            &image_set_name(),
            ImageSetSpec {
                images: images
                    .iter()
                    .map(|(image, digest)| ImageDigest {
                        image: *image,
                        digest: digest.clone(),
                    })
                    .collect(),
            },
        )
    }

    fn full() -> ImageSet {
        set(&[
            (ComponentImage::Node, digest('a')),
            (ComponentImage::Typha, digest('b')),
            (ComponentImage::Cni, digest('c')),
        ])
    }

    #[test]
    fn without_an_image_set_images_carry_the_release_tag() {
        let spec = InstallationSpec {
            registry: Some("registry.example/".into()),
            image_path: Some("mirror/caracal".into()),
            image_prefix: Some("x-".into()),
            ..Default::default()
        };
        assert_eq!(
            reference(&spec, None, ComponentImage::Node),
            format!("registry.example/mirror/caracal/x-node:{VERSION}")
        );
        assert_eq!(
            reference(&InstallationSpec::default(), None, ComponentImage::Cni),
            format!("caracal/cni:{VERSION}")
        );
    }

    #[test]
    fn an_image_set_replaces_the_tag_with_the_digest_under_the_same_registry_and_path() {
        let spec = InstallationSpec {
            registry: Some("registry.example/".into()),
            image_path: Some("mirror".into()),
            ..Default::default()
        };
        let set = full();
        assert_eq!(
            reference(&spec, Some(&set), ComponentImage::Typha),
            format!("registry.example/mirror/typha@{}", digest('b'))
        );
        assert_eq!(
            reference(&InstallationSpec::default(), Some(&set), ComponentImage::Node),
            format!("caracal/node@{}", digest('a'))
        );
    }

    #[test]
    fn a_complete_image_set_is_valid_and_a_missing_image_or_bad_digest_is_named() {
        let ok = ClusterFacts {
            image_set: Some(full()),
            ..Default::default()
        };
        assert_eq!(check(&ok), vec![]);
        assert_eq!(check(&ClusterFacts::default()), vec![]);

        let partial = ClusterFacts {
            image_set: Some(set(&[
                (ComponentImage::Node, digest('a')),
                (ComponentImage::Cni, "sha256:ABC".into()),
            ])),
            ..Default::default()
        };
        let errs = check(&partial);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(
            errs[0].field,
            format!("ImageSet caracal-{VERSION}: spec.images[1].digest")
        );
        assert!(
            errs[0].message.contains("\"sha256:ABC\" for caracal/cni"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].message.starts_with("no digest for caracal/typha"),
            "{}",
            errs[1]
        );
        assert!(errs.iter().all(|e| e.reason == INVALID_IMAGE_SET));

        let undecodable = ClusterFacts {
            image_set_error: Some("unknown variant `caracal/operator`".into()),
            ..Default::default()
        };
        let errs = check(&undecodable);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("caracal/operator"), "{}", errs[0]);
    }
}
