//! The node's WireGuard key pair. The private key lives in one file (mode 0600, written whole through a
//! temporary file and a rename, so a crash never leaves half a key) and is never logged or published; the
//! public key is derived from it and published on the Node. A missing or unreadable file means a new key:
//! deleting the file is how a person rotates the node's key (the agent notices at its next sync, writes a new
//! one, reprograms the device and publishes the new public key; the peers follow when they see it).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};

/// Errors handling the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the file.
    #[error("{action} the WireGuard private key file {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A key pair. `Debug` shows the public key only.
#[derive(Clone)]
pub struct KeyPair {
    secret: StaticSecret,
    /// The public key.
    pub public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &encode(self.public.as_bytes()))
            .finish_non_exhaustive()
    }
}

/// Base64, as WireGuard tools and the Node annotation show keys.
pub fn encode(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A base64 key (a Node annotation's); None when it is not 32 bytes of base64.
pub fn decode(text: &str) -> Option<[u8; 32]> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?
        .try_into()
        .ok()
}

/// Hex, as the UAPI protocol carries keys.
pub fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

impl KeyPair {
    /// The pair of a private key.
    pub fn from_private(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// A new random pair (the kernel's random source).
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read as _;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self::from_private(bytes))
    }

    /// The private key, hex (for the device's UAPI only).
    pub fn private_hex(&self) -> String {
        hex(&self.secret.to_bytes())
    }

    /// The public key, base64.
    pub fn public_base64(&self) -> String {
        encode(self.public.as_bytes())
    }

    /// The pair in `path`, or a new one written there when the file is missing or holds no key. The bool:
    /// true when the key is new.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        let io = |action, source| KeyError::Io {
            action,
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Some(bytes) = decode(&text) {
                    return Ok((Self::from_private(bytes), false));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("reading", e)),
        }
        let pair = Self::generate().map_err(|e| io("generating", e))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("creating", e))?;
        f.write_all(encode(&pair.secret.to_bytes()).as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .and_then(|()| f.sync_all())
            .map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))?;
        Ok((pair, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_private_kept_across_loads_and_replaced_when_deleted_or_damaged() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("caracal-wg-keys-{}", std::process::id()));
        let path = dir.join("wireguard/private.key");
        let (first, new) = KeyPair::load_or_create(&path).expect("created");
        assert!(new);
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "readable by the owner only");
        let (again, new) = KeyPair::load_or_create(&path).expect("loaded");
        assert!(!new);
        assert_eq!(again.public_base64(), first.public_base64());
        // The file holds the private key, which is not the public one and never shows in Debug.
        let text = std::fs::read_to_string(&path).expect("read");
        assert_ne!(text.trim(), first.public_base64());
        assert!(!format!("{first:?}").contains(text.trim()));
        assert!(format!("{first:?}").contains(&first.public_base64()));
        std::fs::remove_file(&path).expect("delete");
        let (rotated, new) = KeyPair::load_or_create(&path).expect("recreated");
        assert!(new);
        assert_ne!(rotated.public_base64(), first.public_base64());
        std::fs::write(&path, "not a key").expect("damage");
        let (repaired, new) = KeyPair::load_or_create(&path).expect("replaced");
        assert!(new);
        assert_ne!(repaired.public_base64(), rotated.public_base64());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_round_trip_through_base64_and_hex_as_wireguard_writes_them() {
        // RFC 7748's test vector: Alice's private key and her public key.
        let alice = KeyPair::from_private([
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66, 0x45,
            0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9, 0x2c, 0x2a,
        ]);
        assert_eq!(
            hex(alice.public.as_bytes()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert_eq!(decode(&alice.public_base64()), Some(*alice.public.as_bytes()));
        assert_eq!(decode("short"), None);
        assert_eq!(
            alice.private_hex(),
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
        );
    }
}
