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

/// Free heap above which [`spawn_trimmer`] hands pages back.
pub const TRIM_ABOVE_FREE_BYTES: usize = 1 << 20;

/// How often [`spawn_trimmer`] looks.
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets glibc's allocator up for a long-running server: by default it trims the top of the heap
/// back to the kernel whenever 128 KiB there are free and serves blocks from 128 KiB (a
/// threshold that moves with what was freed) with fresh `mmap`s, so a process serving requests
/// gives its heap back after each one and faults it in again on the next (measured on receive:
/// several `brk` calls and ~49 minor page faults per request from the OpenTelemetry Python SDK's
/// gRPC exporter, 6.4 with this). Fixed thresholds keep the working set: trim only above 64 MiB
/// free at the top, `mmap` only blocks of 4 MiB and more.
/// Memory a burst leaves behind is returned by [`spawn_trimmer`] instead, once it is idle.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; called at process start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Bytes of heap the allocator holds free (glibc `mallinfo2().fordblks`), if known.
pub fn free_heap_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 reads the allocator's statistics under its locks.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// A thread that every [`TRIM_INTERVAL`] returns free heap to the system when more than
/// [`TRIM_ABOVE_FREE_BYTES`] are free: what a burst left behind goes back within seconds of the
/// burst, while a steady load keeps its working set (see [`tune_allocator`]).
pub fn spawn_trimmer() {
    let _ = std::thread::Builder::new().name("heap-trim".into()).spawn(|| {
        loop {
            std::thread::sleep(TRIM_INTERVAL);
            if free_heap_bytes().is_some_and(|free| free > TRIM_ABOVE_FREE_BYTES) {
                release_free_heap();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_freed_request_buffer_stays_in_the_heap_until_trimmed() {
        tune_allocator();
        let before = free_heap_bytes().unwrap();
        // A 2 MiB buffer (an HTTP/2 read buffer's size class): from the heap, not a fresh mmap,
        // and kept free after use instead of being handed back at once.
        let buffer = std::hint::black_box(vec![1u8; 2 << 20]);
        drop(buffer);
        let after = free_heap_bytes().unwrap();
        assert!(after >= before + (1 << 20), "free heap {before} -> {after}: the buffer was not kept");
        release_free_heap();
        assert!(free_heap_bytes().unwrap() < after, "trim returned nothing");
    }
}
