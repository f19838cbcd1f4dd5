//! `qosmos-orders`: placeholder, see ARCHITECTURE.md.
