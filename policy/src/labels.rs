//! Labels, kept compact: a sorted list of (key, value) pairs of interned strings. A cluster's pods share a
//! few label keys and a modest set of values, so each distinct string is stored once and every endpoint holds
//! only pointers (16 bytes each); a pod with six labels costs about 200 bytes instead of the kilobyte a map of
//! owned strings takes.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use caracal_crds::selector::LabelSource;

/// An interned string.
pub type Name = Arc<str>;

/// The strings in use. Entries nobody else holds any more are dropped when the table has doubled since the
/// last sweep, so churn (pod-template hashes, pod names in labels) does not grow it forever.
struct Interner {
    strings: HashSet<Name>,
    swept_at: usize,
}

static INTERNER: Mutex<Option<Interner>> = Mutex::new(None);

/// The shared copy of `s`.
pub fn intern(s: &str) -> Name {
    let mut guard = INTERNER.lock().unwrap_or_else(PoisonError::into_inner);
    let table = guard.get_or_insert_with(|| Interner {
        strings: HashSet::new(),
        swept_at: 1024,
    });
    if let Some(n) = table.strings.get(s) {
        return n.clone();
    }
    if table.strings.len() >= 2 * table.swept_at {
        table.strings.retain(|n| Arc::strong_count(n) > 1);
        table.swept_at = table.strings.len().max(1024);
    }
    let n: Name = Arc::from(s);
    table.strings.insert(n.clone());
    n
}

/// Labels of an endpoint, namespace, service account or network set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Box<[(Name, Name)]>);

impl Labels {
    /// No labels.
    pub fn new() -> Self {
        Labels(Box::new([]))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_ref())
    }

    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: &str, value: &str) {
        let mut v = std::mem::take(&mut self.0).into_vec();
        match v.binary_search_by(|(k, _)| k.as_ref().cmp(key)) {
            Ok(i) => v[i].1 = intern(value),
            Err(i) => v.insert(i, (intern(key), intern(value))),
        }
        self.0 = v.into_boxed_slice();
    }

    /// The pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, &Name)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// How many labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True without labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl LabelSource for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let sorted: BTreeMap<Name, Name> = iter
            .into_iter()
            .map(|(k, v)| (intern(k.as_ref()), intern(v.as_ref())))
            .collect();
        Labels(sorted.into_iter().collect())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(m: BTreeMap<String, String>) -> Self {
        m.into_iter().collect()
    }
}

impl<const N: usize> From<[(&str, &str); N]> for Labels {
    fn from(pairs: [(&str, &str); N]) -> Self {
        pairs.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sorted_shared_and_answer_selectors() {
        let mut a: Labels = [("b", "2"), ("a", "1")].into();
        a.insert("c", "3");
        a.insert("a", "9");
        let pairs: Vec<(&str, &str)> = a.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        assert_eq!(pairs, [("a", "9"), ("b", "2"), ("c", "3")]);
        let b: Labels = [("b", "2")].into();
        let (ka, kb) = (
            a.iter().nth(1).map(|(k, _)| k.clone()),
            b.iter().next().map(|(k, _)| k.clone()),
        );
        assert!(
            ka.zip(kb).is_some_and(|(x, y)| Arc::ptr_eq(&x, &y)),
            "one copy of each string"
        );
        let sel = caracal_crds::selector::parse("a == '9' && has(c)")
            .unwrap_or(caracal_crds::selector::Expr::Global);
        assert!(sel.matches(&a));
        assert!(!sel.matches(&b));
    }
}
