//! The agent's own update path (`agent::pipeline`, what the policy engine runs) against a full computation:
//! thousands of random datastore changes (pods, labels, namespaces, service accounts, policies of every kind,
//! tiers, network sets, EndpointSlices, objects that fail to convert, deletions, relists, IPAM assignments),
//! and after each one the incremental model must equal `compute` over a world built from scratch by the
//! loader `caracalctl` uses, with the documented rule for objects that fail to convert: the last good
//! version, else the fail-closed form of a policy, else nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use caracal_datastore::Update;
use caracal_node::agent::pipeline::Pipeline;
use caracal_node::cni::host_iface;
use caracal_node::dataplane::Family;
use caracal_node::dataplane::iptables::render;
use caracal_policy::calc::{compute, local_endpoints};
use caracal_policy::decode::{DATAPLANE_KINDS, Input, decode, fail_closed_input};
use caracal_policy::load::WorldBuilder;
use caracal_policy::synth::Rng;
use serde_json::{Value, json};

const NODE: &str = "node-a";
const NAMESPACES: u64 = 5;

/// What the datastore holds, as the oracle sees it: each object's current version and its last version
/// that converted.
#[derive(Default)]
struct Store {
    objects: BTreeMap<(String, String), (Value, Option<Value>)>,
    held: BTreeMap<String, Vec<IpAddr>>,
}

impl Store {
    fn upsert(&mut self, kind: &str, key: &str, v: Value) {
        let good = decode(kind, key, &v).is_ok();
        let entry = self
            .objects
            .entry((kind.to_owned(), key.to_owned()))
            .or_insert((Value::Null, None));
        if good {
            entry.1 = Some(v.clone());
        }
        entry.0 = v;
    }

    /// The model a full computation gives for what the store holds.
    fn oracle(&self) -> caracal_policy::model::DataplaneModel {
        let mut b = WorldBuilder::default();
        for ((kind, key), (current, last_good)) in &self.objects {
            let input = match (decode(kind, key, current), last_good) {
                (Ok(i), _) => i,
                (Err(_), Some(good)) => decode(kind, key, good).ok().flatten(),
                (Err(_), None) => fail_closed_input(kind, current),
            };
            match input {
                Some(Input::Pod(mut ep)) => {
                    if ep.node.as_deref() == Some(NODE)
                        && let Some(ips) = self.held.get(&ep.key())
                    {
                        ep.ips.clone_from(ips);
                    }
                    b.add(Input::Pod(ep));
                }
                Some(i) => b.add(i),
                None => {}
            }
        }
        let world = b.finish();
        let local = local_endpoints(&world, NODE, |e| host_iface(&e.namespace, &e.name));
        compute(&world, &local)
    }
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

fn ns(rng: &mut Rng) -> String {
    format!("ns-{}", rng.below(NAMESPACES))
}

fn namespace(rng: &mut Rng, name: &str) -> Value {
    let mut labels = serde_json::Map::new();
    if rng.below(2) == 0 {
        labels.insert("team".into(), pick(rng, &["ops", "dev"]).into());
    }
    if rng.below(3) == 0 {
        labels.insert("env".into(), "prod".into());
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(rng: &mut Rng, ns: &str, idx: u64) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("app".into(), format!("app-{}", rng.below(4)).into());
    if rng.below(3) == 0 {
        labels.insert("monitored".into(), "true".into());
    }
    let n: u64 = ns.trim_start_matches("ns-").parse().unwrap_or(0);
    let ip = format!("10.{n}.{}.{}", idx / 200, idx % 200 + 1);
    let mut status = json!({});
    match rng.below(6) {
        0 => {}
        1 => status = json!({"podIP": ip, "podIPs": [{"ip": ip}, {"ip": format!("fd00::{n}:{idx}")}]}),
        _ => status = json!({"podIP": ip}),
    }
    let ports = if rng.below(2) == 0 {
        json!([{"name": "http", "containerPort": 8080 + rng.below(2), "protocol": "TCP"}])
    } else {
        json!([])
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{idx}"), "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": pick(rng, &[NODE, NODE, "node-b"]),
            "serviceAccountName": pick(rng, &["default", "sa-1"]),
            "hostNetwork": rng.below(20) == 0,
            "containers": [{"name": "c", "ports": ports}]
        },
        "status": status
    })
}

fn service_account(rng: &mut Rng, ns: &str) -> Value {
    let labels = if rng.below(2) == 0 {
        json!({"role": "monitor"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "ServiceAccount",
           "metadata": {"name": "sa-1", "namespace": ns, "labels": labels}})
}

/// A source or destination: one of the things a rule can match on.
fn entity(rng: &mut Rng, namespaced: bool) -> Value {
    match rng.below(9) {
        0 => json!({"selector": format!("app == 'app-{}'", rng.below(4))}),
        1 => json!({"selector": "has(monitored)", "namespaceSelector": "team == 'ops'"}),
        2 => json!({"namespaceSelector": "env == 'prod'"}),
        3 => json!({"serviceAccounts": {"selector": "role == 'monitor'"}}),
        4 => json!({"serviceAccounts": {"names": ["sa-1"]}}),
        5 => json!({"nets": ["192.168.0.0/16"], "notNets": ["192.168.7.0/24"]}),
        6 => json!({"selector": "kind == 'external'"}),
        7 if namespaced => json!({"services": {"name": "svc-0"}}),
        7 => json!({"services": {"name": "svc-0", "namespace": "ns-1"}}),
        _ => json!({"notSelector": format!("app == 'app-{}'", rng.below(4))}),
    }
}

fn rule(rng: &mut Rng, namespaced: bool) -> Value {
    let mut r = json!({"action": pick(rng, &["Allow", "Allow", "Deny", "Pass", "Log"])});
    match rng.below(4) {
        0 => r["source"] = entity(rng, namespaced),
        1 => r["destination"] = entity(rng, namespaced),
        2 => {
            r["source"] = entity(rng, namespaced);
            r["protocol"] = "TCP".into();
            r["destination"] = json!({"ports": [8080, "http"]});
        }
        _ => {}
    }
    r
}

/// A selector, one time in ten broken (the object then fails to convert).
fn selector(rng: &mut Rng) -> Value {
    if rng.below(10) == 0 {
        "app == ".into()
    } else {
        format!("app in {{'app-{}', 'app-{}'}}", rng.below(4), rng.below(4)).into()
    }
}

fn caracal_policy(rng: &mut Rng, ns: &str, idx: u64, global: bool) -> Value {
    let mut spec = json!({
        "selector": selector(rng),
        "order": rng.below(5) * 10,
        "ingress": (0..rng.below(3)).map(|_| rule(rng, !global)).collect::<Vec<_>>(),
        "egress": (0..rng.below(3)).map(|_| rule(rng, !global)).collect::<Vec<_>>(),
    });
    match rng.below(5) {
        0 => spec["tier"] = "security".into(),
        1 => spec["tier"] = "missing".into(),
        _ => {}
    }
    if rng.below(3) == 0 {
        spec["types"] = json!(["Ingress", "Egress"]);
    }
    if rng.below(8) == 0 {
        spec["performanceHints"] = json!(["AssumeNeededOnEveryNode"]);
    }
    if global {
        if rng.below(2) == 0 {
            spec["namespaceSelector"] = "team == 'ops'".into();
        }
        json!({"apiVersion": "caracal.dev/v1", "kind": "GlobalNetworkPolicy",
               "metadata": {"name": format!("g-{idx}")}, "spec": spec})
    } else {
        json!({"apiVersion": "caracal.dev/v1", "kind": "NetworkPolicy",
               "metadata": {"name": format!("p-{idx}"), "namespace": ns}, "spec": spec})
    }
}

fn k8s_policy(rng: &mut Rng, ns: &str, idx: u64) -> Value {
    let peer = match rng.below(3) {
        0 => json!({"podSelector": {"matchLabels": {"app": format!("app-{}", rng.below(4))}}}),
        1 => json!({"namespaceSelector": {"matchLabels": {"team": "ops"}}}),
        _ => json!({"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}),
    };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("k-{idx}"), "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("app-{}", rng.below(4))}},
            "ingress": [{"from": [peer], "ports": [{"port": 8080}, {"port": "http"}]}],
            "egress": [{"to": [{"podSelector": {}}]}],
            "policyTypes": if rng.below(2) == 0 { json!(["Ingress"]) } else { json!(["Ingress", "Egress"]) }
        }
    })
}

fn tier(rng: &mut Rng) -> Value {
    json!({"apiVersion": "caracal.dev/v1", "kind": "Tier", "metadata": {"name": "security"},
           "spec": {"order": pick(rng, &["10", "5000000"]).parse::<f64>().unwrap_or(10.0),
                    "defaultAction": pick(rng, &["Deny", "Pass"])}})
}

fn network_set(rng: &mut Rng, ns: &str, idx: u64, global: bool) -> Value {
    let nets = if rng.below(12) == 0 {
        json!(["not-a-cidr"])
    } else {
        json!([format!("172.16.{}.0/24", rng.below(4)), "203.0.113.7"])
    };
    let labels = json!({"kind": pick(rng, &["external", "internal"])});
    if global {
        json!({"apiVersion": "caracal.dev/v1", "kind": "GlobalNetworkSet",
               "metadata": {"name": format!("gs-{idx}"), "labels": labels}, "spec": {"nets": nets}})
    } else {
        json!({"apiVersion": "caracal.dev/v1", "kind": "NetworkSet",
               "metadata": {"name": format!("s-{idx}"), "namespace": ns, "labels": labels}, "spec": {"nets": nets}})
    }
}

fn slice(rng: &mut Rng, ns: &str, idx: u64) -> Value {
    let n: u64 = ns.trim_start_matches("ns-").parse().unwrap_or(0);
    let endpoints: Vec<Value> = (0..rng.below(4))
        .map(|_| {
            let i = rng.below(12);
            json!({"addresses": [format!("10.{n}.0.{}", i + 1)],
                   "conditions": {"serving": rng.below(4) != 0}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": format!("svc-{}-{idx}", rng.below(2)), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": format!("svc-{}", rng.below(2))}},
           "ports": [{"port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}

fn kind_and_key(v: &Value) -> (String, String) {
    let kind = format!(
        "{}/{}",
        v["apiVersion"].as_str().unwrap_or(""),
        v["kind"].as_str().unwrap_or("")
    );
    let name = v["metadata"]["name"].as_str().unwrap_or("");
    let key = match v["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    };
    (kind, key)
}

/// A random object of a random kind.
fn object(rng: &mut Rng) -> Value {
    let n = ns(rng);
    let (i, flag) = (rng.below(12), rng.below(3) == 0);
    match rng.below(10) {
        0 => namespace(rng, &n),
        1..=3 => pod(rng, &n, i),
        4 => service_account(rng, &n),
        5 => caracal_policy(rng, &n, i % 6, flag),
        6 => k8s_policy(rng, &n, i % 3),
        7 => tier(rng),
        8 => network_set(rng, &n, i % 3, flag),
        _ => slice(rng, &n, i % 2),
    }
}

fn apply(p: &mut Pipeline, store: &mut Store, rng: &mut Rng) -> &'static str {
    match rng.below(20) {
        0..=11 => {
            let v = object(rng);
            let (kind, key) = kind_and_key(&v);
            store.upsert(&kind, &key, v.clone());
            p.update(Update::Upsert { kind, key, object: v });
            "upsert"
        }
        12..=15 => {
            let keys: Vec<(String, String)> = store.objects.keys().cloned().collect();
            if keys.is_empty() {
                return "nothing to delete";
            }
            let (kind, key) = keys[rng.below(keys.len() as u64) as usize].clone();
            store.objects.remove(&(kind.clone(), key.clone()));
            p.update(Update::Delete { kind, key });
            "delete"
        }
        16 | 17 => {
            // IPAM hands a local pod an address (or takes it back).
            let key = format!("{}/pod-{}", ns(rng), rng.below(12));
            if rng.below(3) == 0 {
                store.held.remove(&key);
            } else {
                let ip: IpAddr = format!("10.99.{}.{}", rng.below(4), rng.below(250) + 1)
                    .parse()
                    .unwrap_or(IpAddr::from([10, 99, 0, 1]));
                store.held.insert(key, vec![ip]);
            }
            p.set_held(store.held.clone());
            "held"
        }
        _ => {
            // A relist after a lost watch: some objects vanished meanwhile, some changed.
            let kind = DATAPLANE_KINDS[rng.below(DATAPLANE_KINDS.len() as u64) as usize];
            p.update(Update::Resync { kind: kind.into() });
            let keys: Vec<(String, String)> =
                store.objects.keys().filter(|(k, _)| k == kind).cloned().collect();
            for id in keys {
                if rng.below(4) == 0 {
                    store.objects.remove(&id);
                    continue;
                }
                let current = store.objects[&id].0.clone();
                p.update(Update::Upsert {
                    kind: id.0.clone(),
                    key: id.1.clone(),
                    object: current,
                });
            }
            p.update(Update::InSync { kind: kind.into() });
            "relist"
        }
    }
}

#[test]
fn the_agents_update_path_equals_a_full_computation_after_every_change() {
    let mut exercised = (0, 0, 0);
    for seed in [1u64, 7, 42, 1234] {
        let mut rng = Rng(seed * 1_000_003 + 1);
        let mut p = Pipeline::new(NODE);
        let mut store = Store::default();
        for kind in DATAPLANE_KINDS {
            p.update(Update::InSync { kind: (*kind).into() });
        }
        assert!(p.in_sync());
        for step in 0..1500 {
            let what = apply(&mut p, &mut store, &mut rng);
            let _ = p.take_changes();
            let want = store.oracle();
            assert!(
                p.model() == &want,
                "seed {seed}, step {step} ({what}): the agent's model diverged from a full computation\n\
                 agent:  {:#?}\nfull:   {want:#?}",
                p.model()
            );
            exercised.0 += usize::from(!want.policies.is_empty());
            exercised.1 += usize::from(want.sets.values().any(|s| !s.nets.is_empty()));
            exercised.2 += usize::from(want.endpoints.len() > 3);
        }
    }
    assert!(
        exercised.0 > 1000 && exercised.1 > 1000 && exercised.2 > 1000,
        "the sequences exercised policies, non-empty sets and several local endpoints: {exercised:?}"
    );
}

#[test]
fn changes_name_exactly_what_a_rendering_must_rewrite() {
    // Applying the recorded changes to the previous model's rendering gives the new model's: nothing that
    // changed is left out of `Changes`.
    let mut rng = Rng(99);
    let mut p = Pipeline::new(NODE);
    let mut store = Store::default();
    for kind in DATAPLANE_KINDS {
        p.update(Update::InSync { kind: (*kind).into() });
    }
    let mut before = p.model().clone();
    let _ = p.take_changes();
    let families = [Family::V4, Family::V6];
    let mut renderings = families.map(|f| render::render_family(&before, f));
    for step in 0..1500 {
        apply(&mut p, &mut store, &mut rng);
        let changes = p.take_changes();
        let after = p.model();
        for (k, v) in &after.sets {
            let old = before.sets.get(k);
            match (changes.sets.contains(k), changes.members.get(k), old) {
                (true, _, _) => {}
                (false, None, Some(o)) => {
                    assert!(o == v, "step {step}: set {k:?} changed without being reported")
                }
                (false, Some(d), Some(o)) => {
                    let mut patched = o.clone();
                    patched.nets.retain(|n| !d.removed.nets.contains(n));
                    patched.ip_ports.retain(|x| !d.removed.ip_ports.contains(x));
                    patched.nets.extend(d.added.nets.iter().copied());
                    patched.ip_ports.extend(d.added.ip_ports.iter().copied());
                    assert!(
                        &patched == v,
                        "step {step}: set {k:?}: the reported members are not the change"
                    );
                }
                (false, _, None) => panic!("step {step}: set {k:?} added without being reported"),
            }
        }
        // What a backend does with the changes gives what a full rendering gives.
        for (f, d) in families.iter().zip(renderings.iter_mut()) {
            render::render_changes(d, after, &changes, *f);
            assert!(
                *d == render::render_family(after, *f),
                "step {step}: {f:?}: patching the rendering with the changes differs from rendering anew"
            );
        }
        for k in before.sets.keys().filter(|k| !after.sets.contains_key(*k)) {
            assert!(
                changes.sets.contains(k),
                "step {step}: set {k:?} removed without being reported"
            );
        }
        for (k, v) in &after.policies {
            assert!(
                before.policies.get(k) == Some(v) || changes.policies.contains(k),
                "step {step}: policy {k} changed without being reported"
            );
        }
        for k in before
            .policies
            .keys()
            .filter(|k| !after.policies.contains_key(*k))
        {
            assert!(
                changes.policies.contains(k),
                "step {step}: policy {k} removed without being reported"
            );
        }
        let ifaces = |m: &caracal_policy::model::DataplaneModel| {
            m.endpoints
                .iter()
                .map(|e| {
                    (
                        e.iface.clone(),
                        (e.clone(), m.endpoint_tiers.get(&e.iface).cloned()),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let (was, is) = (ifaces(&before), ifaces(after));
        for k in was.keys().chain(is.keys()) {
            assert!(
                was.get(k) == is.get(k) || changes.endpoints.contains(k),
                "step {step}: endpoint {k} changed without being reported"
            );
        }
        before = after.clone();
    }
}

/// What a full computation says an endpoint's table for one direction holds (as the BPF backend compiles
/// it: the endpoint's own named ports address-less); None when the list does not fit a table.
fn expected_image(
    model: &caracal_policy::model::DataplaneModel,
    ep: &caracal_policy::model::LocalEndpoint,
    egress: bool,
) -> Option<caracal_node::dataplane::bpf::tables::Image> {
    use caracal_policy::classify::{Own, compile_for, flatten};
    use caracal_policy::ir::Direction;
    let tiers = model.endpoint_tiers.get(&ep.iface);
    let list = tiers.map_or(&[][..], |t| if egress { &t.egress[..] } else { &t.ingress[..] });
    let dir = if egress {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let entries = flatten(list, &model.policies, dir);
    let compiled = compile_for(
        &entries,
        model,
        Some(Own {
            source: egress,
            ips: &ep.ips,
        }),
    );
    caracal_node::dataplane::bpf::tables::image(&entries, &compiled)
        .ok()
        .map(|i| i.canonical())
}

#[test]
fn the_bpf_backend_updated_by_changes_holds_what_a_full_computation_gives() {
    // The BPF backend programmed change by change (tables patched in place where only members moved,
    // endpoints reached through the policies they use) leaves every local endpoint on the tables a full
    // computation of the model gives, content and content hash, after every change. Needs root.
    use caracal_node::dataplane::PolicyDataplane;
    use caracal_node::dataplane::bpf::backend::BpfDataplane;
    assert!(
        nix::unistd::geteuid().is_root(),
        "the BPF backend test needs root (make test runs as root)"
    );
    let node = caracal_e2e::netns::node("bpfupd").expect("node namespace");
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/caracal-test-upd-{}", std::process::id()));
    let _ = caracal_node::dataplane::bpf::remove_all(&pins);
    let mut backend = BpfDataplane::with_pins(&pins, &node.exec_prefix());
    let mut rng = Rng(4242);
    let mut p = Pipeline::new(NODE);
    let mut store = Store::default();
    for kind in DATAPLANE_KINDS {
        p.update(Update::InSync { kind: (*kind).into() });
    }
    let _ = p.take_changes();
    backend.converge(p.model()).expect("first converge");
    let mut wired: std::collections::BTreeSet<String> = Default::default();
    let (mut checked, mut patched) = (0usize, 0usize);
    for step in 0..600 {
        let what = apply(&mut p, &mut store, &mut rng);
        let changes = p.take_changes();
        let model = p.model();
        for ep in &model.endpoints {
            if wired.insert(ep.iface.clone()) {
                let peer = format!("pe{}", wired.len());
                node.ip(&["link", "add", &ep.iface, "type", "veth", "peer", "name", &peer])
                    .expect("endpoint interface");
            }
        }
        let stats = backend.update(model, &changes).expect("update");
        patched += stats.tables_patched;
        let links = node.ip(&["-o", "link"]).expect("links");
        let ifindex = |iface: &str| {
            links.lines().find_map(|l| {
                let mut parts = l.split(": ");
                let index = parts.next()?.trim().parse::<u32>().ok()?;
                (parts.next()?.split('@').next()? == iface).then_some(index)
            })
        };
        let loaded = backend.loaded().expect("loaded");
        let entries = loaded.endpoint_entries().expect("entries");
        for ep in &model.endpoints {
            let index = ifindex(&ep.iface).expect("the interface exists");
            let entry = entries
                .get(&index)
                .unwrap_or_else(|| panic!("step {step} ({what}): {} has no endpoint entry", ep.iface));
            for (d, egress) in [(0usize, true), (1, false)] {
                let Some(want) = expected_image(model, ep, egress) else {
                    continue;
                };
                let got = loaded
                    .read_table(entry.table[d])
                    .expect("read")
                    .map(|i| i.canonical())
                    .unwrap_or_else(|| panic!("step {step} ({what}): {}'s table is missing", ep.iface));
                assert!(
                    got == want,
                    "step {step} ({what}): {} {} holds a table that differs from a full computation\n\
                     got:  {got:?}\nwant: {want:?}",
                    ep.iface,
                    if egress { "egress" } else { "ingress" }
                );
                checked += 1;
            }
        }
    }
    let _ = backend.remove_all();
    assert!(
        checked > 1000 && patched > 20,
        "the sequence checked endpoint tables ({checked}) and patched tables in place ({patched})"
    );
}
