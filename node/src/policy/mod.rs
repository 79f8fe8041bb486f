//! Policy: the rule IR every backend consumes ([`ir`]), conversion from Kubernetes and Caracal policies
//! ([`convert`]), the world it is evaluated over ([`model`]), and the contract evaluator ([`eval`]) that
//! `caracalctl policy matrix/explain` uses and that every data plane backend is tested against.

pub mod contract;
pub mod convert;
pub mod eval;
pub mod ir;
pub mod load;
pub mod matrix;
pub mod model;
pub mod synth;
