//! Subscription index.
