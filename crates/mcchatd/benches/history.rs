//! History write cost: chat datagrams as the relay loop hands them over, decoded and
//! committed by the writer thread into SQLite (WAL, synchronous=NORMAL).
//!
//! - `history/write_10000`: records committed per second (wall clock). Each iteration queues
//!   10,000 (within the writer's queue) and waits for the flush that a query does first, so
//!   every iteration ends with them committed.
//! - `history/store_datagram_1000`, `history/store_batch_1000`: what the relay loop itself
//!   pays to hand over a datagram, one call each or 32 a call (the commits that follow are
//!   not timed).
//! - `history/cpu/...`: printed before the criterion groups: CPU time per record on the relay
//!   side (the calling thread's CPU clock, around the hand-over only) and in the writer (the
//!   process's CPU clock less the calling thread's), for a burst and for a steady stream of
//!   10,000 a second, handed over one by one or in batches. CPU time, unlike wall time, does
//!   not depend on what else runs on the machine, and on a machine of two cores it is the
//!   writer's CPU that the relay loses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nix::time::{ClockId, clock_gettime};

use mcchatd::history::{Batch, History, Policy, Query, Retention};

/// A typical chat datagram: 60-odd bytes of text, with the instance and sequence header.
fn datagram(seq: u64) -> Vec<u8> {
    format!(
        "@id=0123456789abcdef;seq={seq};ts=1763900000000 room1|alice|a chat message of a \
         typical length, some sixty bytes or so"
    )
    .into_bytes()
}

/// A count no benchmark reaches: nothing is deleted.
const KEEP_ALL: u64 = 100_000_000;

/// Retention that keeps `count` messages a room.
fn policy(count: u64) -> Policy {
    Policy {
        rooms: HashMap::new(),
        default: Retention {
            count,
            age: Duration::from_secs(30 * 24 * 3600),
        },
        max_bytes: 1 << 40,
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mcchatd-bench-history-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The newest message: cheap to read, so what is measured is the writing before it.
fn newest() -> Query {
    Query {
        limit: Some(1),
        ..Query::new("room1")
    }
}

/// CPU time used so far, in ns: by this thread, or by the whole process. (Not
/// `getrusage(RUSAGE_THREAD)`: it counts the running thread's time only up to its last tick.)
fn cpu_ns(clock: ClockId) -> i64 {
    let t = clock_gettime(clock).unwrap();
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

/// How the datagrams of one slice are handed over.
#[derive(Clone, Copy)]
enum HandOver {
    /// `store_datagram` for each.
    Each,
    /// `store_batch` for the slice, pushed into a [`Batch`] as the relay loop would.
    Batch,
}

/// Prints CPU per record, relay side and writer side, for `rounds` of `round` records, each
/// handed over `every` apart in slices of `slice` (a stream at `slice / every` per second),
/// then flushed; the room keeps `count` (beyond it, each message stored deletes one).
fn cpu(
    rt: &tokio::runtime::Runtime,
    name: &str,
    how: HandOver,
    (round, rounds): (usize, usize),
    (slice, every): (usize, Duration),
    count: u64,
) {
    let dir = temp_dir("cpu");
    let mut history = History::open(&dir, policy(count)).unwrap();
    let reader = history.reader();
    let total_n = round * rounds;
    let data: Vec<Vec<u8>> = (1..=u64::try_from(total_n).unwrap())
        .map(datagram)
        .collect();
    let now_ms = mcchat_core::wire::now_ms();
    // A first flush, so the writer's start (schema, retention) is not counted.
    rt.block_on(reader.query(newest())).unwrap();
    let mut batch = Batch::new();
    let (mut relay, mut this_thread, mut process) = (0, 0, 0);
    let start = Instant::now();
    let mut next = Instant::now();
    for round in data.chunks(round) {
        let p0 = cpu_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID);
        let t0 = cpu_ns(ClockId::CLOCK_THREAD_CPUTIME_ID);
        for slice in round.chunks(slice) {
            if !every.is_zero() {
                next += every;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            let r0 = cpu_ns(ClockId::CLOCK_THREAD_CPUTIME_ID);
            match how {
                HandOver::Each => {
                    for d in slice {
                        assert!(history.store_datagram(d, now_ms));
                    }
                }
                HandOver::Batch => {
                    for d in slice {
                        batch.push(d, now_ms);
                    }
                    assert_eq!(history.store_batch(&mut batch), slice.len());
                }
            }
            relay += cpu_ns(ClockId::CLOCK_THREAD_CPUTIME_ID) - r0;
        }
        rt.block_on(reader.query(newest())).unwrap();
        this_thread += cpu_ns(ClockId::CLOCK_THREAD_CPUTIME_ID) - t0;
        process += cpu_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID) - p0;
    }
    let wall = start.elapsed();
    let n = i64::try_from(total_n).unwrap();
    #[allow(clippy::cast_precision_loss)]
    let per_s = total_n as f64 / wall.as_secs_f64();
    // The writer's is every other thread's: the writer, and the blocking thread of the one
    // query per round.
    println!(
        "history/cpu/{name}: {n} records: relay side {} ns/record, writer {} ns/record (CPU); \
         {per_s:.0} records/s (wall)",
        relay / n,
        (process - this_thread) / n,
    );
    drop(history);
    let _ = std::fs::remove_dir_all(&dir);
}

fn write(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // As fast as it goes: 20 rounds of 10,000 at once.
    let burst = (10_000, Duration::ZERO);
    cpu(&rt, "burst", HandOver::Each, (10_000, 20), burst, KEEP_ALL);
    cpu(
        &rt,
        "burst_batch",
        HandOver::Batch,
        (10_000, 20),
        burst,
        KEEP_ALL,
    );
    // A stream of 10,000 a second (10 each millisecond) for two seconds: small commits.
    let stream = (10, Duration::from_millis(1));
    cpu(
        &rt,
        "10k_per_s",
        HandOver::Each,
        (10_000, 2),
        stream,
        KEEP_ALL,
    );
    cpu(
        &rt,
        "10k_per_s_batch",
        HandOver::Batch,
        (10_000, 2),
        stream,
        KEEP_ALL,
    );
    // The same stream into a room at its count (10,000): each message stored deletes the
    // oldest, as in a busy room of a daemon that has run a while.
    cpu(
        &rt,
        "10k_per_s_at_count",
        HandOver::Batch,
        (10_000, 3),
        stream,
        10_000,
    );
    let dir = temp_dir("write");
    let mut history = History::open(&dir, policy(KEEP_ALL)).unwrap();
    let reader = history.reader();
    let mut seq = 0u64;
    let mut group = c.benchmark_group("history");
    group.sample_size(20);
    // Received now, so retention keeps them.
    let now_ms = mcchat_core::wire::now_ms();
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("write_10000", |b| {
        b.iter(|| {
            for _ in 0..10_000 {
                seq += 1;
                assert!(history.store_datagram(&datagram(seq), now_ms));
            }
            rt.block_on(reader.query(newest())).unwrap();
        });
    });
    group.throughput(Throughput::Elements(1000));
    group.bench_function("store_datagram_1000", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let data: Vec<Vec<u8>> = (seq + 1..=seq + 1000).map(datagram).collect();
                seq += 1000;
                let start = Instant::now();
                for d in &data {
                    assert!(history.store_datagram(d, now_ms));
                }
                timed += start.elapsed();
                rt.block_on(reader.query(newest())).unwrap();
            }
            timed
        });
    });
    group.bench_function("store_batch_1000", |b| {
        let mut batch = Batch::new();
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let data: Vec<Vec<u8>> = (seq + 1..=seq + 1000).map(datagram).collect();
                seq += 1000;
                let start = Instant::now();
                // In slices of 32, as the relay loop reads a burst.
                for slice in data.chunks(32) {
                    for d in slice {
                        batch.push(d, now_ms);
                    }
                    assert_eq!(history.store_batch(&mut batch), slice.len());
                }
                timed += start.elapsed();
                rt.block_on(reader.query(newest())).unwrap();
            }
            timed
        });
    });
    group.finish();
    drop(history);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, write);
criterion_main!(benches);
