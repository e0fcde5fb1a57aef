//! What the supervisor reads about processes from /proc (Linux).

/// The state letter of a process (`/proc/PID/stat`: R running, S sleeping, D disk wait, T
/// stopped, t traced, Z zombie).
pub(crate) fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// Anonymous resident memory of a process: its private heap, without the shared queue map that
/// makes RSS overstate it. Read from /proc/PID/statm (resident minus shared pages, which is
/// `RssAnon` of /proc/PID/status): read every second per stage, and statm is the cheapest file
/// the kernel formats for it (status formats some fifty lines). O(1), unlike smaps_rollup.
pub(crate) fn private_memory_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let mut fields = statm.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared) * rustix::param::page_size() as u64)
}

/// The process (thread group) of thread `tid`.
pub(crate) fn thread_group_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("Tgid:")).and_then(|rest| rest.trim().parse().ok())
}

/// Whether a process exists and is not a zombie.
pub(crate) fn alive(pid: i32) -> bool {
    u32::try_from(pid).ok().and_then(process_state).is_some_and(|state| state != 'Z')
}

/// Proportional set size of a process (`Pss` of /proc/PID/smaps_rollup): its private pages plus
/// its share of shared ones (the queue map). Walks the page tables: read on request only.
pub(crate) fn pss_bytes(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|line| line.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time a process has used, user and system (/proc/PID/stat fields 14 and 15).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second();
    Some((utime + stime) as f64 / ticks as f64)
}

/// The stage processes a supervisor started, by stage name (its children whose command is
/// `tg-<stage>`).
pub(crate) fn stage_children(supervisor: u32) -> Vec<(String, u32)> {
    let children =
        std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|pid| pid.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((comm.trim().strip_prefix("tg-")?.to_owned(), pid))
        })
        .collect()
}
