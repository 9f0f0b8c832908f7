//! What the running kernel offers and where: BTF field offsets, the cgroup2
//! mount, BPF LSM availability.

pub mod btf;
pub mod cgroup;
pub mod features;
pub mod sockdiag;
