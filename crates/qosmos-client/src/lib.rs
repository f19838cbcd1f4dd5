//! `qosmos-client`: placeholder, see ARCHITECTURE.md.
