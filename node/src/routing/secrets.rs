//! The Secrets BGP passwords come from (`BGPPeer.password.secretKeyRef`), read in the agent's namespace as
//! Calico reads them in calico-node's.
//!
//! One watch per referenced Secret, with a field selector on its name: the agent needs read access to those
//! Secrets only, which a Role with `resourceNames` grants (Calico's documented setup), never to every Secret
//! of the namespace. The values stay in memory (never logged); a change — a rotated password, a deleted
//! Secret, a permission granted — wakes routing, which renders BIRD's configuration again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use tracing::warn;

/// What the agent knows of one Secret. Its `Debug` names the keys, never the values.
#[derive(Clone, PartialEq, Eq)]
pub enum Known {
    /// Not read yet.
    Pending,
    /// It does not exist.
    Missing,
    /// Its data.
    Present(BTreeMap<String, Vec<u8>>),
    /// Reading it failed (e.g. the agent may not read it).
    Unreadable(String),
}

impl std::fmt::Debug for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Known::Pending => f.write_str("Pending"),
            Known::Missing => f.write_str("Missing"),
            Known::Present(d) => f
                .debug_tuple("Present")
                .field(&d.keys().collect::<Vec<_>>())
                .finish(),
            Known::Unreadable(e) => f.debug_tuple("Unreadable").field(e).finish(),
        }
    }
}

/// The watched Secrets of one namespace.
pub struct Secrets {
    client: Client,
    namespace: String,
    watches: BTreeMap<String, tokio::task::JoinHandle<()>>,
    known: Arc<Mutex<BTreeMap<String, Known>>>,
    changed: Arc<Notify>,
}

impl Drop for Secrets {
    fn drop(&mut self) {
        for w in self.watches.values() {
            w.abort();
        }
    }
}

impl Secrets {
    /// Secrets of `namespace`, read with `client`.
    pub fn new(client: Client, namespace: String) -> Self {
        Self {
            client,
            namespace,
            watches: BTreeMap::new(),
            known: Arc::default(),
            changed: Arc::new(Notify::new()),
        }
    }

    /// The namespace the Secrets are read in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Notified whenever a watched Secret changes.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Watches exactly `names` from now on: new names start a watch, names no longer referenced stop theirs
    /// and are forgotten.
    pub fn track(&mut self, names: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .watches
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            if let Some(w) = self.watches.remove(&n) {
                w.abort();
            }
            lock(&self.known).remove(&n);
        }
        for n in names {
            if self.watches.contains_key(n) {
                continue;
            }
            lock(&self.known).insert(n.clone(), Known::Pending);
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
            let (known, changed, name) = (self.known.clone(), self.changed.clone(), n.clone());
            self.watches
                .insert(n.clone(), tokio::spawn(watch(api, name, known, changed)));
        }
    }

    /// What is known of Secret `name`.
    pub fn get(&self, name: &str) -> Known {
        lock(&self.known).get(name).cloned().unwrap_or(Known::Pending)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Follows one Secret until aborted, recording what it holds and notifying on every change.
async fn watch(
    api: Api<Secret>,
    name: String,
    known: Arc<Mutex<BTreeMap<String, Known>>>,
    changed: Arc<Notify>,
) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, cfg).default_backoff().boxed();
    // Objects seen during a (re)list: a relist that does not see the Secret means it is gone.
    let mut listing: Option<Known> = None;
    let set = |k: Known| {
        let mut m = lock(&known);
        // A forgotten name (no longer referenced) is not brought back by a late event.
        if let Some(slot) = m.get_mut(&name)
            && *slot != k
        {
            *slot = k;
            changed.notify_one();
        }
    };
    let data = |s: &Secret| {
        Known::Present(
            s.data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
        )
    };
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing = Some(Known::Missing),
            Ok(watcher::Event::InitApply(s)) => listing = Some(data(&s)),
            Ok(watcher::Event::InitDone) => set(listing.take().unwrap_or(Known::Missing)),
            Ok(watcher::Event::Apply(s)) => set(data(&s)),
            Ok(watcher::Event::Delete(_)) => set(Known::Missing),
            Err(e) => {
                warn!(secret = %name, error = %e, "watching a BGP password Secret");
                set(Known::Unreadable(e.to_string()));
            }
        }
    }
}

/// The longest key TCP MD5 signatures take (the kernel's `TCP_MD5SIG_MAXKEYLEN`).
pub const MD5_MAX_KEY: usize = 80;

/// The password in key `key` of a Secret known as `known` (named `secret` in `namespace`, for messages),
/// or why there is none usable. BIRD's configuration quotes it, and BIRD's strings have no escapes, so a
/// password with a double quote or a line break cannot be written there.
pub fn password(namespace: &str, secret: &str, key: &str, known: &Known) -> Result<String, String> {
    let at = format!("Secret {namespace}/{secret}");
    let bytes = match known {
        Known::Pending => return Err(format!("{at} has not been read yet")),
        Known::Missing => return Err(format!("{at} does not exist: create it")),
        Known::Unreadable(e) => {
            return Err(format!(
                "{at} cannot be read ({e}): let caracal-node's ServiceAccount get, list and watch it (a Role with resourceNames: [{secret}] and a RoleBinding)"
            ));
        }
        Known::Present(data) => data.get(key).ok_or_else(|| {
            format!(
                "{at} has no key {key:?} (it has: {}): fix password.secretKeyRef.key or the Secret",
                data.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?,
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("{at} key {key:?} is not UTF-8 text: BIRD takes a text password"))?;
    if text.is_empty() {
        return Err(format!("{at} key {key:?} is empty"));
    }
    if text.len() > MD5_MAX_KEY {
        return Err(format!(
            "{at} key {key:?} is {} bytes; TCP MD5 keys are at most {MD5_MAX_KEY}",
            text.len()
        ));
    }
    if text.contains(['"', '\n', '\r', '\0']) {
        return Err(format!(
            "{at} key {key:?} holds a double quote, NUL or line break, which BIRD's configuration cannot express: choose another password"
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn present(key: &str, value: &[u8]) -> Known {
        Known::Present(BTreeMap::from([(key.to_owned(), value.to_vec())]))
    }

    #[test]
    fn a_password_is_the_text_of_its_key() {
        assert_eq!(
            password("caracal-system", "bgp", "pw", &present("pw", b"s3cret")),
            Ok("s3cret".into())
        );
    }

    #[test]
    fn an_unusable_secret_says_what_to_change() {
        let cases = [
            (Known::Missing, "does not exist"),
            (Known::Pending, "not been read"),
            (Known::Unreadable("403 forbidden".into()), "resourceNames: [bgp]"),
            (present("other", b"x"), "has no key \"pw\" (it has: other)"),
            (present("pw", b""), "is empty"),
            (present("pw", &[0xff, 0xfe]), "not UTF-8"),
            (present("pw", b"a\"b"), "double quote"),
            (present("pw", b"a\nb"), "line break"),
            (present("pw", &[b'a'; 81]), "at most 80"),
        ];
        for (known, want) in cases {
            let e = password("caracal-system", "bgp", "pw", &known).expect_err(want);
            assert!(e.contains(want), "{known:?}: {e}");
            assert!(e.contains("caracal-system/bgp"), "{e}");
        }
        assert!(password("n", "bgp", "pw", &present("pw", &[b'a'; 80])).is_ok());
        assert_eq!(format!("{:?}", present("pw", b"s3cret")), "Present([\"pw\"])");
    }
}
