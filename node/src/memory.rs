//! Giving freed memory back to the system.
//!
//! Objects arrive as JSON and are dropped once decoded, so the initial list of a large cluster, and every
//! full relist, leaves the allocator holding megabytes of freed memory across the runtime's threads. The
//! agent asks glibc to return it after each full converge, so its resident size follows what it keeps
//! (the converted objects), not the peak of a relist.

/// Returns the free memory at the top of every malloc arena to the system (`malloc_trim(0)`).
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    #[expect(unsafe_code, reason = "one call into glibc, which has no safe wrapper")]
    // SAFETY: malloc_trim only reorganizes the allocator's own free lists; it takes no pointer and is
    // thread-safe (each arena is locked while trimmed).
    unsafe {
        libc::malloc_trim(0);
    }
}
