//! Installation status: conditions (Ready, Progressing, Degraded) with observedGeneration, and per-component
//! state read from the DaemonSet and Deployment. Pure: the controller gathers the inputs.

use caracal_crds::installation::{ComponentStatus, InstallationSpec, InstallationStatus};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// One condition to set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// `Ready`, `Progressing` or `Degraded`.
    pub type_: &'static str,
    /// True or false.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// For a person.
    pub message: String,
}

/// Sets `conds` to `wants`, keeping `lastTransitionTime` of a condition whose status did not change.
pub fn set_conditions(old: &[Condition], wants: &[Want], generation: i64, now: &Time) -> Vec<Condition> {
    wants
        .iter()
        .map(|w| {
            let status = if w.status { "True" } else { "False" }.to_owned();
            let since = old
                .iter()
                .find(|c| c.type_ == w.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: w.type_.to_owned(),
                status,
                reason: w.reason.clone(),
                message: w.message.clone(),
                observed_generation: Some(generation),
                last_transition_time: since,
            }
        })
        .collect()
}

fn component(name: &str, ready: Option<bool>, message: String) -> ComponentStatus {
    let state = match ready {
        Some(true) => "Ready",
        Some(false) => "Progressing",
        None => "Missing",
    };
    ComponentStatus {
        name: name.to_owned(),
        state: state.to_owned(),
        message: Some(message),
    }
}

/// Component states of caracal-node and caracal-typha.
pub fn components(ds: Option<&DaemonSet>, dep: Option<&Deployment>) -> Vec<ComponentStatus> {
    let node = ds.map(|ds| {
        let gen_ok = ds.status.as_ref().and_then(|s| s.observed_generation) == ds.metadata.generation;
        let s = ds.status.clone().unwrap_or_default();
        let updated = s.updated_number_scheduled.unwrap_or(0);
        let available = s.number_available.unwrap_or(0);
        let ready =
            gen_ok && updated == s.desired_number_scheduled && available == s.desired_number_scheduled;
        (
            ready,
            format!(
                "{available}/{} available, {updated} updated",
                s.desired_number_scheduled
            ),
        )
    });
    let typha = dep.map(|d| {
        let gen_ok = d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation;
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let s = d.status.clone().unwrap_or_default();
        let (available, updated) = (s.available_replicas.unwrap_or(0), s.updated_replicas.unwrap_or(0));
        let ready = gen_ok && available >= want && updated == want;
        (ready, format!("{available}/{want} available, {updated} updated"))
    });
    vec![
        component(
            "caracal-node",
            node.as_ref().map(|n| n.0),
            node.map(|n| n.1).unwrap_or_else(|| "not created yet".into()),
        ),
        component(
            "caracal-typha",
            typha.as_ref().map(|t| t.0),
            typha.map(|t| t.1).unwrap_or_else(|| "not created yet".into()),
        ),
    ]
}

/// The status after a successful apply.
pub fn applied(
    old: Option<&InstallationStatus>,
    computed: InstallationSpec,
    components: Vec<ComponentStatus>,
    kept_pools: &[String],
    generation: i64,
    now: &Time,
) -> InstallationStatus {
    let all_ready = components.iter().all(|c| c.state == "Ready");
    let waiting: Vec<_> = components
        .iter()
        .filter(|c| c.state != "Ready")
        .map(|c| c.name.as_str())
        .collect();
    let degraded = !kept_pools.is_empty();
    let wants = [
        Want {
            type_: "Ready",
            status: all_ready && !degraded,
            reason: if all_ready {
                "AllComponentsReady"
            } else {
                "ComponentsNotReady"
            }
            .into(),
            message: if all_ready {
                "every component is available".into()
            } else {
                format!("waiting for {}", waiting.join(", "))
            },
        },
        Want {
            type_: "Progressing",
            status: !all_ready,
            reason: if all_ready {
                "RolloutComplete"
            } else {
                "RollingOut"
            }
            .into(),
            message: if all_ready {
                "nothing is rolling out".into()
            } else {
                format!("rolling out {}", waiting.join(", "))
            },
        },
        Want {
            type_: "Degraded",
            status: degraded,
            reason: if degraded { "PoolInUse" } else { "AsExpected" }.into(),
            message: if degraded {
                format!(
                    "IPPool(s) {} left the Installation but still hold addresses; they are kept (not deleted) until \
                     their pods are gone",
                    kept_pools.join(", ")
                )
            } else {
                "the Installation is valid and applied".into()
            },
        },
    ];
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    InstallationStatus {
        conditions: set_conditions(old_conditions, &wants, generation, now),
        mtu: computed
            .calico_network
            .as_ref()
            .and_then(|n| n.mtu)
            .or(old.and_then(|s| s.mtu)),
        computed: Some(computed),
        components,
        // The controller names the ImageSet it rendered with.
        image_set: None,
    }
}

/// The status after an invalid spec: Degraded with what to change; everything else as it was.
pub fn invalid(
    old: Option<&InstallationStatus>,
    reason: &str,
    message: String,
    generation: i64,
    now: &Time,
) -> InstallationStatus {
    let mut status = old.cloned().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let wants = [
        Want {
            type_: "Ready",
            status: false,
            reason: "InvalidInstallation".into(),
            message: if ready {
                "the last valid Installation is still running; this edit was not applied".into()
            } else {
                "the Installation is invalid".into()
            },
        },
        Want {
            type_: "Progressing",
            status: false,
            reason: "InvalidInstallation".into(),
            message: "nothing is rolling out".into(),
        },
        Want {
            type_: "Degraded",
            status: true,
            reason: reason.into(),
            message,
        },
    ];
    status.conditions = set_conditions(&status.conditions, &wants, generation, now);
    status
}

/// True when two statuses say the same thing (transition times included, so an unchanged status is not
/// rewritten).
pub fn same(a: Option<&InstallationStatus>, b: &InstallationStatus) -> bool {
    a == Some(b)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DaemonSetStatus, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn ds(generation: i64, observed: i64, desired: i32, updated: i32, available: i32) -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            status: Some(DaemonSetStatus {
                observed_generation: Some(observed),
                desired_number_scheduled: desired,
                updated_number_scheduled: Some(updated),
                number_available: Some(available),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn dep(replicas: i32, available: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                available_replicas: Some(available),
                updated_replicas: Some(replicas),
                ..Default::default()
            }),
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::now())
    }

    #[test]
    fn components_are_ready_only_when_the_rollout_of_this_generation_is_complete() {
        let states = |d: &DaemonSet| components(Some(d), Some(&dep(1, 1)))[0].state.clone();
        assert_eq!(states(&ds(2, 2, 3, 3, 3)), "Ready");
        assert_eq!(
            states(&ds(2, 1, 3, 3, 3)),
            "Progressing",
            "status of an older generation"
        );
        assert_eq!(states(&ds(2, 2, 3, 2, 3)), "Progressing", "not all updated");
        assert_eq!(states(&ds(2, 2, 3, 3, 2)), "Progressing", "not all available");
        assert_eq!(components(None, None)[1].state, "Missing");
        assert_eq!(components(None, Some(&dep(2, 1)))[1].state, "Progressing");
    }

    #[test]
    fn conditions_carry_generation_and_keep_transition_times_while_unchanged() {
        let ready = components(Some(&ds(1, 1, 1, 1, 1)), Some(&dep(1, 1)));
        let first = applied(None, InstallationSpec::default(), ready.clone(), &[], 4, &now());
        let ready_cond =
            |s: &InstallationStatus| s.conditions.iter().find(|c| c.type_ == "Ready").cloned().unwrap();
        assert_eq!(ready_cond(&first).status, "True");
        assert_eq!(ready_cond(&first).observed_generation, Some(4));
        let later = Time(first.conditions[0].last_transition_time.0 + std::time::Duration::from_secs(60));
        let again = applied(Some(&first), InstallationSpec::default(), ready, &[], 5, &later);
        assert_eq!(
            ready_cond(&again).last_transition_time,
            ready_cond(&first).last_transition_time
        );
        let degraded = applied(
            Some(&again),
            InstallationSpec::default(),
            vec![],
            &["old-pool".into()],
            6,
            &later,
        );
        let d = degraded
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "PoolInUse"));
        assert!(d.message.contains("old-pool"));
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_valid_computed_spec() {
        let good = applied(
            None,
            InstallationSpec {
                registry: Some("r/".into()),
                ..Default::default()
            },
            vec![],
            &[],
            1,
            &now(),
        );
        let bad = invalid(Some(&good), "PoolOverlap", "spec.x: overlaps".into(), 2, &now());
        assert_eq!(bad.computed, good.computed);
        let d = bad.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str(), d.observed_generation),
            ("True", "PoolOverlap", Some(2))
        );
    }
}
