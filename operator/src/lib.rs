//! caracal-operator: reconciles the `Installation` named `default` into CRDs, the caracal-node DaemonSet,
//! the caracal-typha Deployment, FelixConfiguration and IPPools, and reports status.
//!
//! The reconciler arrives with the operator issue; the API it reconciles lives in `caracal-crds`.
