//! Schedulers (diffusers `PNDMScheduler`, `EulerDiscreteScheduler`, ...).
