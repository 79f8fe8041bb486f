//! The policy contract table: scenarios (manifests plus expected verdicts) that every policy backend must
//! answer identically. The offline evaluator is tested against it here; the data plane backends' kernel tests
//! replay the same scenarios with real packets.
//!
//! The world: namespaces x, y, z (z labelled `team: ops`), pods a, b, c in x, pods a, b in y, pods a, c in z.
//! x/a serves a container port named `http` (80/TCP), x/b one named `dns` (53/UDP); z/a runs as service
//! account `monitor`. Scenarios with `services` rules bring their own EndpointSlices (Services are not
//! objects policy reads: a Service is its slices).

use crate::eval::Packet;
use crate::load::{Loaded, load_documents};
use crate::matrix::{self, ProbePort};

/// A scenario's world: [`WORLD`] with `manifests` added, decoded as the agent decodes objects.
pub fn load_world(manifests: &str) -> Result<Loaded, String> {
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(WORLD).chain(serde_yaml::Deserializer::from_str(manifests)) {
        let v: serde_json::Value =
            serde::Deserialize::deserialize(de).map_err(|e| format!("scenario YAML: {e}"))?;
        if !v.is_null() {
            docs.push(("scenario".to_owned(), v));
        }
    }
    load_documents(docs).map_err(|e| e.to_string())
}

/// The packet `check` sends: from the first address of its source pod to the first of its destination pod;
/// the port is `PORT/PROTO`, or `TYPE.CODE/ICMP` for ICMP.
pub fn check_packet(loaded: &Loaded, check: &Check) -> Result<Packet, String> {
    let (from, to, port, _) = *check;
    let find = |k: &str| {
        loaded
            .world
            .endpoints
            .iter()
            .find(|e| e.key() == k)
            .ok_or_else(|| format!("no pod {k}"))
    };
    let (a, b) = (find(from)?, find(to)?);
    if let Some(icmp) = port.strip_suffix("/ICMP") {
        let parsed = icmp
            .split_once('.')
            .and_then(|(t, c)| Some((t.parse().ok()?, c.parse().ok()?)));
        let icmp = parsed.ok_or_else(|| format!("{port}: expected TYPE.CODE/ICMP"))?;
        let (src, dst) = (
            *a.ips.first().ok_or("a pod without an address")?,
            *b.ips.first().ok_or("a pod without an address")?,
        );
        return Ok(Packet {
            src,
            dst,
            protocol: 1,
            src_port: None,
            dst_port: None,
            icmp: Some(icmp),
        });
    }
    let port: ProbePort = port.parse().map_err(|e| format!("{port}: {e}"))?;
    matrix::packet(a, b, port).ok_or_else(|| format!("{from} -> {to}: no address of one family"))
}

/// One check: (from, to, "PORT/PROTO", allowed).
pub type Check = (&'static str, &'static str, &'static str, bool);

/// A scenario: its name, the policy manifests (YAML, multi-document), and the expected verdicts.
pub struct Scenario {
    /// What it shows.
    pub name: &'static str,
    /// Policies, tiers, network sets and EndpointSlices (added to the world below).
    pub manifests: &'static str,
    /// Expected verdicts.
    pub checks: Vec<Check>,
}

/// The namespaces, pods and service accounts every scenario runs in.
pub const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Namespace
metadata: {name: z, labels: {ns: z, team: ops}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: monitor, namespace: z, labels: {role: monitoring}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a, app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 80, protocol: TCP}]}]}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b, app: dns}}
spec: {containers: [{name: c, ports: [{name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: x, labels: {pod: c}}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: y, labels: {pod: a, app: web}}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {pod: b}}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: z, labels: {pod: a}}
spec: {serviceAccountName: monitor}
status: {podIP: 10.0.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: z, labels: {pod: c}}
status: {podIP: 10.0.3.3}
"#;

/// Every scenario.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "no policy allows everything",
            manifests: "",
            checks: vec![("x/b", "x/a", "80/TCP", true), ("y/a", "z/c", "81/UDP", true)],
        },
        Scenario {
            name: "k8s default deny ingress in x",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", false),
                ("x/b", "x/a", "80/TCP", false),
                ("x/a", "y/a", "80/TCP", true),
            ],
        },
        Scenario {
            name: "k8s default deny egress in x",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Egress]}\n",
            checks: vec![
                ("x/a", "y/a", "80/TCP", false),
                ("x/a", "x/b", "80/TCP", false),
                ("y/a", "x/a", "80/TCP", true),
            ],
        },
        Scenario {
            name: "k8s allow from podSelector in the same namespace only",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
            checks: vec![
                ("x/b", "x/a", "80/TCP", true),
                ("y/b", "x/a", "80/TCP", false),
                ("x/c", "x/a", "80/TCP", false),
                ("x/c", "x/b", "80/TCP", true),
            ],
        },
        Scenario {
            name: "k8s allow from namespaceSelector",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", true),
                ("y/b", "x/a", "80/TCP", true),
                ("x/b", "x/a", "80/TCP", false),
                ("z/a", "x/a", "80/TCP", false),
            ],
        },
        Scenario {
            name: "k8s namespaceSelector and podSelector together",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]\n",
            checks: vec![
                ("y/b", "x/a", "80/TCP", true),
                ("y/a", "x/a", "80/TCP", false),
                ("x/b", "x/a", "80/TCP", false),
            ],
        },
        Scenario {
            name: "k8s namespaceSelector matchExpressions",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}}]}]\n",
            checks: vec![
                ("y/a", "x/c", "80/TCP", true),
                ("z/c", "x/c", "80/TCP", true),
                ("x/a", "x/c", "80/TCP", false),
            ],
        },
        Scenario {
            name: "k8s ipBlock with except",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}]}]\n",
            checks: vec![
                ("z/a", "x/a", "80/TCP", true),
                ("x/b", "x/a", "80/TCP", true),
                ("y/a", "x/a", "80/TCP", false),
            ],
        },
        Scenario {
            name: "k8s port and protocol",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80, protocol: TCP}]}]\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", true),
                ("y/a", "x/a", "81/TCP", false),
                ("y/a", "x/a", "80/UDP", false),
            ],
        },
        Scenario {
            name: "k8s port protocol defaults to TCP",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80}]}]\n",
            checks: vec![("y/a", "x/a", "80/TCP", true), ("y/a", "x/a", "80/UDP", false)],
        },
        Scenario {
            name: "k8s named port",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: http}]}]\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", true),
                ("y/a", "x/a", "81/TCP", false),
                ("y/a", "x/c", "80/TCP", false),
            ],
        },
        Scenario {
            name: "k8s named UDP port",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{ports: [{port: dns, protocol: UDP}]}]\n",
            checks: vec![("y/a", "x/b", "53/UDP", true), ("y/a", "x/b", "53/TCP", false)],
        },
        Scenario {
            name: "k8s endPort range",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 8000, endPort: 8100, protocol: TCP}]}]\n",
            checks: vec![
                ("y/a", "x/a", "8000/TCP", true),
                ("y/a", "x/a", "8100/TCP", true),
                ("y/a", "x/a", "8101/TCP", false),
                ("y/a", "x/a", "7999/TCP", false),
            ],
        },
        Scenario {
            name: "k8s egress allows only DNS to x/b",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: b}}}], ports: [{port: 53, protocol: UDP}]}]\n",
            checks: vec![
                ("y/a", "x/b", "53/UDP", true),
                ("y/a", "x/b", "80/TCP", false),
                ("y/a", "x/a", "53/UDP", false),
                ("y/b", "x/a", "80/TCP", true),
            ],
        },
        Scenario {
            name: "k8s two policies union",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p1, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p2, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]\n",
            checks: vec![
                ("x/b", "x/a", "80/TCP", true),
                ("x/c", "x/a", "80/TCP", true),
                ("y/a", "x/a", "80/TCP", false),
            ],
        },
        Scenario {
            name: "k8s empty ingress rule allows all",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n",
            checks: vec![("y/a", "x/a", "80/TCP", true), ("z/c", "x/b", "9/UDP", true)],
        },
        Scenario {
            name: "k8s policyTypes Egress only leaves ingress open",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {}}]}]\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", true),
                ("x/a", "x/b", "80/TCP", true),
                ("x/a", "y/a", "80/TCP", false),
            ],
        },
        Scenario {
            name: "k8s matchExpressions DoesNotExist",
            manifests: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: DoesNotExist}]}\n",
            checks: vec![("y/a", "x/c", "80/TCP", false), ("y/a", "x/a", "80/TCP", true)],
        },
        Scenario {
            name: "caracal deny before allow by order",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: allow, namespace: x}\nspec: {order: 200, selector: pod == 'a', ingress: [{action: Allow}]}\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: deny-y, namespace: x}\nspec:\n  order: 100\n  selector: pod == 'a'\n  ingress: [{action: Deny, source: {namespaceSelector: ns == 'y'}}]\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", false),
                ("z/a", "x/a", "80/TCP", true),
                ("x/b", "x/a", "80/TCP", true),
            ],
        },
        Scenario {
            name: "caracal same order ties break by name",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: b-allow, namespace: x}\nspec: {order: 10, selector: pod == 'a', ingress: [{action: Allow}]}\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: a-deny, namespace: x}\nspec: {order: 10, selector: pod == 'a', ingress: [{action: Deny}]}\n",
            checks: vec![("y/a", "x/a", "80/TCP", false)],
        },
        Scenario {
            name: "caracal first matching rule in a policy decides",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'a'\n  ingress:\n  - {action: Allow, protocol: TCP, destination: {ports: [80]}}\n  - {action: Deny}\n",
            checks: vec![("y/a", "x/a", "80/TCP", true), ("y/a", "x/a", "443/TCP", false)],
        },
        Scenario {
            name: "caracal Log continues to the next rule",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'a'\n  ingress: [{action: Log}, {action: Allow, source: {selector: pod == 'b'}}]\n",
            checks: vec![("x/b", "x/a", "80/TCP", true), ("x/c", "x/a", "80/TCP", false)],
        },
        Scenario {
            name: "caracal rule selector without namespaceSelector stays in the policy namespace",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'a'\n  ingress: [{action: Allow, source: {selector: pod == 'b'}}]\n",
            checks: vec![("x/b", "x/a", "80/TCP", true), ("y/b", "x/a", "80/TCP", false)],
        },
        Scenario {
            name: "caracal notSelector",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'a'\n  ingress: [{action: Allow, source: {notSelector: pod == 'c'}}]\n",
            checks: vec![("x/b", "x/a", "80/TCP", true), ("x/c", "x/a", "80/TCP", false)],
        },
        Scenario {
            name: "caracal nets and notNets",
            manifests: "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: pod == 'a' && app == 'web'\n  ingress: [{action: Allow, source: {nets: [10.0.0.0/16], notNets: [10.0.3.0/24]}}]\n",
            checks: vec![
                ("x/b", "x/a", "80/TCP", true),
                ("z/c", "x/a", "80/TCP", false),
                ("x/b", "y/a", "80/TCP", true),
            ],
        },
        Scenario {
            name: "caracal port range and notPorts",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'a'\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: ['8000:9000'], notPorts: [8080]}}]\n",
            checks: vec![
                ("y/a", "x/a", "8000/TCP", true),
                ("y/a", "x/a", "9000/TCP", true),
                ("y/a", "x/a", "8080/TCP", false),
                ("y/a", "x/a", "9001/TCP", false),
            ],
        },
        Scenario {
            name: "caracal named port",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: all()\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [http]}}]\n",
            checks: vec![("y/a", "x/a", "80/TCP", true), ("y/a", "x/b", "80/TCP", false)],
        },
        Scenario {
            name: "caracal protocol and notProtocol",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'b'\n  ingress: [{action: Allow, protocol: 17}, {action: Allow, notProtocol: TCP}]\n",
            checks: vec![
                ("y/a", "x/b", "53/UDP", true),
                ("y/a", "x/b", "53/TCP", false),
                ("y/a", "x/b", "8.0/ICMP", true),
            ],
        },
        Scenario {
            name: "caracal egress deny to a network set by label",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkSet\nmetadata: {name: zpods, namespace: y, labels: {role: blocked}}\nspec: {nets: [10.0.3.0/24]}\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: y}\nspec:\n  selector: all()\n  egress: [{action: Deny, destination: {selector: role == 'blocked'}}, {action: Allow}]\n",
            checks: vec![("y/a", "z/a", "80/TCP", false), ("y/a", "x/a", "80/TCP", true)],
        },
        Scenario {
            name: "caracal global network set needs global() in a namespaced policy",
            manifests: "apiVersion: caracal.dev/v1\nkind: GlobalNetworkSet\nmetadata: {name: ops, labels: {role: ops}}\nspec: {nets: [10.0.3.1]}\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'c'\n  ingress: [{action: Allow, source: {selector: role == 'ops', namespaceSelector: global()}}]\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: q, namespace: x}\nspec:\n  selector: pod == 'b'\n  ingress: [{action: Allow, source: {selector: role == 'ops'}}]\n",
            checks: vec![
                ("z/a", "x/c", "80/TCP", true),
                ("z/c", "x/c", "80/TCP", false),
                ("z/a", "x/b", "80/TCP", false),
            ],
        },
        Scenario {
            name: "caracal GlobalNetworkPolicy rule selector spans namespaces",
            manifests: "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: pod == 'c'\n  ingress: [{action: Allow, source: {selector: app == 'web'}}]\n",
            checks: vec![
                ("x/a", "x/c", "80/TCP", true),
                ("y/a", "z/c", "80/TCP", true),
                ("y/b", "x/c", "80/TCP", false),
            ],
        },
        Scenario {
            name: "caracal GlobalNetworkPolicy namespaceSelector limits the endpoints it applies to",
            manifests: "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  namespaceSelector: team == 'ops'\n  selector: all()\n  ingress: [{action: Deny}]\n",
            checks: vec![("x/a", "z/c", "80/TCP", false), ("x/a", "y/b", "80/TCP", true)],
        },
        Scenario {
            name: "caracal serviceAccounts by name",
            manifests: "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: pod == 'a' && app == 'web'\n  ingress: [{action: Allow, source: {serviceAccounts: {names: [monitor]}}}]\n",
            checks: vec![("z/a", "x/a", "80/TCP", true), ("z/c", "x/a", "80/TCP", false)],
        },
        Scenario {
            name: "caracal serviceAccounts by selector",
            manifests: "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: pod == 'b'\n  ingress: [{action: Allow, source: {serviceAccounts: {selector: role == 'monitoring'}}}]\n",
            checks: vec![("z/a", "x/b", "53/UDP", true), ("y/a", "x/b", "53/UDP", false)],
        },
        Scenario {
            name: "caracal serviceAccountSelector on the policy",
            manifests: "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  serviceAccountSelector: role == 'monitoring'\n  egress: [{action: Deny}]\n",
            checks: vec![("z/a", "x/a", "80/TCP", false), ("z/c", "x/a", "80/TCP", true)],
        },
        Scenario {
            name: "caracal ICMP type and code",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'a'\n  ingress: [{action: Allow, protocol: ICMP, icmp: {type: 8, code: 0}}]\n",
            checks: vec![
                ("y/a", "x/a", "8.0/ICMP", true),
                ("y/a", "x/a", "13.0/ICMP", false),
                ("y/a", "x/a", "80/TCP", false),
            ],
        },
        Scenario {
            name: "tiers: a higher tier's Deny wins over the default tier's Allow",
            manifests: "apiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n---\napiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: block-y}\nspec:\n  tier: security\n  selector: all()\n  ingress: [{action: Deny, source: {namespaceSelector: ns == 'y'}}, {action: Pass}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-all, namespace: x}\nspec: {podSelector: {}, ingress: [{}]}\n",
            checks: vec![("y/a", "x/a", "80/TCP", false), ("z/a", "x/a", "80/TCP", true)],
        },
        Scenario {
            name: "tiers: Pass hands the decision to the next tier",
            manifests: "apiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n---\napiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: pass}\nspec: {tier: security, selector: all(), ingress: [{action: Pass}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
            checks: vec![("y/a", "x/a", "80/TCP", false), ("x/a", "y/a", "80/TCP", true)],
        },
        Scenario {
            name: "tiers: a tier that selects but does not decide drops",
            manifests: "apiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n---\napiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: only-web}\nspec: {tier: security, selector: pod == 'a', ingress: [{action: Allow, source: {selector: app == 'web'}}]}\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", true),
                ("y/b", "x/a", "80/TCP", false),
                ("y/b", "x/c", "80/TCP", true),
            ],
        },
        Scenario {
            name: "tiers: defaultAction Pass lets undecided traffic reach later tiers",
            manifests: "apiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100, defaultAction: Pass}\n---\napiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: only-web}\nspec: {tier: security, selector: pod == 'a', ingress: [{action: Deny, source: {selector: pod == 'c'}}]}\n",
            checks: vec![("y/b", "x/a", "80/TCP", true), ("z/c", "x/a", "80/TCP", false)],
        },
        Scenario {
            name: "tiers are evaluated by order, not by name",
            manifests: "apiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {name: aaa}\nspec: {order: 500}\n---\napiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {name: zzz}\nspec: {order: 50}\n---\napiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: allow}\nspec: {tier: aaa, selector: all(), ingress: [{action: Allow}]}\n---\napiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: deny}\nspec: {tier: zzz, selector: all(), ingress: [{action: Deny, protocol: UDP}, {action: Pass}]}\n",
            checks: vec![("x/a", "x/b", "53/UDP", false), ("x/a", "x/b", "53/TCP", true)],
        },
        Scenario {
            name: "egress and ingress must both allow",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: y}\nspec: {selector: all(), egress: [{action: Allow, destination: {namespaceSelector: ns == 'x'}}]}\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: x}\nspec: {selector: all(), ingress: [{action: Allow, source: {namespaceSelector: ns == 'z'}}]}\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", false),
                ("z/a", "x/a", "80/TCP", true),
                ("y/a", "z/a", "80/TCP", false),
            ],
        },
        Scenario {
            name: "caracal ipVersion 6 does not match IPv4",
            manifests: "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {selector: pod == 'a', ingress: [{action: Allow, ipVersion: 6}]}\n",
            checks: vec![("y/a", "x/a", "80/TCP", false)],
        },
        // `services` (Calico's ServiceMatch): the Service's EndpointSlices, labelled
        // `kubernetes.io/service-name`, name its endpoints; a slice's ports are the Service's target ports.
        Scenario {
            name: "caracal services as an egress destination: serving endpoints on the slice's ports only",
            manifests: "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: [10.0.1.1], conditions: {ready: true, serving: true}}\n- {addresses: [10.0.1.2], conditions: {ready: false, serving: false}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-2, namespace: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints: [{addresses: [10.0.2.2]}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-1, namespace: x, labels: {kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{port: 8080, protocol: TCP}]\nendpoints: [{addresses: [10.0.2.1], conditions: {serving: true}}]\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: to-web, namespace: x}\nspec:\n  selector: pod == 'c'\n  types: [Egress]\n  egress: [{action: Allow, destination: {services: {name: web}}}]\n",
            checks: vec![
                ("x/c", "x/a", "8080/TCP", true),
                ("x/c", "x/a", "80/TCP", false),
                ("x/c", "x/a", "8080/UDP", false),
                ("x/c", "x/a", "8.0/ICMP", false),
                ("x/c", "x/b", "8080/TCP", false),
                ("x/c", "y/b", "8080/TCP", true),
                ("x/c", "y/a", "8080/TCP", false),
                ("x/c", "z/c", "8080/TCP", false),
                ("x/a", "y/a", "8080/TCP", true),
            ],
        },
        Scenario {
            name: "caracal services as an ingress source: serving endpoints' addresses, any port",
            manifests: "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: clients-1, namespace: y, labels: {kubernetes.io/service-name: clients}}\naddressType: IPv4\nports: [{port: 9000, protocol: TCP}]\nendpoints:\n- {addresses: [10.0.2.1], conditions: {serving: true}}\n- {addresses: [10.0.2.2], conditions: {serving: false}}\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: from-clients, namespace: x}\nspec:\n  selector: pod == 'a'\n  types: [Ingress]\n  ingress: [{action: Allow, source: {services: {name: clients, namespace: y}}}]\n",
            checks: vec![
                ("y/a", "x/a", "80/TCP", true),
                ("y/a", "x/a", "53/UDP", true),
                ("y/b", "x/a", "80/TCP", false),
                ("z/a", "x/a", "80/TCP", false),
                ("x/b", "x/a", "80/TCP", false),
                ("y/b", "x/b", "80/TCP", true),
            ],
        },
        Scenario {
            name: "caracal services naming a Service with no slices matches nothing",
            manifests: "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: y, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 80, protocol: TCP}]\nendpoints: [{addresses: [10.0.1.1, 10.0.2.1]}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: other-1, namespace: x, labels: {kubernetes.io/service-name: other}}\naddressType: IPv4\nports: [{port: 80, protocol: TCP}]\nendpoints: [{addresses: [10.0.1.1, 10.0.2.1]}]\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: to-web, namespace: x}\nspec:\n  selector: pod == 'c'\n  types: [Egress]\n  egress: [{action: Allow, destination: {services: {name: web}}}]\n---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: from-web, namespace: x}\nspec:\n  selector: pod == 'b'\n  types: [Ingress]\n  ingress: [{action: Allow, source: {services: {name: web}}}]\n",
            checks: vec![
                ("x/c", "x/a", "80/TCP", false),
                ("x/c", "y/a", "80/TCP", false),
                ("x/a", "x/b", "53/UDP", false),
                ("y/a", "x/b", "53/UDP", false),
                ("x/a", "y/a", "80/TCP", true),
            ],
        },
        Scenario {
            name: "caracal GlobalNetworkPolicy denies egress to a Service in the namespace it names",
            manifests: "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dns-1, namespace: x, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{name: dns, port: 53, protocol: UDP}]\nendpoints: [{addresses: [10.0.1.2], conditions: {serving: true}}]\n---\napiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: no-dns}\nspec:\n  namespaceSelector: ns == 'y'\n  selector: all()\n  types: [Egress]\n  egress: [{action: Deny, destination: {services: {name: dns, namespace: x}}}, {action: Allow}]\n",
            checks: vec![
                ("y/a", "x/b", "53/UDP", false),
                ("y/a", "x/b", "53/TCP", true),
                ("y/a", "x/a", "53/UDP", true),
                ("z/a", "x/b", "53/UDP", true),
            ],
        },
    ]
}

/// Packets drawn at random for one endpoint of a contract world (a fixed-seed generator: the same packets
/// every run): from or to its first address (by `ingress`), the other side any of the world's addresses or
/// one outside it; TCP/UDP/SCTP on ports around the ones the scenarios name, ICMP of several types and codes,
/// other protocols.
pub struct RandomPackets {
    state: u64,
    addrs: Vec<std::net::IpAddr>,
}

impl RandomPackets {
    /// A generator over `loaded`'s addresses and a few outside it.
    pub fn new(loaded: &Loaded) -> Self {
        let mut addrs: Vec<std::net::IpAddr> = loaded
            .world
            .endpoints
            .iter()
            .flat_map(|e| e.ips.clone())
            .collect();
        for a in [
            "10.0.1.200",
            "10.0.9.9",
            "192.168.7.1",
            "172.16.0.1",
            "8.8.8.8",
            "10.0.3.254",
        ] {
            if let Ok(ip) = a.parse() {
                addrs.push(ip);
            }
        }
        Self {
            state: 0x9e37_79b9_7f4a_7c15,
            addrs,
        }
    }

    fn next(&mut self, n: usize) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % n.max(1) as u64) as usize
    }

    /// A packet to `ip` (`ingress`) or from it.
    pub fn packet(&mut self, ip: std::net::IpAddr, ingress: bool) -> Packet {
        const PORTS: [u16; 15] = [
            0, 1, 52, 53, 54, 79, 80, 81, 443, 5000, 8080, 8443, 9000, 40000, 65535,
        ];
        let i = self.next(self.addrs.len());
        let other = self.addrs[i];
        let (src, dst) = if ingress { (other, ip) } else { (ip, other) };
        match self.next(5) {
            0..=2 => Packet {
                src,
                dst,
                protocol: [6u8, 17, 132][self.next(3)],
                src_port: Some(PORTS[self.next(PORTS.len())]),
                dst_port: Some(PORTS[self.next(PORTS.len())]),
                icmp: None,
            },
            3 => Packet {
                src,
                dst,
                protocol: 1,
                src_port: None,
                dst_port: None,
                icmp: Some(([0u8, 3, 8, 11][self.next(4)], self.next(5) as u8)),
            },
            _ => Packet {
                src,
                dst,
                protocol: [47u8, 50, 4][self.next(3)],
                src_port: None,
                dst_port: None,
                icmp: None,
            },
        }
    }
}

/// The interface name the model of [`model_all_local`] gives the endpoint `namespace/pod`.
pub fn local_iface(key: &str) -> String {
    format!("crc{}", key.replace('/', "-"))
}

/// The model of one node that holds every endpoint of the world (so it lists every endpoint's tiers), each
/// on the interface [`local_iface`] names.
pub fn model_all_local(loaded: &Loaded) -> crate::model::DataplaneModel {
    let local: Vec<crate::model::LocalEndpoint> = loaded
        .world
        .endpoints
        .iter()
        .map(|e| crate::model::LocalEndpoint {
            key: e.key(),
            iface: local_iface(&e.key()),
            ips: e.ips.clone(),
        })
        .collect();
    crate::calc::compute(&loaded.world, &local)
}
