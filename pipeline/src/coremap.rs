//! Core maps: giving the hot thread a core of its own on a small machine.
//!
//! On a big server every stage gets its own pinned core ([`ThreadConfig::pinned`]). On a
//! machine with only a few cores that is not possible, but one thing still is: give the one
//! thread that carries every intent (the fused CPU chain) a core that nothing else of the
//! process, nor the node it writes to when that node runs on the same machine, may use.
//! The hot thread may then busy-spin: it owns its core, so spinning costs nobody a time
//! slice, and neither a wake-up nor a preemption sits between a message and its socket
//! write.
//!
//! [`CoreMap::isolate`] picks the cores; [`confine_threads`] moves every existing thread
//! of a process (this one, or a child such as a dev chain) off the hot core. Threads
//! created later inherit the mask of the thread that creates them, so once the process
//! is confined, only the thread pinned to the hot core runs there.
//!
//! # Invariants
//!
//! - `hot` is never in `rest`; `rest` is non-empty; both come from the budget's mask.
//!
//! [`ThreadConfig::pinned`]: crate::runner::ThreadConfig::pinned

use crate::runner::CoreBudget;

/// Why a core map cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreMapError {
    /// Fewer than two usable cores: nothing is left for the other threads.
    #[error(
        "a hot core needs at least 2 usable cores; this process may use {usable} (cores {cores:?})"
    )]
    TooFewCores {
        /// Cores' worth of CPU the process may use (affinity and cgroup quota).
        usable: usize,
        /// The affinity mask.
        cores: Vec<usize>,
    },
    /// The requested hot core is not in the affinity mask.
    #[error("core {core} is not usable by this process (usable: {cores:?})")]
    NotUsable {
        /// The requested core.
        core: usize,
        /// The affinity mask.
        cores: Vec<usize>,
    },
    /// Setting a thread's affinity failed.
    #[error("could not confine thread {tid} to cores {cores:?}: {error}")]
    Affinity {
        /// The thread id.
        tid: u32,
        /// The cores it was to be confined to.
        cores: Vec<usize>,
        /// What the kernel said.
        error: String,
    },
}

/// One core for the hot thread, the others for everything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreMap {
    /// The hot thread's core.
    pub hot: usize,
    /// Every other usable core: the process's other threads (and a node on this machine).
    pub rest: Vec<usize>,
}

impl CoreMap {
    /// Splits `budget` into a hot core (`hot`, or the highest core of the mask: core 0
    /// takes most interrupts) and the rest.
    pub fn isolate(budget: &CoreBudget, hot: Option<usize>) -> Result<CoreMap, CoreMapError> {
        let cores = budget.core_ids().to_vec();
        if budget.usable_cores() < 2 || cores.len() < 2 {
            return Err(CoreMapError::TooFewCores {
                usable: budget.usable_cores(),
                cores,
            });
        }
        let hot = match hot {
            Some(c) if cores.contains(&c) => c,
            Some(c) => return Err(CoreMapError::NotUsable { core: c, cores }),
            // Invariant of `CoreBudget`: sorted, non-empty.
            None => cores[cores.len() - 1],
        };
        let rest: Vec<usize> = cores.into_iter().filter(|&c| c != hot).collect();
        debug_assert!(!rest.is_empty() && !rest.contains(&hot));
        Ok(CoreMap { hot, rest })
    }
}

/// Confines every thread of process `pid` (`None`: this process) to `cores`. Returns how
/// many threads were moved. A thread that exits meanwhile is skipped.
#[cfg(target_os = "linux")]
pub fn confine_threads(pid: Option<u32>, cores: &[usize]) -> Result<usize, CoreMapError> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".to_owned(),
    };
    let fail = |tid: u32, error: String| CoreMapError::Affinity {
        tid,
        cores: cores.to_vec(),
        error,
    };
    // SAFETY: `cpu_set_t` is a plain bit array for which all-zeros is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cores {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(fail(0, format!("core {c} is past CPU_SETSIZE")));
        }
        // SAFETY: `c < CPU_SETSIZE`, the number of bits in `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let entries = std::fs::read_dir(&dir).map_err(|e| fail(pid.unwrap_or(0), e.to_string()))?;
    let mut moved = 0;
    for entry in entries.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // SAFETY: `set` is a valid, initialised cpu_set_t and we pass its exact size; the
        // call only reads it.
        let rc = unsafe {
            libc::sched_setaffinity(
                tid as libc::pid_t,
                std::mem::size_of::<libc::cpu_set_t>(),
                &set,
            )
        };
        if rc == 0 {
            moved += 1;
        } else {
            let err = std::io::Error::last_os_error();
            // The thread ended between the listing and the call.
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(fail(tid, err.to_string()));
            }
        }
    }
    Ok(moved)
}

/// Confines every thread of process `pid` to `cores` (not supported here: does nothing).
#[cfg(not(target_os = "linux"))]
pub fn confine_threads(_pid: Option<u32>, _cores: &[usize]) -> Result<usize, CoreMapError> {
    Ok(0)
}

/// The cores thread `tid` of this process may run on (Linux; `None` elsewhere or if it
/// has gone), read from `/proc/self/task/<tid>/status`.
pub fn thread_cores(tid: u32) -> Option<Vec<usize>> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    parse_cpu_list(list)
}

/// Parses a kernel CPU list such as `0-2,5`.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_core_is_hot_by_default_and_never_among_the_rest() {
        let b = CoreBudget::from_parts(vec![0, 1, 2, 3], None);
        let m = CoreMap::isolate(&b, None).unwrap();
        assert_eq!(m.hot, 3);
        assert_eq!(m.rest, vec![0, 1, 2]);
        let m = CoreMap::isolate(&b, Some(1)).unwrap();
        assert_eq!((m.hot, m.rest), (1, vec![0, 2, 3]));
    }

    #[test]
    fn one_core_or_a_quota_of_one_cannot_be_split() {
        let one = CoreBudget::from_parts(vec![0], None);
        assert!(matches!(
            CoreMap::isolate(&one, None),
            Err(CoreMapError::TooFewCores { usable: 1, .. })
        ));
        let quota = CoreBudget::from_parts(vec![0, 1, 2, 3], Some(1.0));
        assert!(matches!(
            CoreMap::isolate(&quota, None),
            Err(CoreMapError::TooFewCores { usable: 1, .. })
        ));
    }

    #[test]
    fn a_core_outside_the_mask_is_refused_by_name() {
        let b = CoreBudget::from_parts(vec![0, 1], None);
        let e = CoreMap::isolate(&b, Some(7)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "core 7 is not usable by this process (usable: [0, 1])"
        );
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_cpu_list("1"), Some(vec![1]));
        assert_eq!(parse_cpu_list("x"), None);
    }
}
