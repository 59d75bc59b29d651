//! denoiser-svc (being written).
