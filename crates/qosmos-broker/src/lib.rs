//! `qosmos-broker`: placeholder, see ARCHITECTURE.md.
