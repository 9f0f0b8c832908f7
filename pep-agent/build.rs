//! Builds the eBPF programs (crate `pep-ebpf`) with the nightly toolchain for
//! `bpfel-unknown-none` and leaves the object in OUT_DIR, where `src/ebpf.rs`
//! embeds it with `include_bytes_aligned!`.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("pep-agent has no parent directory"))?
        .join("pep-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non UTF-8 path"))?;
    println!("cargo:rerun-if-changed=../pep-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "pep-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
