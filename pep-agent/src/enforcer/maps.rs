//! Writing sandboxes and their compiled rules into the kernel maps.

use aya::maps::{
    Array, HashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use pep_common::{
    file::{FileRuleKey, FileRuleValue},
    net::{NetKeyV4, NetKeyV6, NetRuleSet},
    sandbox::{MAX_CGROUP_LEVEL, SandboxConfig},
};

use super::{Enforcer, EnforcerError};
use crate::compiler::net::CompiledNet;

/// A sandbox as the maps need it.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub cgroup_id: u64,
    pub cgroup_level: u32,
    pub config: SandboxConfig,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforcerError {
    move |source| EnforcerError::Map { name, source }
}

impl Enforcer {
    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, EnforcerError> {
        self.ebpf.map_mut(name).ok_or(EnforcerError::NoMap(name))
    }

    /// Writes the rules first and the sandbox entry last, so the kernel never
    /// sees a sandbox without its rules.
    pub fn install_sandbox(
        &mut self,
        spec: &SandboxSpec,
        net: &CompiledNet,
        files: &[(FileRuleKey, FileRuleValue)],
    ) -> Result<(), EnforcerError> {
        if spec.cgroup_level >= MAX_CGROUP_LEVEL {
            return Err(EnforcerError::Map {
                name: "SANDBOX_LEVELS",
                source: aya::maps::MapError::OutOfBounds {
                    index: spec.cgroup_level,
                    max_entries: MAX_CGROUP_LEVEL,
                },
            });
        }
        {
            let mut v4: LpmTrie<&mut MapData, NetKeyV4, NetRuleSet> =
                LpmTrie::try_from(self.map_mut("NET_V4")?).map_err(map_err("NET_V4"))?;
            for (plen, key, set) in &net.v4 {
                v4.insert(&Key::new(*plen, *key), set, 0)
                    .map_err(map_err("NET_V4"))?;
            }
        }
        {
            let mut v6: LpmTrie<&mut MapData, NetKeyV6, NetRuleSet> =
                LpmTrie::try_from(self.map_mut("NET_V6")?).map_err(map_err("NET_V6"))?;
            for (plen, key, set) in &net.v6 {
                v6.insert(&Key::new(*plen, *key), set, 0)
                    .map_err(map_err("NET_V6"))?;
            }
        }
        {
            let mut fr: HashMap<&mut MapData, FileRuleKey, FileRuleValue> =
                HashMap::try_from(self.map_mut("FILE_RULES")?).map_err(map_err("FILE_RULES"))?;
            for (k, v) in files {
                fr.insert(k, v, 0).map_err(map_err("FILE_RULES"))?;
            }
        }
        {
            let mut sb: HashMap<&mut MapData, u64, SandboxConfig> =
                HashMap::try_from(self.map_mut("SANDBOXES")?).map_err(map_err("SANDBOXES"))?;
            sb.insert(spec.cgroup_id, spec.config, 0)
                .map_err(map_err("SANDBOXES"))?;
        }
        let mut levels: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut("SANDBOX_LEVELS")?).map_err(map_err("SANDBOX_LEVELS"))?;
        let cur = levels.get(&0, 0).map_err(map_err("SANDBOX_LEVELS"))?;
        levels
            .set(0, cur | (1u64 << spec.cgroup_level), 0)
            .map_err(map_err("SANDBOX_LEVELS"))?;
        Ok(())
    }
}

impl Enforcer {
    /// Writes the exec rules and the inode-identity denials of a sandbox.
    /// Call before `install_sandbox`, which publishes the sandbox entry: the
    /// kernel must never see a sandbox without all of its rules.
    pub fn install_exec_and_inode_rules(
        &mut self,
        exec: &[(FileRuleKey, pep_common::file::ExecRuleValue)],
        inodes: &[(pep_common::file::InodeKey, FileRuleValue)],
    ) -> Result<(), EnforcerError> {
        {
            let mut er: HashMap<&mut MapData, FileRuleKey, pep_common::file::ExecRuleValue> =
                HashMap::try_from(self.map_mut("EXEC_RULES")?).map_err(map_err("EXEC_RULES"))?;
            for (k, v) in exec {
                er.insert(k, v, 0).map_err(map_err("EXEC_RULES"))?;
            }
        }
        let mut ir: HashMap<&mut MapData, pep_common::file::InodeKey, FileRuleValue> =
            HashMap::try_from(self.map_mut("INODE_RULES")?).map_err(map_err("INODE_RULES"))?;
        for (k, v) in inodes {
            ir.insert(k, v, 0).map_err(map_err("INODE_RULES"))?;
        }
        Ok(())
    }
}
