//! A global allocator that counts allocations per thread, for tests that prove a path makes no
//! per-recipient allocation: they step reactors on the test thread and compare the counts of
//! their turns, so work of other threads (other tests, client threads) is not counted.
//!
//! A test crate that uses it declares `mod alloc_support;` and installs
//! `#[global_allocator] static GLOBAL: alloc_support::Counting = alloc_support::Counting;`.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Read;
use std::net::TcpStream;

pub struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every operation is passed to the system allocator unchanged; the counter is a
// const-initialised thread-local Cell without destructor, so updating it never allocates or
// re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations (and reallocations) made by this thread so far.
pub fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Reads whatever is waiting on every client socket so their buffers never fill.
pub fn drain_clients(clients: &mut [TcpStream]) {
    let mut buf = [0u8; 4096];
    for c in clients.iter_mut() {
        c.set_nonblocking(true).unwrap();
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}
