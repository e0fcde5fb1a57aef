//! Kernel caps per stage: one cgroup per stage process, with the limits from
//! `supervisor.cgroups.stages.<stage>` (`memory_high_mib`, `memory_max_mib`, `cpu_max_percent`).
//!
//! - cgroup v2 with a delegated subtree (systemd `Delegate=yes`): the supervisor moves itself
//!   into `<own>/supervisor` (v2 allows no processes in a group that gives controllers to its
//!   children), enables `memory` and `cpu` for the subtree, and creates `<own>/<stage>` with
//!   `memory.high`, `memory.max` and `cpu.max`.
//! - cgroup v1 (controllers mounted one per hierarchy, writable as root): a group
//!   `tailgate-<supervisor pid>/<stage>` under the supervisor's own group in the `memory` and
//!   `cpu` hierarchies, with `memory.soft_limit_in_bytes`, `memory.limit_in_bytes` and
//!   `cpu.cfs_quota_us` / `cpu.cfs_period_us`.
//! - Otherwise the stages run without kernel caps and the supervisor says so once at start;
//!   its own memory budgets (RssAnon, checked every second) still apply.
//!
//! Memory caps are not set unless configured: a stage's cgroup is also charged for the page
//! cache of the shared queue map it touches, so a tight `memory.max` throttles its I/O rather
//! than capping its heap; the supervisor's budgets cap the heap.

use std::path::{Path, PathBuf};

use tailgate_config::{CgroupsConfig, StageCaps};
use tailgate_ipc::StageId;

/// CPU bandwidth period written with a quota (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The per-stage groups in use.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// A delegated v2 subtree: `base` is the supervisor's own group.
    V2 { base: PathBuf },
    /// v1: the groups made under the memory and cpu hierarchies (either may be missing).
    V1 { memory: Option<PathBuf>, cpu: Option<PathBuf> },
}

/// Sets up the per-stage groups, or says (once) why there are none.
pub fn setup(config: &CgroupsConfig) -> Option<Cgroups> {
    if !config.enabled {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let result = setup_v2(&own, &mounts).or_else(|v2| setup_v1(&own, &mounts).map_err(|v1| format!("{v2}; {v1}")));
    let cgroups = match result {
        Ok(cgroups) => cgroups,
        Err(why) => {
            tracing::warn!(reason = %why, "no writable cgroup: stages run without kernel caps (the supervisor's memory budgets still apply)");
            return None;
        }
    };
    for stage in StageId::ALL {
        if let Err(err) = cgroups.create(stage, &config.stages.get(stage.as_str()).copied().unwrap_or_default()) {
            tracing::warn!(%stage, error = %err, "cannot create the stage's cgroup; stages run without kernel caps");
            cgroups.remove();
            return None;
        }
    }
    tracing::info!(cgroups = ?cgroups, "one cgroup per stage");
    Some(cgroups)
}

/// The mount point of the cgroup hierarchy that has `controller` (v1), or of cgroup2 (`None`).
fn mount_point(mounts: &str, controller: Option<&str>) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let fstype = right.next()?;
        let options = right.nth(1).unwrap_or("");
        let mount = left.split_whitespace().nth(4)?;
        let matches = match controller {
            None => fstype == "cgroup2",
            Some(name) => fstype == "cgroup" && options.split(',').any(|o| o == name),
        };
        matches.then(|| PathBuf::from(mount))
    })
}

fn setup_v2(own: &str, mounts: &str) -> Result<Cgroups, String> {
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2 membership")?;
    let mount = mount_point(mounts, None).ok_or("cgroup2 not mounted")?;
    let base = mount.join(path.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory" || c == "cpu") {
        return Err(format!("cgroup v2 group {} has no memory or cpu controller delegated", base.display()));
    }
    // No processes may stay in a group that hands controllers to its children.
    let leaf = base.join("supervisor");
    std::fs::create_dir_all(&leaf).map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
    std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("cannot move the supervisor into {}: {e}", leaf.display()))?;
    let enable: Vec<String> = ["memory", "cpu"]
        .iter()
        .filter(|c| controllers.split_whitespace().any(|have| have == **c))
        .map(|c| format!("+{c}"))
        .collect();
    std::fs::write(base.join("cgroup.subtree_control"), enable.join(" "))
        .map_err(|e| format!("cannot enable {} in {}: {e}", enable.join(" "), base.display()))?;
    Ok(Cgroups::V2 { base })
}

fn setup_v1(own: &str, mounts: &str) -> Result<Cgroups, String> {
    let group = |controller: &str| -> Option<PathBuf> {
        let path = own.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names.split(',').any(|n| n == controller).then(|| path.to_string())
        })?;
        let mount = mount_point(mounts, Some(controller))?;
        let dir = mount.join(path.trim_start_matches('/')).join(format!("tailgate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok().map(|_| dir)
    };
    let (memory, cpu) = (group("memory"), group("cpu"));
    if memory.is_none() && cpu.is_none() {
        return Err("no writable cgroup v1 memory or cpu hierarchy".to_string());
    }
    Ok(Cgroups::V1 { memory, cpu })
}

fn write(dir: &Path, file: &str, value: String) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}/{file}: {e}", dir.display())))
}

impl Cgroups {
    /// The stage's group directories (one per hierarchy).
    pub fn dirs(&self, stage: StageId) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { base } => vec![base.join(stage.as_str())],
            Cgroups::V1 { memory, cpu } => {
                memory.iter().chain(cpu.iter()).map(|root| root.join(stage.as_str())).collect()
            }
        }
    }

    fn create(&self, stage: StageId, caps: &StageCaps) -> std::io::Result<()> {
        let mib = |v: u64| (v * 1024 * 1024).to_string();
        match self {
            Cgroups::V2 { base } => {
                let dir = base.join(stage.as_str());
                std::fs::create_dir_all(&dir)?;
                if let Some(high) = caps.memory_high_mib {
                    write(&dir, "memory.high", mib(high))?;
                }
                if let Some(max) = caps.memory_max_mib {
                    write(&dir, "memory.max", mib(max))?;
                }
                if let Some(percent) = caps.cpu_max_percent {
                    write(&dir, "cpu.max", format!("{} {CPU_PERIOD_US}", u64::from(percent) * CPU_PERIOD_US / 100))?;
                }
            }
            Cgroups::V1 { memory, cpu } => {
                if let Some(root) = memory {
                    let dir = root.join(stage.as_str());
                    std::fs::create_dir_all(&dir)?;
                    if let Some(high) = caps.memory_high_mib {
                        write(&dir, "memory.soft_limit_in_bytes", mib(high))?;
                    }
                    if let Some(max) = caps.memory_max_mib {
                        write(&dir, "memory.limit_in_bytes", mib(max))?;
                    }
                }
                if let Some(root) = cpu {
                    let dir = root.join(stage.as_str());
                    std::fs::create_dir_all(&dir)?;
                    if let Some(percent) = caps.cpu_max_percent {
                        write(&dir, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                        write(&dir, "cpu.cfs_quota_us", (u64::from(percent) * CPU_PERIOD_US / 100).to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves a freshly started stage process into its groups.
    pub fn place(&self, stage: StageId, pid: u32) {
        for dir in self.dirs(stage) {
            if let Err(err) = write(&dir, "cgroup.procs", pid.to_string()) {
                tracing::warn!(%stage, pid, error = %err, "cannot move the stage into its cgroup");
            }
        }
    }

    /// Removes the groups (at shutdown, once the stages have exited).
    pub fn remove(&self) {
        let roots: Vec<PathBuf> = match self {
            Cgroups::V2 { base } => {
                for stage in StageId::ALL {
                    let _ = std::fs::remove_dir(base.join(stage.as_str()));
                }
                return;
            }
            Cgroups::V1 { memory, cpu } => memory.iter().chain(cpu.iter()).cloned().collect(),
        };
        for root in roots {
            for stage in StageId::ALL {
                let _ = std::fs::remove_dir(root.join(stage.as_str()));
            }
            let _ = std::fs::remove_dir(&root);
        }
    }
}
