//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas never both act.
//!
//! The algorithm is client-go's: a replica holds the lease while it keeps renewing it; another replica takes
//! over only after it has seen the same lease record unchanged for a whole lease duration, measured on its
//! own clock (never by comparing timestamps written by another machine's clock). Every write is a
//! compare-and-swap on resourceVersion, so two candidates cannot both win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

/// Timings of an election.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_period: Duration,
    /// How long the leader may fail to renew before it stops acting.
    pub renew_deadline: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// One candidate in an election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    observed: Option<(String, Instant)>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Elector {
    /// A candidate `identity` for the Lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timings: Timings) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timings,
            observed: None,
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: acquire the lease if it is free or expired, renew it if held. Returns whether this
    /// candidate holds it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let seconds = i32::try_from(self.timings.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = format!("{holder}|{:?}", spec.renew_time.as_ref().map(|t| t.0));
        let changed = self.observed.as_ref().is_none_or(|(r, _)| *r != record);
        if changed {
            self.observed = Some((record, Instant::now()));
        }
        let held_by_me = holder == self.identity;
        let expired = holder.is_empty()
            || self
                .observed
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() > self.timings.lease_duration);
        if !held_by_me && !expired {
            return Ok(false);
        }
        let mut new = spec;
        if !held_by_me {
            new.holder_identity = Some(self.identity.clone());
            new.acquire_time = Some(now());
            new.lease_transitions = Some(new.lease_transitions.unwrap_or(0) + 1);
        }
        new.renew_time = Some(now());
        new.lease_duration_seconds = Some(seconds);
        lease.spec = Some(new);
        // replace() carries the resourceVersion we read: a concurrent writer makes this a 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                if !held_by_me {
                    info!(identity = %self.identity, "acquired the leader lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on shutdown) so another replica need not wait for it to expire.
    pub async fn release(&mut self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let Some(spec) = lease.spec.as_mut() else { return };
            if spec.holder_identity.as_deref() != Some(&self.identity) {
                return;
            }
            spec.holder_identity = None;
            if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
                warn!(error = %e, "releasing the leader lease failed");
            }
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.timings.renew_period).await;
        }
    }

    /// Keeps renewing; returns when the lease is lost (not renewed within the renew deadline).
    pub async fn hold(&mut self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.timings.renew_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    warn!(identity = %self.identity, "another replica holds the leader lease");
                    return;
                }
                Err(e) => warn!(error = %e, "renewing the leader lease"),
            }
            if last_ok.elapsed() > self.timings.renew_deadline {
                warn!(identity = %self.identity, "could not renew the leader lease in time");
                return;
            }
        }
    }
}
