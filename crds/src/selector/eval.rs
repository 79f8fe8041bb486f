//! Evaluating a selector against labels.

use std::collections::{BTreeMap, HashMap};

use super::Expr;

/// Something with labels.
pub trait LabelSource {
    /// The value of label `key`, if present.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSource for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl<S: std::hash::BuildHasher> LabelSource for HashMap<String, String, S> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl LabelSource for [(&str, &str)] {
    fn label(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// What a namespaceSelector is evaluated against.
pub enum NamespaceTarget<'a> {
    /// A namespace, with its labels.
    Namespace(&'a dyn LabelSource),
    /// A non-namespaced entity (a GlobalNetworkSet, a host): `global()` matches it, `all()` does not, and
    /// label terms see no labels.
    Global,
}

struct NoLabels;
impl LabelSource for NoLabels {
    fn label(&self, _: &str) -> Option<&str> {
        None
    }
}

impl Expr {
    /// Whether an entity with these labels is selected. `global()` selects nothing here.
    pub fn matches(&self, labels: &(impl LabelSource + ?Sized)) -> bool {
        self.eval(&|k| labels.label(k), false)
    }

    /// Whether a namespaceSelector selects `target`.
    pub fn matches_namespace(&self, target: NamespaceTarget<'_>) -> bool {
        match target {
            NamespaceTarget::Namespace(l) => self.eval(&|k| l.label(k), false),
            NamespaceTarget::Global => self.eval(&|k| NoLabels.label(k), true),
        }
    }

    fn eval<'a>(&self, get: &dyn Fn(&str) -> Option<&'a str>, global: bool) -> bool {
        match self {
            Expr::All => !global,
            Expr::Global => global,
            Expr::Has(k) => get(k).is_some(),
            Expr::Eq(k, v) => get(k) == Some(v.as_str()),
            Expr::Ne(k, v) => get(k) != Some(v.as_str()),
            Expr::In(k, s) => get(k).is_some_and(|x| s.contains(x)),
            Expr::NotIn(k, s) => !get(k).is_some_and(|x| s.contains(x)),
            Expr::Contains(k, v) => get(k).is_some_and(|x| x.contains(v.as_str())),
            Expr::StartsWith(k, v) => get(k).is_some_and(|x| x.starts_with(v.as_str())),
            Expr::EndsWith(k, v) => get(k).is_some_and(|x| x.ends_with(v.as_str())),
            Expr::Not(e) => !e.eval(get, global),
            Expr::And(es) => es.iter().all(|e| e.eval(get, global)),
            Expr::Or(es) => es.iter().any(|e| e.eval(get, global)),
        }
    }
}
