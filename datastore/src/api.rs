//! Watching the API server directly: one watch per kind, turned into [`Update`]s.

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tracing::warn;

use super::{KINDS, Update, kind_id};

fn key(o: &DynamicObject) -> String {
    match o.namespace() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

/// The object as a document. `managedFields` (server-side apply's bookkeeping, often half a pod's JSON) is
/// dropped first: nothing on a node reads it, and every node would otherwise decode and queue it.
fn document(mut o: DynamicObject, api_version: &str, kind: &str) -> serde_json::Value {
    o.metadata.managed_fields = None;
    let mut v = serde_json::to_value(&o).unwrap_or_default();
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    v
}

/// Starts one watch per kind in [`KINDS`]; updates go to `tx` until it is closed. Returns the tasks.
pub fn watch(client: Client, tx: mpsc::Sender<Update>) -> Vec<tokio::task::JoinHandle<()>> {
    KINDS
        .iter()
        .map(|(api_version, kind, plural, _)| {
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let tx = tx.clone();
            let (api_version, kind) = (*api_version, *kind);
            tokio::spawn(async move {
                let id = kind_id(api_version, kind);
                let mut events = watcher::watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(ev) = events.next().await {
                    let update = match ev {
                        Ok(Event::Init) => Update::Resync { kind: id.clone() },
                        Ok(Event::InitApply(o) | Event::Apply(o)) => Update::Upsert {
                            kind: id.clone(),
                            key: key(&o),
                            object: document(o, api_version, kind),
                        },
                        Ok(Event::Delete(o)) => Update::Delete {
                            kind: id.clone(),
                            key: key(&o),
                        },
                        Ok(Event::InitDone) => Update::InSync { kind: id.clone() },
                        Err(e) => {
                            // The watcher relists by itself (a new Init follows); say why.
                            warn!(kind = %id, error = %e, "watch error");
                            continue;
                        }
                    };
                    if tx.send(update).await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect()
}
