//! `qosmos-orders`: the order-dispatch service (work in progress).
pub mod id;
pub mod model;
pub mod time;
