//! What the supervisor reads about processes from /proc (Linux).

/// The state letter of a process (`/proc/PID/stat`: R running, S sleeping, D disk wait, T
/// stopped, t traced, Z zombie).
pub(crate) fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// Anonymous resident memory of a process (`RssAnon` of /proc/PID/status): its private heap,
/// without the shared queue map that makes RSS overstate it. O(1) to read, unlike smaps_rollup.
pub(crate) fn private_memory_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
