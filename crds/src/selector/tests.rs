use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn valid_selectors_parse_to_canonical_text() {
    let table = [
        ("", "all()"),
        ("  ", "all()"),
        ("all()", "all()"),
        ("global()", "global()"),
        ("has(app)", "has(app)"),
        ("has( app )", "has(app)"),
        ("app=='web'", "app == \"web\""),
        ("app != \"web\"", "app != \"web\""),
        ("env in {'b', \"a\", 'b'}", "env in {\"a\", \"b\"}"),
        ("env not in {}", "env not in {}"),
        ("name contains 'db'", "name contains \"db\""),
        ("name starts with \"db-\"", "name starts with \"db-\""),
        ("name ends   with 'prod'", "name ends with \"prod\""),
        ("!has(x)", "!has(x)"),
        ("!(a == 'x' || b == 'y')", "!(a == \"x\" || b == \"y\")"),
        ("a=='1'&&b=='2'||c=='3'", "a == \"1\" && b == \"2\" || c == \"3\""),
        (
            "a=='1'&&(b=='2'||c=='3')",
            "a == \"1\" && (b == \"2\" || c == \"3\")",
        ),
        (
            "(a=='1'&&b=='2')&&c=='3'",
            "(a == \"1\" && b == \"2\") && c == \"3\"",
        ),
        (
            "example.com/team-name_2 == 'x'",
            "example.com/team-name_2 == \"x\"",
        ),
        ("quote == '\"'", "quote == '\"'"),
        (
            "all == 'x' && has == 'y' && in in {'z'}",
            "all == \"x\" && has == \"y\" && in in {\"z\"}",
        ),
        (
            "global() || projectcalico.org/name == 'kube-system'",
            "global() || projectcalico.org/name == \"kube-system\"",
        ),
    ];
    for (text, canonical) in table {
        let e = parse(text).unwrap_or_else(|err| panic!("{text:?}: {err}"));
        assert_eq!(e.to_string(), canonical, "{text:?}");
        assert_eq!(
            parse(canonical).unwrap(),
            e,
            "canonical text of {text:?} parses back"
        );
    }
}

#[test]
fn invalid_selectors_report_position_and_expectation() {
    // (selector, 0-based position, a word of what was expected)
    let table = [
        ("app ==", 6, "a value in quotes"),
        ("app == web", 7, "a value in quotes"),
        ("app == 'web", 7, "closing quote"),
        ("app = 'web'", 4, "an operator"),
        ("app", 3, "an operator"),
        ("== 'x'", 0, "a label key"),
        ("has(app", 7, ") after the label key"),
        ("has()", 4, "a label key"),
        ("all(x)", 4, "no argument"),
        ("app == 'x' &&", 13, "a label key"),
        ("app == 'x' & b == 'y'", 11, "&&, || or the end"),
        ("(app == 'x'", 11, "&&, || or )"),
        ("app == 'x')", 10, "&&, || or the end"),
        ("env in 'a'", 7, "{ to start a set"),
        ("env in {'a' 'b'}", 12, ", or }"),
        ("env in {'a',}", 12, "a value in quotes"),
        ("env not {'a'}", 8, "in (as in"),
        ("name starts 'x'", 12, "with"),
        ("foo(x)", 0, "all(), global(), has(key)"),
        ("!= 'x'", 0, "a label key before !="),
        ("a == 'x' b == 'y'", 9, "&&, || or the end"),
    ];
    for (text, position, expected) in table {
        let err = parse(text).expect_err(text);
        assert_eq!(err.position, position, "{text:?}: {err}");
        assert!(
            err.expected.contains(expected),
            "{text:?}: expected {expected:?} in {err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("at character {}", position + 1))
        );
    }
}

#[test]
fn error_caret_points_at_the_problem() {
    let err = parse("app == web").unwrap_err();
    assert_eq!(err.caret(), "app == web\n       ^");
}

#[test]
fn evaluation_follows_calico_semantics() {
    let web = labels(&[("app", "web"), ("env", "prod"), ("name", "db-primary")]);
    let bare = labels(&[]);
    let cases: &[(&str, bool, bool)] = &[
        // (selector, matches web, matches bare)
        ("all()", true, true),
        ("", true, true),
        ("global()", false, false),
        ("has(app)", true, false),
        ("!has(app)", false, true),
        ("app == 'web'", true, false),
        ("app != 'web'", false, true),
        ("app != 'db'", true, true),
        ("env in {'prod', 'stage'}", true, false),
        ("env not in {'prod'}", false, true),
        ("env not in {'dev'}", true, true),
        ("name contains 'primary'", true, false),
        ("name starts with 'db-'", true, false),
        ("name ends with 'primary'", true, false),
        ("name ends with 'db'", false, false),
        ("app == 'web' && env == 'dev'", false, false),
        ("app == 'web' || env == 'dev'", true, false),
        ("!(app == 'web' && env == 'prod')", false, true),
    ];
    for (sel, want_web, want_bare) in cases {
        let e = parse(sel).unwrap();
        assert_eq!(e.matches(&web), *want_web, "{sel} on web");
        assert_eq!(e.matches(&bare), *want_bare, "{sel} on no labels");
    }
}

#[test]
fn namespace_selectors_treat_global_entities_apart() {
    let kube_system = labels(&[("name", "kube-system")]);
    let ns = NamespaceTarget::Namespace(&kube_system);
    assert!(parse("all()").unwrap().matches_namespace(ns));
    assert!(!parse("all()").unwrap().matches_namespace(NamespaceTarget::Global));
    assert!(
        parse("global()")
            .unwrap()
            .matches_namespace(NamespaceTarget::Global)
    );
    assert!(
        !parse("global()")
            .unwrap()
            .matches_namespace(NamespaceTarget::Namespace(&kube_system))
    );
    let either = parse("global() || name == 'kube-system'").unwrap();
    assert!(either.matches_namespace(NamespaceTarget::Global));
    assert!(either.matches_namespace(NamespaceTarget::Namespace(&kube_system)));
}

#[test]
fn keys_lists_every_label_read() {
    let e = parse("a == 'x' && (has(b) || !c in {'y'}) && global()").unwrap();
    assert_eq!(e.keys().into_iter().collect::<Vec<_>>(), vec!["a", "b", "c"]);
    assert!(e.uses_global());
}

#[test]
fn typed_selector_fields_reject_global() {
    let s = crate::schema::Selector::from("global() || a == 'b'");
    let err = s.parse().unwrap_err();
    assert!(err.expected.contains("namespaceSelector"));
    assert!(crate::schema::NamespaceSelector::from("global()").parse().is_ok());
}

fn key() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_./-]{0,12}"
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 _.-]{0,8}",
        "[a-z]{0,3}\"[a-z]{0,3}",
        "[a-z]{0,3}'[a-z]{0,3}"
    ]
}

fn leaf() -> impl Strategy<Value = Expr> {
    let set = || proptest::collection::btree_set(value(), 0..4);
    prop_oneof![
        Just(Expr::All),
        Just(Expr::Global),
        key().prop_map(Expr::Has),
        (key(), value()).prop_map(|(k, v)| Expr::Eq(k, v)),
        (key(), value()).prop_map(|(k, v)| Expr::Ne(k, v)),
        (key(), set()).prop_map(|(k, s)| Expr::In(k, s)),
        (key(), set()).prop_map(|(k, s)| Expr::NotIn(k, s)),
        (key(), value()).prop_map(|(k, v)| Expr::Contains(k, v)),
        (key(), value()).prop_map(|(k, v)| Expr::StartsWith(k, v)),
        (key(), value()).prop_map(|(k, v)| Expr::EndsWith(k, v)),
    ]
}

fn expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            proptest::collection::vec(inner, 2..4).prop_map(Expr::Or),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn printing_then_parsing_gives_the_same_tree(e in expr()) {
        let text = e.to_string();
        let back = parse(&text).map_err(|err| TestCaseError::fail(format!("{text:?}: {err}")))?;
        prop_assert_eq!(back, e, "{}", text);
    }

    #[test]
    fn canonical_text_is_a_fixed_point(e in expr()) {
        let once = e.to_string();
        prop_assert_eq!(parse(&once).unwrap().to_string(), once);
    }

    #[test]
    fn the_parser_never_panics(s in "[ -~]{0,40}") {
        let _ = parse(&s);
    }
}
