//! caracal-operator
