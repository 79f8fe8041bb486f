//! natOutgoing, the part of the policy data plane's model ([`NatOutgoing`]) both backends implement the same
//! way, in the kernel's nat table: traffic from a pool with `natOutgoing: true` to anywhere outside every pool
//! is masqueraded to the outgoing interface's address, or SNATed to Felix's `natOutgoingAddress` when set
//! (IPv4). One chain (`crc-nat-outgoing`, hooked once from nat `POSTROUTING`) with one rule over two ipsets; a
//! pool change only swaps set contents. Read back each time, so drift is repaired. IPv6 has the same in
//! `ip6tables` with its own sets (`crc6-masq-pools`, `crc6-all-pools`).
//!
//! The BPF data plane uses the same rules: a packet leaving the cluster is one its programs hand to the
//! kernel's stack (only pod-to-local-pod packets skip it), so the stack's nat table sees it. The objects are
//! the same whichever backend runs, so a switch between them keeps natOutgoing working throughout; only the
//! agent's full teardown removes them ([`remove`]).

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::dataplane::iptables::apply::{IptablesError, run_tool};
use crate::dataplane::{Family, NatOutgoing};

/// The chain.
pub const CHAIN: &str = "crc-nat-outgoing";
/// Pools whose traffic is masqueraded.
pub const MASQ_SET: &str = "crc-masq-pools";
/// Every pool (never masqueraded as a destination).
pub const ALL_SET: &str = "crc-all-pools";

/// The family's (masquerade set, all-pools set, iptables tool).
fn names(family: Family) -> (&'static str, &'static str, &'static str) {
    match family {
        Family::V4 => (MASQ_SET, ALL_SET, "iptables"),
        Family::V6 => ("crc6-masq-pools", "crc6-all-pools", "ip6tables"),
    }
}

fn rule(family: Family, address: Option<IpAddr>) -> String {
    let (masq, all, _) = names(family);
    let target = match address.filter(|a| Family::of(a) == family) {
        Some(a) => format!("SNAT --to-source {a}"),
        None => "MASQUERADE".to_owned(),
    };
    format!("-m set --match-set {masq} src -m set ! --match-set {all} dst -j {target}")
}

fn hook() -> String {
    format!("-m comment --comment \"caracal nat-outgoing\" -j {CHAIN}")
}

fn members(save: &str, set: &str) -> Option<BTreeSet<String>> {
    let mut found = false;
    let mut out = BTreeSet::new();
    for l in save.lines() {
        let mut w = l.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), _) if name == set => found = true,
            (Some("add"), Some(name), Some(m)) if name == set => {
                out.insert(m.to_owned());
            }
            _ => {}
        }
    }
    found.then_some(out)
}

/// Converges the nat table of `family` and its two sets to `nat`'s pools of that family; returns whether
/// anything had to change.
pub fn apply(exec_prefix: &[String], family: Family, want: &NatOutgoing) -> Result<bool, IptablesError> {
    let (masquerade, all) = (&want.masquerade, &want.all_pools);
    let (masq_set, all_set, tool) = names(family);
    let inet = if family == Family::V4 { "inet" } else { "inet6" };
    let mut changed = false;
    let save = run_tool(exec_prefix, "ipset", &["save"], None)?;
    let mut script = String::new();
    for (set, want) in [(masq_set, masquerade), (all_set, all)] {
        let want: BTreeSet<String> = want
            .iter()
            .filter(|n| Family::of(&n.addr()) == family)
            .map(ToString::to_string)
            .collect();
        if members(&save, set).as_ref() == Some(&want) {
            continue;
        }
        let tmp = format!("{set}-t");
        script.push_str(&format!(
            "create {tmp} hash:net family {inet} -exist\nflush {tmp}\n"
        ));
        for m in &want {
            script.push_str(&format!("add {tmp} {m}\n"));
        }
        script.push_str(&format!(
            "create {set} hash:net family {inet} -exist\nswap {tmp} {set}\ndestroy {tmp}\n"
        ));
    }
    if !script.is_empty() {
        run_tool(exec_prefix, "ipset", &["restore"], Some(&script))?;
        changed = true;
    }
    let nat = run_tool(exec_prefix, &format!("{tool}-save"), &["-t", "nat"], None)?;
    let chain_rules: Vec<&str> = nat
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("-A {CHAIN} ")))
        .collect();
    let hooks = nat
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING ") && l.ends_with(&format!("-j {CHAIN}")))
        .count();
    let rule = rule(family, want.address);
    if chain_rules != [rule.as_str()] || hooks != 1 {
        let mut t = format!("*nat\n:{CHAIN} - [0:0]\n-A {CHAIN} {rule}\n");
        for _ in 0..hooks {
            t.push_str(&format!("-D POSTROUTING {}\n", hook()));
        }
        t.push_str(&format!("-I POSTROUTING 1 {}\nCOMMIT\n", hook()));
        run_tool(exec_prefix, &format!("{tool}-restore"), &["--noflush"], Some(&t))?;
        changed = true;
    }
    Ok(changed)
}

/// Removes the chain, its hook and the sets of `family` (errors are collected, teardown goes on).
pub fn remove(exec_prefix: &[String], family: Family) -> Vec<IptablesError> {
    let (masq_set, all_set, tool) = names(family);
    let mut errors = Vec::new();
    if let Ok(nat) = run_tool(exec_prefix, &format!("{tool}-save"), &["-t", "nat"], None) {
        let mut t = String::from("*nat\n");
        for _ in nat
            .lines()
            .filter(|l| l.starts_with("-A POSTROUTING ") && l.ends_with(&format!("-j {CHAIN}")))
        {
            t.push_str(&format!("-D POSTROUTING {}\n", hook()));
        }
        if nat
            .lines()
            .any(|l| l == format!(":{CHAIN} - [0:0]") || l.starts_with(&format!(":{CHAIN} ")))
        {
            t.push_str(&format!("-F {CHAIN}\n-X {CHAIN}\n"));
        }
        t.push_str("COMMIT\n");
        if let Err(e) = run_tool(exec_prefix, &format!("{tool}-restore"), &["--noflush"], Some(&t)) {
            errors.push(e);
        }
    }
    for set in [masq_set, all_set] {
        if let Err(e) = run_tool(exec_prefix, "ipset", &["destroy", set], None)
            && !e.to_string().contains("does not exist")
        {
            errors.push(e);
        }
    }
    errors
}
