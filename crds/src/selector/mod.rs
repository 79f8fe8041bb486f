//! Calico's selector language: `app == "web" && has(tier) && env not in {"dev", "test"}`.
//!
//! [`parse`] turns text into a [`Expr`] once; [`Expr::matches`] evaluates it against labels; printing an
//! [`Expr`] (`Display`) gives canonical text that parses back to the same tree. The operator's webhook and
//! the node's policy engine share this one implementation.
//!
//! Grammar (`!` binds tightest, then `&&`, then `||`):
//! ```text
//! expr    := and ("||" and)*
//! and     := unary ("&&" unary)*
//! unary   := "!" unary | "(" expr ")" | "all()" | "global()" | "has(" key ")" | key op
//! op      := ("==" | "!=") value | "in" set | "not" "in" set
//!          | "contains" value | "starts" "with" value | "ends" "with" value
//! set     := "{" [value ("," value)*] "}"
//! value   := '"' chars '"' | "'" chars "'"
//! key     := [A-Za-z0-9_./-]+
//! ```
//! The empty selector means `all()`.

mod eval;
mod parse;
mod print;

use std::collections::BTreeSet;

pub use eval::{LabelSource, NamespaceTarget};
pub use parse::{ParseError, parse};

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Expr {
    /// `all()`: every (namespaced) entity.
    All,
    /// `global()`: non-namespaced entities; meaningful in a namespaceSelector only.
    Global,
    /// `has(key)`: the label is present.
    Has(String),
    /// `key == "value"`.
    Eq(String, String),
    /// `key != "value"`: also true when the label is absent.
    Ne(String, String),
    /// `key in {...}`.
    In(String, BTreeSet<String>),
    /// `key not in {...}`: also true when the label is absent.
    NotIn(String, BTreeSet<String>),
    /// `key contains "s"`.
    Contains(String, String),
    /// `key starts with "s"`.
    StartsWith(String, String),
    /// `key ends with "s"`.
    EndsWith(String, String),
    /// `!expr`.
    Not(Box<Expr>),
    /// `a && b && ...` (two or more terms).
    And(Vec<Expr>),
    /// `a || b || ...` (two or more terms).
    Or(Vec<Expr>),
}

impl Expr {
    /// Every label key the selector reads, for indexing which selectors a label change can affect.
    pub fn keys(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        self.collect_keys(&mut out);
        out
    }

    fn collect_keys<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Expr::All | Expr::Global => {}
            Expr::Has(k)
            | Expr::Eq(k, _)
            | Expr::Ne(k, _)
            | Expr::In(k, _)
            | Expr::NotIn(k, _)
            | Expr::Contains(k, _)
            | Expr::StartsWith(k, _)
            | Expr::EndsWith(k, _) => {
                out.insert(k);
            }
            Expr::Not(e) => e.collect_keys(out),
            Expr::And(es) | Expr::Or(es) => es.iter().for_each(|e| e.collect_keys(out)),
        }
    }

    /// True when `global()` appears anywhere in the selector.
    pub fn uses_global(&self) -> bool {
        match self {
            Expr::Global => true,
            Expr::Not(e) => e.uses_global(),
            Expr::And(es) | Expr::Or(es) => es.iter().any(Expr::uses_global),
            _ => false,
        }
    }
}

impl std::str::FromStr for Expr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

impl crate::schema::Selector {
    /// Parses the selector; `global()` is rejected here as the schema rejects it.
    pub fn parse(&self) -> Result<Expr, ParseError> {
        let expr = parse(self.as_str())?;
        if expr.uses_global() {
            let position = self.as_str().find("global").unwrap_or(0);
            return Err(ParseError::new(
                self.as_str(),
                position,
                "a selector without global() (it is allowed only in a namespaceSelector)",
            ));
        }
        Ok(expr)
    }
}

impl crate::schema::NamespaceSelector {
    /// Parses the namespace selector (`global()` allowed).
    pub fn parse(&self) -> Result<Expr, ParseError> {
        parse(self.as_str())
    }
}

#[cfg(test)]
mod tests;
