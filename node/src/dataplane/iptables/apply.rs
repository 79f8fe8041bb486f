//! Converging the kernel to a [`Desired`] rendering: `ipset restore` for sets (a changed set is filled as a
//! temporary set and swapped in, atomically), then one `iptables-restore --noflush` transaction that rewrites
//! only chains whose content changed, deletes chains no longer wanted and hooks `FORWARD` and `INPUT` exactly once each, first.
//!
//! Read-back is `iptables-save` / `ipset save`: calling [`Iptables::apply`] again repairs drift (a deleted or
//! edited rule, a removed hook, a changed set). What the kernel shows for a chain just written is read back
//! when the agent is idle ([`Iptables::remember`]), not between a change and the next; until then the chain
//! is checked as at start. On start nothing is remembered, and a chain whose hash comment
//! and rule count match is adopted as it is, so a restarted agent rewrites nothing and established flows never
//! see a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use super::render::{Desired, HOOKS, IpSet, order_free, render_changes, render_family, set_prefixes};
use crate::dataplane::{Changes, DataplaneModel, Family};

/// Errors running the iptables and ipset tools.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The tool could not be started.
    #[error("running {tool}: {source} (is it installed? `make deps` installs iptables and ipset)")]
    Spawn {
        /// The tool.
        tool: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The tool failed.
    #[error("{tool} failed: {stderr}")]
    Failed {
        /// The tool.
        tool: String,
        /// What it printed.
        stderr: String,
    },
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Chains written (new or changed).
    pub chains_written: usize,
    /// Chains deleted.
    pub chains_deleted: usize,
    /// Sets written (new or changed).
    pub sets_written: usize,
    /// Sets destroyed.
    pub sets_deleted: usize,
    /// Whether the FORWARD hook had to be (re)installed.
    pub hooked: bool,
    /// BPF policy tables written.
    pub tables_written: usize,
    /// BPF policy tables deleted.
    pub tables_deleted: usize,
    /// BPF policy tables changed in place (set members: one lookup key per address).
    pub tables_patched: usize,
    /// BPF endpoint entries written.
    pub endpoints_written: usize,
    /// BPF endpoint entries removed.
    pub endpoints_removed: usize,
}

impl ApplyStats {
    /// Adds another convergence's figures (the other family's).
    pub fn add(&mut self, other: &ApplyStats) {
        self.chains_written += other.chains_written;
        self.chains_deleted += other.chains_deleted;
        self.sets_written += other.sets_written;
        self.sets_deleted += other.sets_deleted;
        self.hooked |= other.hooked;
        self.tables_written += other.tables_written;
        self.tables_deleted += other.tables_deleted;
        self.tables_patched += other.tables_patched;
        self.endpoints_written += other.endpoints_written;
        self.endpoints_removed += other.endpoints_removed;
    }

    /// True when nothing had to change.
    pub fn is_noop(&self) -> bool {
        *self == ApplyStats::default()
    }
}

/// Runs an iptables/ipset tool behind `exec_prefix`, feeding `stdin`; fails with what it printed.
pub fn run_tool(
    exec_prefix: &[String],
    tool: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, IptablesError> {
    let mut argv: Vec<&str> = exec_prefix.iter().map(String::as_str).collect();
    argv.push(tool);
    argv.extend(args);
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn = |source| IptablesError::Spawn {
        tool: tool.to_owned(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            tool: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The iptables backend of one node and one family.
#[derive(Debug, Default)]
pub struct Iptables {
    /// Prepended to every command (for example `ip netns exec NODE`); empty on a real node.
    pub exec_prefix: Vec<String>,
    /// IPv4 (`iptables`) or IPv6 (`ip6tables`).
    family: Family,
    /// What each chain looked like right after this backend last wrote it (as `iptables-save` prints it).
    remembered: Chains,
    /// Chains written whose listing is not read back yet ([`Iptables::remember`] does it when the engine is
    /// idle, so the kernel is not listed between a change and the next one).
    unremembered: BTreeSet<String>,
    /// The rendering last converged to.
    last: Option<Desired>,
}

/// Chain name -> rules (without `-A NAME `), as `iptables-save` prints them.
type Chains = BTreeMap<String, Vec<String>>;

/// A hook from a built-in chain ([`HOOKS`]) as found: rewritten unless there once and first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hooks {
    /// How many copies.
    count: usize,
    /// Whether the built-in chain's first rule is one.
    first: bool,
}

impl Hooks {
    /// A hook known to be in place (the fast path does not read the kernel back).
    const IN_PLACE: Hooks = Hooks {
        count: 1,
        first: true,
    };
}

/// The rules of each hooked built-in chain, in [`HOOKS`] order.
type Builtins = [Vec<String>; 2];

/// Our chains as `iptables-save` shows them, plus the rules of the built-in chains we hook.
fn parse_save(text: &str) -> (Chains, Builtins) {
    let mut chains = Chains::new();
    let mut builtins: Builtins = Default::default();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if name.starts_with("crc-") {
                chains.entry(name.to_owned()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            if chain.starts_with("crc-") {
                chains.entry(chain.to_owned()).or_default().push(rest.to_owned());
            } else if let Some(i) = HOOKS.iter().position(|(b, _)| *b == chain) {
                builtins[i].push(rest.to_owned());
            }
        }
    }
    (chains, builtins)
}

/// The policy sets of `family` as `ipset save` shows them: name -> (type, members). Other sets (the other
/// family's, routing's natOutgoing sets) are not this backend's.
fn parse_ipset_save(text: &str, family: Family) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let ours = |name: &str| set_prefixes(family).iter().any(|p| name.starts_with(p));
    let mut sets: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("create"), Some(name), Some(kind)) if ours(name) => {
                sets.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
            }
            (Some("add"), Some(name), Some(member)) if ours(name) => {
                if let Some(s) = sets.get_mut(name) {
                    s.1.insert(member.to_owned());
                }
            }
            _ => {}
        }
    }
    sets
}

/// The `iptables-restore` lines that turn order-free chain `name` (see [`order_free`]) from `old` into `new`
/// in place: the hash comment replaced, rules that left deleted by their text, rules that joined inserted
/// after the hash comment. None when the chain is not order-free or its first or last rule is not a hash
/// comment and a common final rule (then the chain is rewritten).
fn patch_lines(name: &str, old: &[String], new: &[String]) -> Option<String> {
    if !order_free(name) || old.len() < 2 || new.len() < 2 || old.last() != new.last() {
        return None;
    }
    let body = |c: &[String]| -> BTreeSet<String> { c[1..c.len() - 1].iter().cloned().collect() };
    let (was, now) = (body(old), body(new));
    let mut out = format!("-R {name} 1 {}\n", new[0]);
    for r in was.difference(&now) {
        out.push_str(&format!("-D {name} {r}\n"));
    }
    for r in now.difference(&was) {
        out.push_str(&format!("-I {name} 2 {r}\n"));
    }
    Some(out)
}

impl Iptables {
    /// An IPv4 backend that runs the tools with `exec_prefix` in front (empty: directly).
    pub fn new(exec_prefix: Vec<String>) -> Self {
        Self::for_family(exec_prefix, Family::V4)
    }

    /// A backend for `family`.
    pub fn for_family(exec_prefix: Vec<String>, family: Family) -> Self {
        Self {
            exec_prefix,
            family,
            remembered: BTreeMap::new(),
            unremembered: BTreeSet::new(),
            last: None,
        }
    }

    /// The family this backend programs.
    pub fn family(&self) -> Family {
        self.family
    }

    fn run(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
        run_tool(&self.exec_prefix, tool, args, stdin)
    }

    /// The family's tool: `iptables`, `iptables-save`, `iptables-restore` or their `ip6tables` twins.
    fn tool(&self, suffix: &str) -> String {
        match self.family {
            Family::V4 => format!("iptables{suffix}"),
            Family::V6 => format!("ip6tables{suffix}"),
        }
    }

    fn ipset_family(&self) -> &'static str {
        match self.family {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    fn current(&self) -> Result<(Chains, Builtins), IptablesError> {
        Ok(parse_save(&self.run(
            &self.tool("-save"),
            &["-t", "filter"],
            None,
        )?))
    }

    /// Converges the kernel to `desired`, reading the whole state back first: adopts matching state at start
    /// and repairs any drift. Run it at start and periodically.
    pub fn apply(&mut self, desired: &Desired) -> Result<ApplyStats, IptablesError> {
        let current_sets = parse_ipset_save(&self.run("ipset", &["save"], None)?, self.family);
        let sets: Vec<String> = desired
            .sets
            .iter()
            .filter(|(name, set)| {
                !matches!(current_sets.get(*name), Some((kind, have)) if kind == set.kind && *have == set.members)
            })
            .map(|(n, _)| n.clone())
            .collect();
        let (chains, builtins) = self.current()?;
        let written: Vec<String> = desired
            .chains
            .iter()
            .filter(|(name, rules)| {
                !chains.get(*name).is_some_and(|have| {
                    let hash = rules[0]
                        .trim_start_matches("-m comment --comment \"")
                        .trim_end_matches('"');
                    let hash_ok = have.first().is_some_and(|first| first.contains(hash));
                    let same = match self.remembered.get(*name) {
                        Some(seen) => seen == have,
                        None => have.len() == rules.len(),
                    };
                    hash_ok && same
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        let stale: Vec<String> = chains
            .keys()
            .filter(|c| !desired.chains.contains_key(*c))
            .cloned()
            .collect();
        // Each hook must be its built-in chain's first rule: kube-proxy prepends its own jump to FORWARD (whose
        // KUBE-FORWARD accepts the NodePort traffic it marked for masquerade) when it starts, and policy comes
        // before that.
        let hooks: [Hooks; 2] = std::array::from_fn(|i| {
            let is_hook = |r: &String| r.trim() == format!("-j {}", HOOKS[i].1);
            Hooks {
                count: builtins[i].iter().filter(|r| is_hook(r)).count(),
                first: builtins[i].first().is_some_and(is_hook),
            }
        });
        let stale_sets: Vec<String> = current_sets
            .keys()
            .filter(|n| !desired.sets.contains_key(*n))
            .cloned()
            .collect();
        let mut script = String::new();
        for name in &sets {
            self.set_script(
                &mut script,
                name,
                &desired.sets[name],
                current_sets.contains_key(name),
            );
        }
        let stats = ApplyStats {
            sets_written: sets.len(),
            ..ApplyStats::default()
        };
        // Chains written since the agent was last idle were checked as at start (hash and rule count); those
        // kept are remembered as they are now.
        for name in std::mem::take(&mut self.unremembered) {
            if let Some(rules) = chains.get(&name).filter(|_| !written.contains(&name)) {
                self.remembered.insert(name, rules.clone());
            }
        }
        self.last = None;
        let stats = self.write(desired, script, &written, &[], &stale, hooks, &stale_sets, stats)?;
        self.remembered.retain(|k, _| desired.chains.contains_key(k));
        self.last = Some(desired.clone());
        Ok(stats)
    }

    /// The fast path for changes: brings the rendering last applied up to date with `model` through
    /// [`render_changes`] and writes only what that touched (set members as additions and deletions, chains
    /// whose rules changed), without reading the kernel's state back. Converges in full
    /// ([`Iptables::apply`] of the whole rendering) when nothing was applied yet or the last write failed.
    pub fn apply_changes(
        &mut self,
        model: &DataplaneModel,
        changes: &Changes,
    ) -> Result<ApplyStats, IptablesError> {
        let Some(mut desired) = self.last.take() else {
            return self.apply(&render_family(model, self.family));
        };
        let touched = render_changes(&mut desired, model, changes, self.family);
        let mut stats = ApplyStats::default();
        let mut script = String::new();
        let mut stale_sets = Vec::new();
        for (name, old) in &touched.sets {
            match (old, desired.sets.get(name)) {
                (Some(_), None) => stale_sets.push(name.clone()),
                (None, None) => {}
                (Some(o), Some(n)) if o == n => {}
                (Some(o), Some(n)) if o.kind == n.kind => {
                    for m in n.members.difference(&o.members) {
                        script.push_str(&format!("add {name} {m} -exist\n"));
                    }
                    for m in o.members.difference(&n.members) {
                        script.push_str(&format!("del {name} {m} -exist\n"));
                    }
                    stats.sets_written += 1;
                }
                (o, Some(n)) => {
                    self.set_script(&mut script, name, n, o.is_some());
                    stats.sets_written += 1;
                }
            }
        }
        // Sets patched in place: exactly the members that joined or left.
        for (name, (added, removed)) in &touched.set_deltas {
            for m in added {
                script.push_str(&format!("add {name} {m} -exist\n"));
            }
            for m in removed {
                script.push_str(&format!("del {name} {m} -exist\n"));
            }
            stats.sets_written += 1;
        }
        let mut written: Vec<String> = Vec::new();
        let mut patched: Vec<(String, String)> = Vec::new();
        for (name, old) in &touched.chains {
            let Some(new) = desired.chains.get(name).filter(|n| old.as_ref() != Some(*n)) else {
                continue;
            };
            match old.as_ref().and_then(|o| patch_lines(name, o, new)) {
                Some(lines) => patched.push((name.clone(), lines)),
                None => written.push(name.clone()),
            }
        }
        let stale: Vec<String> = touched
            .chains
            .iter()
            .filter(|(name, old)| old.is_some() && !desired.chains.contains_key(*name))
            .map(|(n, _)| n.clone())
            .collect();
        let result = self.write(
            &desired,
            script,
            &written,
            &patched,
            &stale,
            [Hooks::IN_PLACE; 2],
            &stale_sets,
            stats,
        );
        if result.is_ok() {
            self.last = Some(desired);
        }
        result
    }

    /// Appends to `script` the lines that make set `name` hold exactly `set`: filled in place when it is new,
    /// or as a temporary set swapped in (atomically) when it exists.
    fn set_script(&self, script: &mut String, name: &str, set: &IpSet, exists: bool) {
        let family = self.ipset_family();
        let target = if exists {
            format!("{}{}", set_prefixes(self.family)[2], &name[6..])
        } else {
            name.to_owned()
        };
        script.push_str(&format!(
            "create {target} {} family {family} -exist\nflush {target}\n",
            set.kind
        ));
        for m in &set.members {
            script.push_str(&format!("add {target} {m}\n"));
        }
        if exists {
            script.push_str(&format!("swap {target} {name}\ndestroy {target}\n"));
        }
    }

    /// Runs the set script, writes the chains named, applies `patched` (order-free chains with the rule edits
    /// that bring each up to date), removes the stale chains, fixes the hook unless it is there once and first,
    /// then destroys the stale sets.
    #[expect(
        clippy::too_many_arguments,
        reason = "one plan, spelled out; both apply paths build it"
    )]
    fn write(
        &mut self,
        desired: &Desired,
        set_script: String,
        written: &[String],
        patched: &[(String, String)],
        stale: &[String],
        hooks: [Hooks; 2],
        stale_sets: &[String],
        mut stats: ApplyStats,
    ) -> Result<ApplyStats, IptablesError> {
        // Sets first: rules may reference new ones.
        if !set_script.is_empty() {
            self.run("ipset", &["restore"], Some(&set_script))?;
        }
        let mut restore = String::from("*filter\n");
        // Declare (and so flush) every chain to write before any rule refers to one of them.
        for name in written {
            restore.push_str(&format!(":{name} - [0:0]\n"));
        }
        for name in written {
            for r in &desired.chains[name] {
                restore.push_str(&format!("-A {name} {r}\n"));
            }
        }
        for (_, lines) in patched {
            restore.push_str(lines);
        }
        for (h, (builtin, chain)) in hooks.iter().zip(HOOKS) {
            if !(h.count == 1 && h.first) {
                for _ in 0..h.count {
                    restore.push_str(&format!("-D {builtin} -j {chain}\n"));
                }
                restore.push_str(&format!("-I {builtin} 1 -j {chain}\n"));
                stats.hooked = true;
            }
        }
        for c in stale {
            restore.push_str(&format!("-F {c}\n"));
        }
        for c in stale {
            restore.push_str(&format!("-X {c}\n"));
        }
        restore.push_str("COMMIT\n");
        stats.chains_written = written.len() + patched.len();
        stats.chains_deleted = stale.len();
        if stats.chains_written > 0 || !stale.is_empty() || stats.hooked {
            self.run(&self.tool("-restore"), &["--noflush"], Some(&restore))?;
        }
        // What the kernel shows for what we wrote is read back later (`remember`), off the path of changes.
        for name in written.iter().chain(patched.iter().map(|(n, _)| n)) {
            self.remembered.remove(name);
            self.unremembered.insert(name.clone());
        }
        for c in stale {
            self.remembered.remove(c);
            self.unremembered.remove(c);
        }
        // Sets no rule references any more.
        for name in stale_sets {
            if self.run("ipset", &["destroy", name], None).is_ok() {
                stats.sets_deleted += 1;
            }
        }
        Ok(stats)
    }

    /// Reads back what the kernel shows for the chains written since the last call, so a later edit of one
    /// of their rules is noticed as drift by the next full converge. The engine calls it when no change is
    /// waiting: a few chains are listed one by one, many through one full save.
    pub fn remember(&mut self) -> Result<(), IptablesError> {
        if self.unremembered.is_empty() {
            return Ok(());
        }
        let names = std::mem::take(&mut self.unremembered);
        let listed: Result<Vec<(String, Vec<String>)>, IptablesError> = if names.len() > 20 {
            self.current().map(|(after, _)| {
                names
                    .iter()
                    .filter_map(|n| after.get(n).map(|r| (n.clone(), r.clone())))
                    .collect()
            })
        } else {
            names
                .iter()
                .map(|name| {
                    let listed = self.run(&self.tool(""), &["-S", name], None)?;
                    let rules = listed
                        .lines()
                        .filter_map(|l| l.strip_prefix(&format!("-A {name} ")).map(str::to_owned))
                        .collect();
                    Ok((name.clone(), rules))
                })
                .collect()
        };
        match listed {
            Ok(l) => {
                self.remembered.extend(l);
                Ok(())
            }
            Err(e) => {
                // Try again next time.
                self.unremembered.extend(names);
                Err(e)
            }
        }
    }

    /// Removes everything this backend created: the hook, every `crc-` chain and every `crc-` set.
    /// Keeps going after errors and reports them all.
    pub fn remove_all(&mut self) -> Result<(), Vec<IptablesError>> {
        let mut errors = Vec::new();
        match self.current() {
            Ok((chains, builtins)) => {
                let mut restore = String::from("*filter\n");
                for (rules, (builtin, chain)) in builtins.iter().zip(HOOKS) {
                    for r in rules.iter().filter(|r| r.contains(&format!("-j {chain}"))) {
                        restore.push_str(&format!("-D {builtin} {r}\n"));
                    }
                }
                for c in chains.keys() {
                    restore.push_str(&format!("-F {c}\n"));
                }
                for c in chains.keys() {
                    restore.push_str(&format!("-X {c}\n"));
                }
                restore.push_str("COMMIT\n");
                if let Err(e) = self.run(&self.tool("-restore"), &["--noflush"], Some(&restore)) {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(e),
        }
        match self.run("ipset", &["save"], None) {
            Ok(text) => {
                for name in parse_ipset_save(&text, self.family).keys() {
                    if let Err(e) = self.run("ipset", &["destroy", name], None) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        self.remembered.clear();
        self.unremembered.clear();
        self.last = None;
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}
