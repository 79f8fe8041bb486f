//! Canonical text: double-quoted values (single quotes when the value holds a double quote), sets sorted,
//! single spaces around operators, and parentheses only where precedence or grouping needs them.

use std::fmt;

use super::Expr;

fn quote(v: &str) -> String {
    if v.contains('"') {
        format!("'{v}'")
    } else {
        format!("\"{v}\"")
    }
}

/// Binding strength, to decide where a sub-expression needs parentheses.
fn precedence(e: &Expr) -> u8 {
    match e {
        Expr::Or(_) => 1,
        Expr::And(_) => 2,
        _ => 3,
    }
}

fn write_term(f: &mut fmt::Formatter<'_>, e: &Expr, parent: u8) -> fmt::Result {
    // A nested And inside And (or Or inside Or) was grouped by the user: keep the grouping.
    if precedence(e) <= parent && precedence(e) < 3 {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &std::collections::BTreeSet<String>| {
            s.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ")
        };
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Global => f.write_str("global()"),
            Expr::Has(k) => write!(f, "has({k})"),
            Expr::Eq(k, v) => write!(f, "{k} == {}", quote(v)),
            Expr::Ne(k, v) => write!(f, "{k} != {}", quote(v)),
            Expr::In(k, s) => write!(f, "{k} in {{{}}}", set(s)),
            Expr::NotIn(k, s) => write!(f, "{k} not in {{{}}}", set(s)),
            Expr::Contains(k, v) => write!(f, "{k} contains {}", quote(v)),
            Expr::StartsWith(k, v) => write!(f, "{k} starts with {}", quote(v)),
            Expr::EndsWith(k, v) => write!(f, "{k} ends with {}", quote(v)),
            Expr::Not(e) => {
                f.write_str("!")?;
                if precedence(e) < 3 {
                    write!(f, "({e})")
                } else {
                    write!(f, "{e}")
                }
            }
            Expr::And(es) | Expr::Or(es) => {
                let (op, p) = if matches!(self, Expr::And(_)) {
                    (" && ", 2)
                } else {
                    (" || ", 1)
                };
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    write_term(f, e, p)?;
                }
                Ok(())
            }
        }
    }
}
