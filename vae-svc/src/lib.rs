//! vae-svc (being written).
