//! The CPU floor of many small paths for the benchmarks, in one process: for every store
//! path on stdin, its NAR, SHA-256 of it, zstd at the given level and SHA-256 of that,
//! paths spread over every core. (For a few large paths `nix-store --dump | zstd -T0 |
//! sha256sum` per path is the floor; for thousands of small ones the start of three
//! processes per path would be most of what it measures.) Not a test:
//!
//!   cargo bench --bench cpu_floor -- LEVEL < paths
//!
//! Prints one JSON object: {"paths": N, "nar_bytes": B, "seconds": S}.

use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use sha2::Digest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let level: i32 = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .map_or(Ok(3), |l| l.parse())?;
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let paths: Vec<&str> = input.lines().filter(|l| !l.trim().is_empty()).collect();
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..cores)
            .map(|_| {
                s.spawn(|| -> std::io::Result<()> {
                    let mut nar = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = paths.get(i) else { return Ok(()) };
                        nar.clear();
                        cachepush::format::nar::dump_path(std::path::Path::new(p), &mut nar)?;
                        let nar_hash = sha2::Sha256::digest(&nar);
                        let compressed = zstd::bulk::compress(&nar, level)?;
                        let file_hash = sha2::Sha256::digest(&compressed);
                        std::hint::black_box((nar_hash, file_hash));
                        bytes.fetch_add(nar.len() as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a worker panicked")))
        })
    })?;
    println!(
        "{{\"paths\": {}, \"nar_bytes\": {}, \"seconds\": {:.4}}}",
        paths.len(),
        bytes.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
