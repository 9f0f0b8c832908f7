//! The guest that `vm.rs` boots: a Debian 6.1 kernel unpacked in the cache, and an
//! initramfs (busybox, the 9p/virtio modules, `/init`) built from it. `setup` provides
//! both; `guest_image` rebuilds the initramfs, without network, when its inputs change.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::setup::{BUSYBOX, apt, cache_dir, run, run_bytes};
use crate::vm::{CONSOLE_PREFIX, sh_quote};

/// Modules that mounting the host over virtio 9p needs. The order that loads differs
/// between kernel builds (and some may be built in), so the guest loads them in passes.
pub(crate) const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
];

/// 9p message size: the default (8 KiB on 6.1) makes reading large test binaries slow.
const MSIZE: u32 = 512 * 1024;

/// Bump when the initramfs layout changes in a way the hash of its inputs would not show.
const INITRAMFS_FORMAT: &str = "pep-initramfs-1";

/// The `linux-image-6.1.0-NN-amd64-unsigned` package that `linux-image-amd64` currently
/// depends on, from `apt-cache depends linux-image-amd64`.
pub(crate) fn kernel_package(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .filter(|p| p.starts_with("linux-image-") && p.ends_with("-amd64") && !p.ends_with("-cloud-amd64"))
        .filter(|p| kernel_release(&format!("{p}-unsigned")).is_some())
        .max_by_key(|p| abi_number(p))
        .map(|p| format!("{p}-unsigned"))
}

/// `6.1.0-56-amd64` from `linux-image-6.1.0-56-amd64-unsigned`.
pub(crate) fn kernel_release(package: &str) -> Option<String> {
    let rel = package.strip_prefix("linux-image-")?.strip_suffix("-unsigned")?;
    let mut parts = rel.splitn(3, '-');
    let (version, abi, flavour) = (parts.next()?, parts.next()?, parts.next()?);
    let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    (version.split('.').all(numeric) && numeric(abi) && flavour == "amd64").then(|| rel.to_owned())
}

fn abi_number(package: &str) -> u32 {
    package
        .split('-')
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn kernel_root() -> PathBuf {
    cache_dir().join("kernel")
}

/// An unpacked guest kernel and the initramfs that boots it.
pub(crate) struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
}

/// The unpacked kernel recorded by the last successful setup: (release, vmlinuz path).
pub(crate) fn guest_kernel() -> Result<(String, PathBuf)> {
    let current = kernel_root().join("current");
    let release = fs::read_to_string(&current)
        .map(|s| s.trim().to_owned())
        .map_err(|_| {
            anyhow!(
                "no guest kernel in {} (`cargo xtask setup` downloads it)",
                kernel_root().display()
            )
        })?;
    let vmlinuz = kernel_root()
        .join(&release)
        .join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!(
            "guest kernel {} is missing (`cargo xtask setup` downloads it)",
            vmlinuz.display()
        );
    }
    Ok((release, vmlinuz))
}

/// The recorded kernel, ready to boot, building what is missing or stale (no network).
pub(crate) fn guest_image() -> Result<GuestImage> {
    prepare_image().map(|(image, _)| image)
}

/// Like [`guest_image`]; the bool says whether anything was built now.
pub(crate) fn prepare_image() -> Result<(GuestImage, bool)> {
    let (release, vmlinuz) = guest_kernel()?;
    let (kernel, extracted) = match ensure_vmlinux(&vmlinuz) {
        Ok(done) => done,
        Err(e) => {
            eprintln!("vm: booting the compressed kernel, slower: {e:#}");
            (vmlinuz, false)
        }
    };
    let (initrd, built) = ensure_initramfs(&release)?;
    let image = GuestImage {
        kernel,
        initrd,
        release,
    };
    Ok((image, extracted || built))
}

/// QEMU boots an uncompressed vmlinux through its PVH entry (CONFIG_PVH), which skips the
/// firmware and the xz decompression of the bzImage: about 2 s less per boot under TCG.
fn ensure_vmlinux(vmlinuz: &Path) -> Result<(PathBuf, bool)> {
    let vmlinux = vmlinuz.with_file_name("vmlinux");
    if vmlinux.is_file() {
        return Ok((vmlinux, false));
    }
    println!("setup: kernel: extracting vmlinux from {}", vmlinuz.display());
    let image = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let start = image
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .ok_or_else(|| anyhow!("{} has no xz payload", vmlinuz.display()))?;
    let payload = vmlinux.with_extension("partial.xz");
    fs::write(&payload, &image[start..]).context("cannot write the kernel payload")?;
    // --single-stream: the payload is followed by the bzImage's trailer.
    let elf = run_bytes(
        Command::new("xz").args(["-dc", "--single-stream"]).arg(&payload),
        "decompressing the kernel (Debian package xz-utils)",
    );
    let _ = fs::remove_file(&payload);
    let elf = elf?;
    if !elf.starts_with(b"\x7fELF") {
        bail!("the payload of {} is not an ELF image", vmlinuz.display());
    }
    let partial = vmlinux.with_extension("partial");
    fs::write(&partial, &elf).context("cannot write vmlinux")?;
    fs::rename(&partial, &vmlinux).context("cannot write vmlinux")?;
    Ok((vmlinux, true))
}

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";

fn resolve_kernel_package() -> Result<String> {
    let query = || {
        run(
            Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
            "the Debian kernel package",
        )
        .ok()
        .and_then(|out| kernel_package(&out))
    };
    if let Some(pkg) = query() {
        return Ok(pkg);
    }
    // Package lists may be missing on a fresh machine.
    apt(&["apt-get", "update", "-q"], "apt-get update")?;
    query().ok_or_else(|| anyhow!("cannot resolve the Debian kernel package: `apt-cache depends linux-image-amd64` names no linux-image-6.1.0-NN-amd64"))
}

/// Makes sure a current kernel is unpacked; returns its release and whether it was
/// downloaded now. Keeps the recorded one when the current cannot be had.
pub(crate) fn ensure_kernel() -> Result<(String, bool)> {
    let recorded = guest_kernel().ok().map(|(rel, _)| rel);
    let package = match (resolve_kernel_package(), &recorded) {
        (Ok(pkg), _) => pkg,
        (Err(e), Some(rel)) => {
            println!("setup: kernel: keeping {rel} ({e:#})");
            return Ok((rel.clone(), false));
        }
        (Err(e), None) => return Err(e),
    };
    let release =
        kernel_release(&package).ok_or_else(|| anyhow!("unexpected kernel package name {package}"))?;
    if recorded.as_deref() == Some(release.as_str()) {
        return Ok((release, false));
    }
    println!("setup: kernel: downloading and unpacking {package}");
    match download_kernel(&package, &release) {
        Ok(()) => Ok((release, true)),
        Err(e) => match recorded {
            Some(rel) => {
                println!("setup: kernel: keeping {rel}: {e:#}");
                Ok((rel, false))
            }
            None => Err(e),
        },
    }
}

fn download_kernel(package: &str, release: &str) -> Result<()> {
    let root = kernel_root();
    let tmp = root.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        run(
            Command::new("apt-get")
                .arg("download")
                .arg(package)
                .current_dir(&tmp),
            &format!("kernel package {package}"),
        )?;
        let deb = fs::read_dir(&tmp)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| anyhow!("kernel package {package}: apt-get download left no .deb"))?;
        let unpacked = tmp.join("root");
        run(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked),
            &format!("unpacking {package}"),
        )?;
        if !unpacked.join(format!("boot/vmlinuz-{release}")).is_file() {
            bail!("kernel package {package} has no boot/vmlinuz-{release}");
        }
        // The package ships no modules.dep; module autoload in the guest needs one.
        run(
            Command::new(BUSYBOX)
                .arg("depmod")
                .arg("-b")
                .arg(&unpacked)
                .arg(release),
            &format!("depmod for {release}"),
        )?;
        let dest = root.join(release);
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&unpacked, &dest)
            .with_context(|| format!("cannot move the kernel to {}", dest.display()))?;
        fs::write(root.join("current"), format!("{release}\n")).context("cannot record the kernel version")
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// Builds `cache_dir()/initramfs/initrd-<release>.cpio` unless the hash of its inputs is
/// unchanged. Returns its path and whether it was built now.
fn ensure_initramfs(release: &str) -> Result<(PathBuf, bool)> {
    let modules_dir = kernel_root().join(release).join("lib/modules").join(release);
    let available = index_modules(&modules_dir.join("kernel"))?;
    let modules: Vec<String> = GUEST_MODULES
        .iter()
        .filter(|m| available.contains_key(**m))
        .map(|m| (*m).to_owned())
        .collect();
    // The 9p and virtio modules may be built in; 9p itself must exist somewhere.
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    if !modules.iter().any(|m| m == "9p") && !builtin.lines().any(|l| l.ends_with("/9p.ko")) {
        bail!("kernel {release} has no 9p filesystem (the -cloud flavour lacks it)");
    }
    let init = init_script(&modules_dir, &modules);
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("{BUSYBOX} is missing (Debian package busybox-static)"))?;
    if elf_is_dynamic(&busybox) {
        bail!("{BUSYBOX} is dynamically linked: install busybox-static");
    }
    let mut hasher = Sha256::new();
    for part in [
        INITRAMFS_FORMAT.as_bytes(),
        release.as_bytes(),
        init.as_bytes(),
        &busybox,
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    for m in &modules {
        hasher.update(m.as_bytes());
        hasher.update([0]);
    }
    let hash: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();

    let dir = cache_dir().join("initramfs");
    let initrd = dir.join(format!("initrd-{release}.cpio"));
    let stamp = dir.join(format!("initrd-{release}.sha256"));
    if initrd.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == hash) {
        return Ok((initrd, false));
    }
    println!("setup: initramfs: building it for {release}");
    let mut cpio = Cpio::default();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "host", "results", "lib",
        "modules",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init before init can mount devtmpfs.
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, init.as_bytes());
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    for m in &modules {
        let path = &available[m.as_str()];
        let data = if path.extension().is_some_and(|x| x == "xz") {
            run_bytes(
                Command::new("xz").arg("-dc").arg(path),
                &format!("decompressing {}", path.display()),
            )?
        } else {
            fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        };
        cpio.file(&format!("modules/{m}.ko"), 0o644, &data);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = dir.join(format!(".initrd-{}.partial", std::process::id()));
    fs::write(&partial, cpio.finish()).with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, &initrd).with_context(|| format!("cannot write {}", initrd.display()))?;
    fs::write(&stamp, format!("{hash}\n")).context("cannot write the initramfs stamp")?;
    Ok((initrd, true))
}

/// Module name (`virtio_ring`) -> path of its `.ko` or `.ko.xz` under `dir`.
fn index_modules(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            fs::read_dir(&d).with_context(|| format!("cannot list kernel modules in {}", d.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(m) = name.strip_suffix(".ko").or_else(|| name.strip_suffix(".ko.xz"))
            {
                found.insert(m.to_owned(), path.clone());
            }
        }
    }
    Ok(found)
}

/// Whether an ELF64 little-endian image has a PT_INTERP header (needs a dynamic loader).
pub(crate) fn elf_is_dynamic(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..phnum).any(|i| u32_at(phoff as usize + i * phentsize) == Some(PT_INTERP))
}

/// A writer for the `newc` cpio format the kernel unpacks as initramfs.
#[derive(Default)]
pub(crate) struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        // namesize (with its NUL) check
        #[rustfmt::skip]
        let fields = [
            self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1,
            name.len() as u32 + 1, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub(crate) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
    }

    pub(crate) fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// The guest's `/init`, baked into the initramfs. `modules_dir` is the host path
/// of the unpacked kernel's `lib/modules/<release>` (with a `modules.dep` from depmod);
/// `modules` are the `.ko` files present in the initramfs's `/modules`.
pub(crate) fn init_script(modules_dir: &Path, modules: &[String]) -> String {
    INIT_TEMPLATE
        .replace("@PREFIX@", CONSOLE_PREFIX)
        .replace("@MODULES@", &modules.join(" "))
        .replace("@MODDIR@", &sh_quote(&format!("/host{}", modules_dir.display())))
        .replace("@MSIZE@", &MSIZE.to_string())
}

const INIT_TEMPLATE: &str = r#"#!/bin/busybox sh
# Guest init for pep-agent's xtask VM runs (generated from xtask/src/vm.rs).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "@PREFIX@ $*" > /dev/console; }
die() { say "FATAL: $*"; poweroff -f; sleep 10; }
say "init: kernel $(uname -r)"

# Module order differs between builds: load in passes until none is left or none loads.
pending="@MODULES@"
while [ -n "$pending" ]; do
  left=""; progress=""
  for m in $pending; do
    if insmod "/modules/$m.ko" 2>/dev/null; then progress=1; else left="$left $m"; fi
  done
  pending=$left
  [ -n "$progress" ] || break
done
[ -z "$pending" ] || say "could not load modules:$pending"

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=@MSIZE@ hostroot /host || die "cannot mount the host root over 9p"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@ results /results || die "cannot mount the results export over 9p"

m() { mount "$@" 2>/dev/null || say "cannot mount $*"; }
m -t proc proc /host/proc
m -t sysfs sysfs /host/sys
m -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
m -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
m -t tmpfs -o mode=1777 tmpfs /host/dev/shm
[ -e /host/dev/fd ] || ln -s /proc/self/fd /host/dev/fd
[ -e /host/dev/stdin ] || ln -s /proc/self/fd/0 /host/dev/stdin
[ -e /host/dev/stdout ] || ln -s /proc/self/fd/1 /host/dev/stdout
[ -e /host/dev/stderr ] || ln -s /proc/self/fd/2 /host/dev/stderr
m -t tmpfs -o mode=1777 tmpfs /host/tmp
[ -d /host/run ] && m -t tmpfs -o mode=755 tmpfs /host/run
m -t securityfs securityfs /host/sys/kernel/security
m -t bpf bpf /host/sys/fs/bpf
m -t cgroup2 cgroup2 /host/sys/fs/cgroup
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null
ip link set lo up || say "cannot bring up lo"

# Kernel module autoload runs /sbin/modprobe (busybox's) in this root: point it at the
# unpacked kernel's modules, which setup ran depmod on.
mkdir -p /lib/modules
ln -s @MODDIR@ "/lib/modules/$(uname -r)"

[ -f /results/run.sh ] || die "no run.sh in the results export"
say "init: running commands"
. /results/run.sh
say "init: done"
sync
poweroff -f
sleep 10
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_generic_kernel_from_apt_cache() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            kernel_package(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        let several = "linux-image-amd64\n |Depends: linux-image-6.1.0-9-amd64\n  Depends: linux-image-6.1.0-10-amd64\n  Depends: linux-image-6.1.0-10-cloud-amd64\n";
        assert_eq!(
            kernel_package(several).as_deref(),
            Some("linux-image-6.1.0-10-amd64-unsigned")
        );
        assert_eq!(kernel_package("linux-image-amd64\n  Depends: firmware\n"), None);
        assert_eq!(kernel_package(""), None);
    }

    #[test]
    fn kernel_release_from_package() {
        assert_eq!(
            kernel_release("linux-image-6.1.0-56-amd64-unsigned").as_deref(),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(kernel_release("linux-image-6.1.0-56-cloud-amd64-unsigned"), None);
        assert_eq!(kernel_release("linux-image-6.1.0-56-amd64"), None);
        assert_eq!(kernel_release("linux-image-amd64-unsigned"), None);
    }

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"hi");
        let bytes = c.finish();
        assert!(bytes.starts_with(b"070701"));
        // header 110 bytes + "init\0" = 115, padded to 116; data 2 padded to 4.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..118], b"hi");
        assert_eq!(&bytes[120..126], b"070701");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
        // mode field of the file entry
        assert_eq!(&bytes[14..22], b"000081ed");
    }

    #[test]
    fn detects_dynamic_elf() {
        let me = fs::read("/proc/self/exe").unwrap();
        assert!(elf_is_dynamic(&me), "test binaries are dynamically linked");
        assert!(!elf_is_dynamic(b"#!/bin/sh\n"));
    }
    #[test]
    fn init_script_fills_every_placeholder() {
        let s = init_script(
            Path::new("/c/kernel/6.1.0-9-amd64/lib/modules/6.1.0-9-amd64"),
            &["virtio".into(), "9p".into()],
        );
        for placeholder in ["@PREFIX@", "@MODULES@", "@MODDIR@", "@MSIZE@"] {
            assert!(!s.contains(placeholder), "{placeholder} left in:\n{s}");
        }
        assert!(s.contains(r#"pending="virtio 9p""#));
        assert!(s.contains("ln -s '/host/c/kernel/6.1.0-9-amd64/lib/modules/6.1.0-9-amd64'"));
        assert!(s.starts_with("#!/bin/busybox sh\n"));
    }
}
