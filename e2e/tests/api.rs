//! Cluster tier: Caracal's API against the real kube-apiserver (built by `make controlplane`).
//!
//! - every CRD is accepted and becomes Established, and every file in examples/ applies with kubectl;
//! - every example object reads back exactly as written (the schema prunes nothing);
//! - a table of invalid objects is rejected, each with a message naming the offending field, and a table of
//!   edge-of-range valid objects is accepted (so the rules are neither too loose nor too strict);
//! - a Calico field Caracal does not enforce (`http`, `preDNAT`, ...) is refused even when the client does not
//!   ask for strict field validation, where an unknown field would be pruned.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use caracal_e2e::controlplane::{ControlPlane, Options, workspace_root};
use caracal_e2e::crds;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);

async fn control_plane_with_crds() -> (ControlPlane, Client) {
    let cp = ControlPlane::start(Options::api_only())
        .await
        .expect("control plane starts");
    let client = cp.client().await.expect("client");
    let names = crds::install(&client, ESTABLISH_TIMEOUT)
        .await
        .expect("CRDs install");
    assert_eq!(names.len(), caracal_crds::crdgen::all().len());
    (cp, client)
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("examples"))
        .expect("examples/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The YAML documents of a file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read example");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn is_caracal(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|v| v.contains("caracal.dev/"))
}

#[tokio::test]
async fn every_crd_is_established_and_every_example_applies_with_kubectl() {
    let (cp, _client) = control_plane_with_crds().await;
    let files = examples();
    assert!(
        files.len() >= 6,
        "examples/ should hold at least six files, found {}",
        files.len()
    );
    let cache = tempfile::tempdir().expect("tempdir");
    for file in files {
        let out = cp
            .kubectl()
            .arg("--cache-dir")
            .arg(cache.path())
            .args(["apply", "-f"])
            .arg(&file)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl apply -f {} failed:\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // kubectl users find the kinds by short name.
    let out = cp
        .kubectl()
        .args(["--cache-dir"])
        .arg(cache.path())
        .args(["get", "gnp,ippool", "-o", "name"])
        .output()
        .expect("kubectl get");
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(
        names.contains("globalnetworkpolicy.caracal.dev/security.baseline"),
        "{names}"
    );
    assert!(names.contains("ippool.caracal.dev/west-pool"), "{names}");
}

#[tokio::test]
async fn every_example_object_reads_back_exactly_as_written() {
    let (_cp, client) = control_plane_with_crds().await;
    let ns_api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    let mut checked = 0;
    for file in examples() {
        for doc in documents(&file) {
            if doc["kind"] == "Namespace" {
                let ns: k8s_openapi::api::core::v1::Namespace =
                    serde_json::from_value(doc).expect("namespace");
                ns_api
                    .create(&PostParams::default(), &ns)
                    .await
                    .expect("create namespace");
                continue;
            }
            // What a Caracal object refers to (a BGP password's Secret and the Role that lets caracal-node read
            // it): Kubernetes' own kinds, applied by the kubectl test; nothing of Caracal's to read back.
            if ["Secret", "Role", "RoleBinding"].contains(&doc["kind"].as_str().unwrap_or_default()) {
                continue;
            }
            assert!(
                is_caracal(&doc),
                "{}: unexpected kind {}",
                file.display(),
                doc["kind"]
            );
            let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
            let api = crds::api_for(&client, &obj).expect("Caracal kind");
            // The three Installation examples share the name `default`: replace rather than create.
            if api.get_opt(&obj.name_any()).await.expect("get").is_some() {
                api.delete(&obj.name_any(), &Default::default())
                    .await
                    .expect("delete previous");
                tokio::time::timeout(Duration::from_secs(30), async {
                    while api.get_opt(&obj.name_any()).await.expect("get").is_some() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
                .await
                .expect("previous object goes away");
            }
            api.create(&PostParams::default(), &obj)
                .await
                .unwrap_or_else(|e| panic!("{}: create {}: {e}", file.display(), obj.name_any()));
            let back = api.get(&obj.name_any()).await.expect("read back");
            let back = serde_json::to_value(&back).expect("json");
            assert_eq!(
                back["spec"],
                doc["spec"],
                "{}: {} spec changed on the way through the API server",
                file.display(),
                obj.name_any()
            );
            assert_eq!(
                back["metadata"]["labels"],
                doc["metadata"]["labels"],
                "{}: labels changed",
                file.display()
            );
            assert!(
                back.get("status").is_none(),
                "{}: the API server added a status",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} example objects were checked");
}

// ---- fixtures: small valid objects that a case mutates -------------------------------------------

fn object(api_version: &str, kind: &str, name: &str, spec: Value) -> Value {
    json!({ "apiVersion": api_version, "kind": kind, "metadata": { "name": name }, "spec": spec })
}
fn ippool(spec: Value) -> Value {
    object("caracal.dev/v1", "IPPool", "case", spec)
}
fn installation_named(name: &str, network: Value) -> Value {
    object(
        "operator.caracal.dev/v1",
        "Installation",
        name,
        json!({ "calicoNetwork": network }),
    )
}
fn installation(network: Value) -> Value {
    installation_named("default", network)
}
fn installation_spec(spec: Value) -> Value {
    object("operator.caracal.dev/v1", "Installation", "default", spec)
}
fn gnp(spec: Value) -> Value {
    object("caracal.dev/v1", "GlobalNetworkPolicy", "case", spec)
}
/// A GlobalNetworkPolicy with one ingress rule.
fn gnp_rule(rule: Value) -> Value {
    gnp(json!({ "selector": "all()", "ingress": [rule] }))
}
fn np(spec: Value) -> Value {
    let mut o = object("caracal.dev/v1", "NetworkPolicy", "case", spec);
    o["metadata"]["namespace"] = json!("default");
    o
}
fn netset(spec: Value) -> Value {
    let mut o = object("caracal.dev/v1", "NetworkSet", "case", spec);
    o["metadata"]["namespace"] = json!("default");
    o
}
fn felix(spec: Value) -> Value {
    object("caracal.dev/v1", "FelixConfiguration", "default", spec)
}
fn bgppeer(spec: Value) -> Value {
    object("caracal.dev/v1", "BGPPeer", "case", spec)
}
fn rules(n: usize) -> Value {
    Value::Array((0..n).map(|_| json!({ "action": "Allow" })).collect())
}

/// (what is wrong, the object, the field path the message must name, a word of the explanation).
fn invalid_cases() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    let v4 = |cidr: &str| json!({ "cidr": cidr });
    vec![
        (
            "pool CIDR with /33",
            ippool(v4("10.0.0.0/33")),
            "spec.cidr",
            "not a CIDR",
        ),
        (
            "pool CIDR that is a word",
            ippool(v4("pods")),
            "spec.cidr",
            "not a CIDR",
        ),
        (
            "IPv4 blockSize 33",
            ippool(json!({"cidr": "10.0.0.0/16", "blockSize": 33})),
            "spec.blockSize",
            "20 to 32",
        ),
        (
            "IPv4 blockSize 19",
            ippool(json!({"cidr": "10.0.0.0/16", "blockSize": 19})),
            "spec.blockSize",
            "20 to 32",
        ),
        (
            "IPv6 blockSize 100",
            ippool(json!({"cidr": "fd00::/48", "blockSize": 100})),
            "spec.blockSize",
            "116 to 128",
        ),
        (
            "pool smaller than a block",
            ippool(json!({"cidr": "10.0.0.0/28"})),
            "spec.cidr",
            "smaller than one block",
        ),
        (
            "IPv6 pool with IPIP",
            ippool(json!({"cidr": "fd00::/48", "ipipMode": "Always"})),
            "spec.ipipMode",
            "IPv4 only",
        ),
        (
            "pool with VXLAN and IPIP",
            ippool(json!({"cidr": "10.0.0.0/16", "ipipMode": "Always", "vxlanMode": "Always"})),
            "spec.vxlanMode",
            "one encapsulation",
        ),
        (
            "vxlanMode Sometimes",
            ippool(json!({"cidr": "10.0.0.0/16", "vxlanMode": "Sometimes"})),
            "spec.vxlanMode",
            "Unsupported value",
        ),
        (
            "global() in a pool nodeSelector",
            ippool(json!({"cidr": "10.0.0.0/16", "nodeSelector": "global()"})),
            "spec.nodeSelector",
            "namespaceSelector",
        ),
        (
            "Installation named blue",
            installation_named("blue", json!({})),
            "metadata.name",
            "named default",
        ),
        (
            "MTU 100",
            installation(json!({"mtu": 100})),
            "spec.calicoNetwork.mtu",
            "576",
        ),
        (
            "MTU 9001",
            installation(json!({"mtu": 9001})),
            "spec.calicoNetwork.mtu",
            "9000",
        ),
        (
            "two autodetection methods",
            installation(json!({"nodeAddressAutodetectionV4": {"firstFound": true, "interface": "eth.*"}})),
            "spec.calicoNetwork.nodeAddressAutodetectionV4",
            "only one of",
        ),
        (
            "autodetection kubernetes NodeExternalIP",
            installation(json!({"nodeAddressAutodetectionV4": {"kubernetes": "NodeExternalIP"}})),
            "spec.calicoNetwork.nodeAddressAutodetectionV4.kubernetes",
            "NodeInternalIP",
        ),
        (
            "IPv6 Installation pool with IPIP",
            installation(json!({"ipPools": [{"cidr": "fd00::/48", "encapsulation": "IPIP"}]})),
            "spec.calicoNetwork.ipPools[0].encapsulation",
            "IPv4 only",
        ),
        (
            "Installation pool blockSize 33",
            installation(json!({"ipPools": [{"cidr": "10.0.0.0/16", "blockSize": 33}]})),
            "spec.calicoNetwork.ipPools[0].blockSize",
            "20 to 32",
        ),
        (
            "Installation pool bad CIDR",
            installation(json!({"ipPools": [{"cidr": "10.0.0.300/16"}]})),
            "spec.calicoNetwork.ipPools[0].cidr",
            "not a CIDR",
        ),
        (
            "two Installation pools with one CIDR",
            installation(json!({"ipPools": [{"cidr": "10.0.0.0/16"}, {"cidr": "10.0.0.0/16"}]})),
            "spec.calicoNetwork.ipPools",
            "same cidr",
        ),
        (
            "linuxDataplane VPP",
            installation(json!({"linuxDataplane": "VPP"})),
            "spec.calicoNetwork.linuxDataplane",
            "Unsupported value",
        ),
        (
            "encapsulation GRE",
            installation(json!({"ipPools": [{"cidr": "10.0.0.0/16", "encapsulation": "GRE"}]})),
            "spec.calicoNetwork.ipPools[0].encapsulation",
            "Unsupported value",
        ),
        (
            "Typha minReplicas over maxReplicas",
            installation_spec(json!({"typhaDeployment": {"spec": {"minReplicas": 5, "maxReplicas": 2}}})),
            "spec.typhaDeployment.spec.minReplicas",
            "must not exceed",
        ),
        (
            "action Reject",
            gnp_rule(json!({"action": "Reject"})),
            "spec.ingress[0].action",
            "Unsupported value",
        ),
        (
            "ICMP code without type",
            gnp_rule(json!({"action": "Allow", "protocol": "ICMP", "icmp": {"code": 0}})),
            "spec.ingress[0].icmp.code",
            "needs an ICMP type",
        ),
        (
            "ICMP type 300",
            gnp_rule(json!({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 300}})),
            "spec.ingress[0].icmp.type",
            "254",
        ),
        (
            "ICMP match without ICMP protocol",
            gnp_rule(json!({"action": "Allow", "protocol": "TCP", "icmp": {"type": 8}})),
            "spec.ingress[0].protocol",
            "ICMP or ICMPv6",
        ),
        (
            "port range 90:80",
            gnp_rule(json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": ["90:80"]}})),
            "spec.ingress[0].destination.ports[0]",
            "low <= high",
        ),
        (
            "port 70000",
            gnp_rule(json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": [70000]}})),
            "spec.ingress[0].destination.ports[0]",
            "0 to 65535",
        ),
        (
            "port range to 70000",
            gnp_rule(
                json!({"action": "Allow", "protocol": "TCP", "destination": {"notPorts": ["80:70000"]}}),
            ),
            "spec.ingress[0].destination.notPorts[0]",
            "65535",
        ),
        (
            "port written 80-90",
            gnp_rule(json!({"action": "Allow", "protocol": "TCP", "source": {"ports": ["80-"]}})),
            "spec.ingress[0].source.ports[0]",
            "not a port",
        ),
        (
            "ports with protocol ICMP",
            gnp_rule(json!({"action": "Allow", "protocol": "ICMP", "destination": {"ports": [80]}})),
            "spec.ingress[0].protocol",
            "TCP, UDP or SCTP",
        ),
        (
            "ports without a protocol",
            gnp_rule(json!({"action": "Allow", "destination": {"ports": [80]}})),
            "spec.ingress[0].protocol",
            "TCP, UDP or SCTP",
        ),
        (
            "protocol HTTP",
            gnp_rule(json!({"action": "Allow", "protocol": "HTTP"})),
            "spec.ingress[0].protocol",
            "unsupported protocol",
        ),
        (
            "protocol 256",
            gnp_rule(json!({"action": "Allow", "protocol": 256})),
            "spec.ingress[0].protocol",
            "1 to 255",
        ),
        (
            "1025 ingress rules",
            gnp(json!({"ingress": rules(1025)})),
            "spec.ingress",
            "at most 1024",
        ),
        (
            "1025 egress rules",
            np(json!({"egress": rules(1025)})),
            "spec.egress",
            "at most 1024",
        ),
        (
            "selector of 1025 characters",
            gnp(json!({"selector": format!("a == \"{}\"", "x".repeat(1018))})),
            "spec.selector",
            "1024",
        ),
        (
            "global() in a policy selector",
            gnp(json!({"selector": "global()"})),
            "spec.selector",
            "only in a namespaceSelector",
        ),
        (
            "global() in a rule selector",
            gnp_rule(json!({"action": "Allow", "source": {"selector": "global()"}})),
            "spec.ingress[0].source.selector",
            "only in a namespaceSelector",
        ),
        (
            "nets with /40",
            gnp(json!({"egress": [{"action": "Deny", "destination": {"nets": ["10.0.0.0/40"]}}]})),
            "spec.egress[0].destination.nets[0]",
            "not a CIDR or an IP",
        ),
        (
            "http on a NetworkPolicy ingress rule",
            np(json!({"ingress": [{"action": "Allow", "protocol": "TCP", "http": {"methods": ["GET"]}}]})),
            "spec.ingress[0].http",
            "not enforced by Caracal",
        ),
        (
            "http on a NetworkPolicy egress rule",
            np(json!({"egress": [{"action": "Allow", "http": {"paths": [{"exact": "/healthz"}]}}]})),
            "spec.egress[0].http",
            "not enforced by Caracal",
        ),
        (
            "http on a GlobalNetworkPolicy ingress rule",
            gnp_rule(
                json!({"action": "Allow", "http": {"methods": ["GET", "PUT"], "paths": [{"prefix": "/api"}]}}),
            ),
            "spec.ingress[0].http",
            "not enforced by Caracal",
        ),
        (
            "http on a GlobalNetworkPolicy egress rule",
            gnp(json!({"egress": [{"action": "Deny"}, {"action": "Allow", "http": {}}]})),
            "spec.egress[1].http",
            "not enforced by Caracal",
        ),
        (
            "doNotTrack true",
            gnp(json!({"selector": "all()", "doNotTrack": true, "applyOnForward": false})),
            "spec.doNotTrack",
            "no host endpoints",
        ),
        (
            "preDNAT true",
            gnp(json!({"selector": "all()", "preDNAT": true})),
            "spec.preDNAT",
            "no host endpoints",
        ),
        (
            "applyOnForward true",
            gnp(json!({"selector": "all()", "applyOnForward": true})),
            "spec.applyOnForward",
            "no host endpoints",
        ),
        (
            "domains in a NetworkPolicy egress destination",
            np(json!({"egress": [{"action": "Allow", "destination": {"domains": ["example.com"]}}]})),
            "spec.egress[0].destination.domains",
            "not enforced by Caracal",
        ),
        (
            "domains in a GlobalNetworkPolicy ingress source",
            gnp_rule(json!({"action": "Deny", "source": {"domains": ["*.example.com"]}})),
            "spec.ingress[0].source.domains",
            "not enforced by Caracal",
        ),
        (
            "allowedEgressDomains in a GlobalNetworkSet",
            object(
                "caracal.dev/v1",
                "GlobalNetworkSet",
                "case",
                json!({"nets": ["192.0.2.0/24"], "allowedEgressDomains": ["example.com"]}),
            ),
            "spec.allowedEgressDomains",
            "not enforced by Caracal",
        ),
        (
            "allowedEgressDomains in a NetworkSet",
            netset(json!({"allowedEgressDomains": ["example.com"]})),
            "spec.allowedEgressDomains",
            "not enforced by Caracal",
        ),
        (
            "services in an ingress rule's destination",
            np(json!({"ingress": [{"action": "Allow", "destination": {"services": {"name": "web"}}}]})),
            "spec.ingress[0].destination.services",
            "not allowed in an ingress rule's destination",
        ),
        (
            "services in an egress rule's source",
            gnp(
                json!({"egress": [{"action": "Allow", "source": {"services": {"name": "web", "namespace": "shop"}}}]}),
            ),
            "spec.egress[0].source.services",
            "not allowed in an egress rule's source",
        ),
        (
            "destination services with ports",
            np(
                json!({"egress": [{"action": "Allow", "protocol": "TCP", "destination": {"services": {"name": "db"}, "ports": [5432]}}]}),
            ),
            "spec.egress[0].destination.ports",
            "cannot be combined with destination services",
        ),
        (
            "destination services with notPorts",
            np(
                json!({"egress": [{"action": "Allow", "protocol": "TCP", "destination": {"services": {"name": "db"}, "notPorts": [22]}}]}),
            ),
            "spec.egress[0].destination.notPorts",
            "cannot be combined with destination services",
        ),
        (
            "services with a selector",
            np(
                json!({"egress": [{"action": "Allow", "destination": {"services": {"name": "db"}, "selector": "app == 'db'"}}]}),
            ),
            "spec.egress[0].destination.services",
            "cannot be combined with selector",
        ),
        (
            "services with nets",
            np(
                json!({"ingress": [{"action": "Allow", "source": {"services": {"name": "web"}, "nets": ["10.0.0.0/8"]}}]}),
            ),
            "spec.ingress[0].source.services",
            "cannot be combined with selector",
        ),
        (
            "services with a namespaceSelector",
            np(
                json!({"ingress": [{"action": "Allow", "source": {"services": {"name": "web"}, "namespaceSelector": "all()"}}]}),
            ),
            "spec.ingress[0].source.services",
            "cannot be combined with selector",
        ),
        (
            "GlobalNetworkPolicy egress service without a namespace",
            gnp(json!({"egress": [{"action": "Allow", "destination": {"services": {"name": "kube-dns"}}}]})),
            "spec.egress[0].destination.services.namespace",
            "no namespace to default to",
        ),
        (
            "GlobalNetworkPolicy ingress service without a namespace",
            gnp_rule(json!({"action": "Allow", "source": {"services": {"name": "web"}}})),
            "spec.ingress[0].source.services.namespace",
            "no namespace to default to",
        ),
        (
            "service with an empty name",
            np(json!({"egress": [{"action": "Allow", "destination": {"services": {"name": ""}}}]})),
            "spec.egress[0].destination.services.name",
            "at least 1",
        ),
        (
            "service without a name",
            np(json!({"egress": [{"action": "Allow", "destination": {"services": {"namespace": "shop"}}}]})),
            "spec.egress[0].destination.services.name",
            "Required value",
        ),
        (
            "policy type Both",
            np(json!({"types": ["Both"]})),
            "spec.types[0]",
            "Unsupported value",
        ),
        (
            "ipVersion 5",
            np(json!({"ingress": [{"action": "Allow", "ipVersion": 5}]})),
            "spec.ingress[0].ipVersion",
            "4 or 6",
        ),
        (
            "Felix vxlanMTU 100",
            felix(json!({"vxlanMTU": 100})),
            "spec.vxlanMTU",
            "576",
        ),
        (
            "Felix vxlanPort 0",
            felix(json!({"vxlanPort": 0})),
            "spec.vxlanPort",
            "1",
        ),
        (
            "Felix refresh interval soon",
            felix(json!({"routeRefreshInterval": "soon"})),
            "spec.routeRefreshInterval",
            "not a duration",
        ),
        (
            "Felix failsafe ports (not implemented)",
            felix(json!({"failsafeInboundHostPorts": [{"protocol": "TCP", "port": 22}]})),
            "spec.failsafeInboundHostPorts",
            "failsafeInboundHostPorts is not implemented",
        ),
        (
            "Felix nftablesMode (not implemented)",
            felix(json!({"nftablesMode": "Disabled"})),
            "spec.nftablesMode",
            "nftablesMode is not implemented",
        ),
        (
            "Felix bpfConnectTimeLoadBalancing Enabled (not implemented)",
            felix(json!({"bpfConnectTimeLoadBalancing": "Enabled"})),
            "spec.bpfConnectTimeLoadBalancing",
            "Enabled (TCP and UDP at connect time) is not implemented",
        ),
        (
            "BGP peer IP that is a name",
            bgppeer(json!({"peerIP": "router", "asNumber": 64512})),
            "spec.peerIP",
            "IP address",
        ),
        (
            "BGP peer ttlSecurity (not implemented yet)",
            bgppeer(json!({"peerIP": "10.0.0.1", "asNumber": 64600, "ttlSecurity": 1})),
            "spec.ttlSecurity",
            "ttlSecurity is not implemented",
        ),
        (
            "BGP serviceClusterIPs (not implemented yet)",
            object(
                "caracal.dev/v1",
                "BGPConfiguration",
                "default",
                json!({"serviceClusterIPs": [{"cidr": "10.96.0.0/16"}]}),
            ),
            "spec.serviceClusterIPs",
            "serviceClusterIPs is not implemented",
        ),
        (
            "BGP peer with no peer",
            bgppeer(json!({"node": "n1"})),
            "spec.peerIP",
            "peerIP",
        ),
        (
            "BGP peer with node and nodeSelector",
            bgppeer(json!({"node": "n1", "nodeSelector": "all()", "peerSelector": "rr == 'true'"})),
            "spec.nodeSelector",
            "not both",
        ),
        (
            "network set with a bad net",
            object(
                "caracal.dev/v1",
                "GlobalNetworkSet",
                "case",
                json!({"nets": ["1.2.3.4/99"]}),
            ),
            "spec.nets[0]",
            "not a CIDR",
        ),
        (
            "tier defaultAction Allow",
            object(
                "caracal.dev/v1",
                "Tier",
                "case",
                json!({"defaultAction": "Allow"}),
            ),
            "spec.defaultAction",
            "Unsupported value",
        ),
        (
            "IPAMConfiguration named other",
            object("caracal.dev/v1", "IPAMConfiguration", "other", json!({})),
            "default",
            "named default",
        ),
        (
            "block affinity state lost",
            object(
                "caracal.dev/v1",
                "BlockAffinity",
                "case",
                json!({"state": "lost", "node": "n1", "cidr": "10.0.0.0/26"}),
            ),
            "spec.state",
            "Unsupported value",
        ),
    ]
}

/// Objects at the edge of every range: all must be accepted.
fn valid_cases() -> Vec<(&'static str, Value)> {
    vec![
        (
            "blockSize 20 and 32",
            ippool(json!({"cidr": "10.1.0.0/20", "blockSize": 20})),
        ),
        (
            "blockSize 32",
            ippool(json!({"cidr": "10.2.0.0/24", "blockSize": 32})),
        ),
        (
            "IPv6 blockSize 128 with VXLAN",
            ippool(json!({"cidr": "fd00:1::/120", "blockSize": 128, "vxlanMode": "Always"})),
        ),
        ("MTU 576", installation(json!({"mtu": 576}))),
        (
            "bpfConnectTimeLoadBalancing Disabled",
            felix(json!({"bpfEnabled": true, "bpfConnectTimeLoadBalancing": "Disabled"})),
        ),
        (
            "MTU 9000 and IPv6 VXLAN pool",
            installation(json!({"mtu": 9000, "ipPools": [{"cidr": "fd00::/48", "encapsulation": "VXLAN"}]})),
        ),
        (
            "ports at the edges",
            gnp_rule(
                json!({"action": "Allow", "protocol": "SCTP", "destination": {"ports": [0, 65535, "0:65535", "80:80", "http-alt", "8080"]}}),
            ),
        ),
        (
            "protocol 255 and 1",
            gnp(
                json!({"ingress": [{"action": "Allow", "protocol": 255}, {"action": "Deny", "notProtocol": 1}]}),
            ),
        ),
        (
            "ICMP type alone",
            gnp_rule(json!({"action": "Allow", "protocol": "ICMPv6", "icmp": {"type": 254}})),
        ),
        ("1024 ingress rules", gnp(json!({"ingress": rules(1024)}))),
        (
            "selector of 1024 characters",
            gnp(json!({"selector": format!("a == \"{}\"", "x".repeat(1017))})),
        ),
        (
            "global() in a namespaceSelector",
            gnp_rule(json!({"action": "Allow", "source": {"namespaceSelector": "global()"}})),
        ),
        (
            "bare address in nets",
            gnp_rule(json!({"action": "Allow", "source": {"nets": ["10.1.2.3", "fd00::1", "0.0.0.0/0"]}})),
        ),
        (
            "doNotTrack, preDNAT and applyOnForward false",
            gnp(json!({"selector": "all()", "doNotTrack": false, "preDNAT": false, "applyOnForward": false})),
        ),
        (
            "services where Calico allows them, with source ports",
            np(json!({
                "ingress": [{"action": "Allow", "protocol": "TCP", "source": {"services": {"name": "web"}, "ports": [8080], "notPorts": [22]}}],
                "egress": [{"action": "Allow", "destination": {"services": {"name": "db", "namespace": "data"}}}],
            })),
        ),
        (
            "GlobalNetworkPolicy services with namespaces",
            gnp(json!({
                "ingress": [{"action": "Allow", "source": {"services": {"name": "web", "namespace": "shop"}}}],
                "egress": [{"action": "Allow", "protocol": "UDP", "destination": {"services": {"name": "kube-dns", "namespace": "kube-system"}}}],
            })),
        ),
        (
            "rule metadata, serviceAccounts and performanceHints",
            gnp(json!({
                "performanceHints": ["AssumeNeededOnEveryNode"],
                "ingress": [{"action": "Allow", "metadata": {"annotations": {"owner": "devops"}}, "source": {"serviceAccounts": {"names": ["prometheus"]}}}],
            })),
        ),
        (
            "BGP peer with port",
            bgppeer(json!({"peerIP": "[fd00::1]:1179", "asNumber": 65000})),
        ),
    ]
}

#[tokio::test]
async fn invalid_objects_are_rejected_naming_the_field_and_edge_values_are_accepted() {
    let (_cp, client) = control_plane_with_crds().await;
    let create = |doc: Value| {
        let client = client.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(doc).expect("object");
            let api = crds::api_for(&client, &obj).expect("Caracal kind");
            let res = api
                .create(
                    &PostParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &obj,
                )
                .await;
            res.map(|_| ())
        }
    };
    let cases = invalid_cases();
    assert!(
        cases.len() >= 30,
        "the table should hold at least 30 invalid objects"
    );
    let mut failures = Vec::new();
    for (what, doc, field, explanation) in cases {
        match create(doc).await {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(kube::Error::Api(status)) => {
                let msg = status.message.clone();
                if status.code != 422 || !msg.contains(field) || !msg.contains(explanation) {
                    failures.push(format!(
                        "{what}: code {} message without {field:?}/{explanation:?}: {msg}",
                        status.code
                    ));
                }
            }
            Err(e) => failures.push(format!("{what}: unexpected error {e}")),
        }
    }
    for (what, doc) in valid_cases() {
        if let Err(e) = create(doc).await {
            failures.push(format!("{what}: rejected: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// kubectl asks for strict field validation; GitOps tools and plain API clients often do not. A field Caracal
/// knows but does not enforce must be refused for them too (by CEL), not pruned, while an unknown field (a
/// typo) is pruned for them and refused only under strict validation.
#[tokio::test]
async fn unenforced_fields_are_refused_whatever_field_validation_the_client_asks_for() {
    let (_cp, client) = control_plane_with_crds().await;
    let api_of = |doc: &Value| {
        let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
        (crds::api_for(&client, &obj).expect("Caracal kind"), obj)
    };
    let http_rule = np(json!({
        "selector": "app == 'web'",
        "ingress": [{"action": "Allow", "protocol": "TCP", "http": {"methods": ["GET"], "paths": [{"prefix": "/public"}]}}],
    }));
    let pre_dnat = gnp(json!({"selector": "all()", "preDNAT": true, "ingress": [{"action": "Allow"}]}));
    let ignore = PatchParams::apply("caracal-api-test").validation_ignore();
    for (what, doc, field) in [
        ("http", &http_rule, "spec.ingress[0].http"),
        ("preDNAT", &pre_dnat, "spec.preDNAT"),
    ] {
        let (api, obj) = api_of(doc);
        // Server-side apply with fieldValidation=Ignore, as GitOps tools send it.
        match api.patch(&obj.name_any(), &ignore, &Patch::Apply(&obj)).await {
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(field) => {}
            other => {
                panic!("{what} with fieldValidation=Ignore: expected a 422 naming {field}, got {other:?}")
            }
        }
        // A create without fieldValidation (the API server's default, Warn).
        match api.create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(field) => {}
            other => {
                panic!("{what} with default field validation: expected a 422 naming {field}, got {other:?}")
            }
        }
        assert!(
            api.get_opt(&obj.name_any()).await.expect("get").is_none(),
            "{what}: nothing was stored"
        );
    }

    // The contrast that makes the CEL rules necessary: an unknown field (a typo) is refused under strict field
    // validation (kubectl's default) and by server-side apply whatever it asks for, but a create that does
    // not ask for strict validation has it pruned, with only a warning.
    let typo = np(
        json!({"selector": "app == 'web'", "ingress": [{"action": "Allow", "htttp": {"methods": ["GET"]}}]}),
    );
    let (api, obj) = api_of(&typo);
    let strict =
        http::Request::post("/apis/caracal.dev/v1/namespaces/default/networkpolicies?fieldValidation=Strict")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&typo).expect("json"))
            .expect("request");
    match client.request::<DynamicObject>(strict).await {
        Err(kube::Error::Api(s)) if s.message.contains("htttp") => {}
        other => panic!("typo with fieldValidation=Strict: expected an error naming it, got {other:?}"),
    }
    match api.patch(&obj.name_any(), &ignore, &Patch::Apply(&obj)).await {
        Err(kube::Error::Api(s)) if s.message.contains("htttp") => {}
        other => panic!("typo by server-side apply: expected an error naming it, got {other:?}"),
    }
    let stored = api
        .create(&PostParams::default(), &obj)
        .await
        .expect("a create without strict validation prunes the unknown field");
    let stored = serde_json::to_value(&stored).expect("json");
    assert_eq!(
        stored["spec"]["ingress"],
        json!([{"action": "Allow"}]),
        "pruned: {stored}"
    );
}
