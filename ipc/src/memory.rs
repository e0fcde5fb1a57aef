//! A process's own memory: what it holds privately, and handing free heap back to the system.
//!
//! glibc keeps freed heap in its arenas: after a burst a process's resident memory stays at the
//! burst's peak although nothing uses it. Shedding (see the supervisor's soft budget) ends with
//! [`release_free_heap`], which returns those pages (`malloc_trim`).

/// Private (anonymous resident) memory of this process, `RssAnon` of /proc/self/status: its
/// heap and stacks, without the shared queue map.
pub fn private_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Returns the allocator's free pages to the system (glibc `malloc_trim(0)`: every arena, not
/// only the top of the main heap). Costs a walk of the free lists: call it on request, not per
/// step.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only touches the allocator's own free lists, under its locks; it is
    // safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
