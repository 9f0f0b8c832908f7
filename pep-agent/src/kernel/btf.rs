//! Struct field offsets from the running kernel's BTF.
//!
//! The eBPF programs read a few kernel struct fields (`task_struct.real_parent`,
//! `file.f_path`, ...). Their offsets move between kernels (`file.f_path` is 16
//! on 6.1 and 64 on 6.18), so they are resolved here at load time and handed to
//! the programs as read-only globals.

use std::path::Path;

use btf_rs::{Btf, Type};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    Read { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
    #[error("kernel BTF: {0}")]
    Btf(#[from] btf_rs::Error),
}

/// The running kernel's BTF.
pub struct KernelBtf {
    btf: Btf,
}

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

impl KernelBtf {
    /// Reads `/sys/kernel/btf/vmlinux`.
    pub fn load() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let read = |source| BtfError::Read {
            path: path.display().to_string(),
            source,
        };
        // Read whole, then parsed in memory: btf-rs parsing from the file
        // seeks for every type (about 125,000 lseek(2) on sysfs for a 6.x
        // vmlinux, a tenth of a second).
        let bytes = std::fs::read(path).map_err(|e| read(btf_rs::Error::from(e)))?;
        let btf = Btf::from_bytes(&bytes).map_err(read)?;
        Ok(Self { btf })
    }

    /// Byte offset of `field` in `struct strukt`, looking through anonymous
    /// struct and union members.
    pub fn offset_of(&self, strukt: &str, field: &str) -> Result<u64, BtfError> {
        let types = self.btf.resolve_types_by_name(strukt)?;
        let s = types
            .iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        self.find_in(s, field, 0)?.ok_or_else(|| BtfError::NoField {
            strukt: strukt.to_string(),
            field: field.to_string(),
        })
    }

    fn find_in(&self, s: &btf_rs::Struct, field: &str, base_bits: u64) -> Result<Option<u64>, BtfError> {
        for m in &s.members {
            let bits = base_bits + u64::from(m.bit_offset());
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == field {
                return Ok(Some(bits / 8));
            }
            if name.is_empty() {
                // Anonymous struct or union: its fields belong to the parent.
                let mut t = self.btf.resolve_chained_type(m)?;
                // Bounded: typedef/const chains are short.
                for _ in 0..8 {
                    match t {
                        Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) => {
                            t = self.btf.resolve_chained_type(
                                t.as_btf_type()
                                    .ok_or_else(|| btf_rs::Error::OpNotSupp("untyped chain".into()))?,
                            )?;
                        }
                        _ => break,
                    }
                }
                if let Type::Struct(inner) | Type::Union(inner) = &t
                    && let Some(off) = self.find_in(inner, field, bits)?
                {
                    return Ok(Some(off));
                }
            }
        }
        Ok(None)
    }
}

/// The offsets the programs need, by the name of their global.
pub fn program_offsets(btf: &KernelBtf) -> Result<Vec<(&'static str, u64)>, BtfError> {
    Ok(vec![
        ("TASK_REAL_PARENT", btf.offset_of("task_struct", "real_parent")?),
        ("TASK_TGID", btf.offset_of("task_struct", "tgid")?),
        ("FILE_F_PATH", btf.offset_of("file", "f_path")?),
        ("FILE_F_MODE", btf.offset_of("file", "f_mode")?),
        ("TASK_GROUP_LEADER", btf.offset_of("task_struct", "group_leader")?),
        (
            "TASK_START_BOOTTIME",
            btf.offset_of("task_struct", "start_boottime")?,
        ),
        ("TASK_COMM", btf.offset_of("task_struct", "comm")?),
        // A file record's task fields, as loads (pep-ebpf typed.rs `Task`).
        ("TASK_PID", btf.offset_of("task_struct", "pid")?),
        ("TASK_CRED", btf.offset_of("task_struct", "cred")?),
        ("CRED_UID", btf.offset_of("cred", "uid")?),
        ("CRED_GID", btf.offset_of("cred", "gid")?),
        ("TASK_CGROUPS", btf.offset_of("task_struct", "cgroups")?),
        ("CSS_SET_DFL_CGRP", btf.offset_of("css_set", "dfl_cgrp")?),
        ("CGROUP_KN", btf.offset_of("cgroup", "kn")?),
        ("KERNFS_NODE_ID", btf.offset_of("kernfs_node", "id")?),
        // File, exec and self-protection hooks (pep-ebpf vfs.rs, exec.rs,
        // protect.rs): the dentry walk, inode identity, fs magic, argv.
        ("PATH_MNT", btf.offset_of("path", "mnt")?),
        ("PATH_DENTRY", btf.offset_of("path", "dentry")?),
        ("DENTRY_D_PARENT", btf.offset_of("dentry", "d_parent")?),
        ("DENTRY_D_NAME", btf.offset_of("dentry", "d_name")?),
        ("DENTRY_D_INODE", btf.offset_of("dentry", "d_inode")?),
        ("DENTRY_D_SB", btf.offset_of("dentry", "d_sb")?),
        ("QSTR_LEN", btf.offset_of("qstr", "len")?),
        ("QSTR_NAME", btf.offset_of("qstr", "name")?),
        ("VFSMOUNT_MNT_ROOT", btf.offset_of("vfsmount", "mnt_root")?),
        ("MOUNT_MNT", btf.offset_of("mount", "mnt")?),
        ("MOUNT_MNT_PARENT", btf.offset_of("mount", "mnt_parent")?),
        ("MOUNT_MNT_MOUNTPOINT", btf.offset_of("mount", "mnt_mountpoint")?),
        ("TASK_FS", btf.offset_of("task_struct", "fs")?),
        ("FS_ROOT", btf.offset_of("fs_struct", "root")?),
        ("FILE_F_INODE", btf.offset_of("file", "f_inode")?),
        ("INODE_I_INO", btf.offset_of("inode", "i_ino")?),
        ("INODE_I_SB", btf.offset_of("inode", "i_sb")?),
        ("SB_S_DEV", btf.offset_of("super_block", "s_dev")?),
        ("SB_S_MAGIC", btf.offset_of("super_block", "s_magic")?),
        // The file verdict cache (pep-ebpf filecache.rs): what an entry must
        // agree with.
        ("INODE_I_GENERATION", btf.offset_of("inode", "i_generation")?),
        ("INODE_I_NLINK", btf.offset_of("inode", "i_nlink")?),
        ("INODE_I_MODE", btf.offset_of("inode", "i_mode")?),
        ("BPRM_FILE", btf.offset_of("linux_binprm", "file")?),
        ("VMA_VM_FILE", btf.offset_of("vm_area_struct", "vm_file")?),
        ("PT_REGS_ORIG_AX", btf.offset_of("pt_regs", "orig_ax")?),
        ("PT_REGS_SI", btf.offset_of("pt_regs", "si")?),
        ("PT_REGS_DX", btf.offset_of("pt_regs", "dx")?),
        // The executable image of every decision (pep-ebpf kernel.rs
        // `fill_lineage`).
        ("TASK_MM", btf.offset_of("task_struct", "mm")?),
        ("MM_EXE_FILE", btf.offset_of("mm_struct", "exe_file")?),
        ("TASK_SELF_EXEC_ID", btf.offset_of("task_struct", "self_exec_id")?),
        // The `bpf` LSM hook gained a parameter in 6.9; the program reads the
        // previous program's return value after the last one.
        (
            "BPF_HOOK_NARGS",
            btf.func_params("bpf_lsm_bpf").unwrap_or(3) as u64,
        ),
    ])
}

impl KernelBtf {
    /// Number of parameters of the kernel function `name`.
    pub fn func_params(&self, name: &str) -> Result<usize, BtfError> {
        let types = self.btf.resolve_types_by_name(name)?;
        for t in &types {
            if let Type::Func(f) = t
                && let Type::FuncProto(p) = self.btf.resolve_chained_type(f)?
            {
                return Ok(p.parameters.len());
            }
        }
        Err(BtfError::NoStruct(format!("function {name}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_offsets_on_this_kernel() {
        let btf = KernelBtf::load().expect("kernel BTF");
        let offs = program_offsets(&btf).expect("offsets");
        let tgid = offs.iter().find(|(n, _)| *n == "TASK_TGID").map(|(_, o)| *o);
        let parent = offs
            .iter()
            .find(|(n, _)| *n == "TASK_REAL_PARENT")
            .map(|(_, o)| *o);
        // task_struct is thousands of bytes; real_parent follows tgid.
        assert!(tgid.is_some_and(|o| o > 0 && o < 8192), "tgid offset {tgid:?}");
        assert!(
            parent > tgid,
            "real_parent {parent:?} should follow tgid {tgid:?}"
        );
    }

    #[test]
    fn counts_function_parameters() {
        let btf = KernelBtf::load().expect("kernel BTF");
        // bpf_lsm_file_open(struct file *file).
        assert_eq!(btf.func_params("bpf_lsm_file_open").expect("func"), 1);
        let n = btf.func_params("bpf_lsm_bpf").expect("func");
        assert!(n == 3 || n == 4, "bpf hook parameters: {n}");
        assert!(btf.func_params("no_such_function_here").is_err());
    }

    #[test]
    fn unknown_field_is_an_error() {
        let btf = KernelBtf::load().expect("kernel BTF");
        let err = btf.offset_of("file", "no_such_field").unwrap_err();
        assert!(err.to_string().contains("no field no_such_field"), "{err}");
    }
}
