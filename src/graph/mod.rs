//! graph: placeholder until the module lands.
