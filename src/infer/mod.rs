//! infer: placeholder until the module lands.
