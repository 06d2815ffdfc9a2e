//! History write throughput: chat datagrams as the relay loop hands them over, decoded and
//! committed by the writer thread into SQLite (WAL, synchronous=NORMAL), per second. Each
//! iteration queues 10,000 (within the writer's queue) and waits for the flush that a query
//! does first, so every iteration ends with them committed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::fmt::Write as _;

use mcchatd::history::{History, Policy, Query, Retention};

fn write(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("mcchatd-bench-history-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let policy = Policy {
        rooms: HashMap::new(),
        default: Retention {
            count: 100_000_000,
            age: Duration::from_secs(30 * 24 * 3600),
        },
    };
    let mut history = History::open(&dir, policy).unwrap();
    let reader = history.reader();
    let mut seq = 0u64;
    let mut group = c.benchmark_group("history");
    group.throughput(Throughput::Elements(10_000));
    group.sample_size(20);
    let mut datagram = String::new();
    // Received now, so retention keeps them.
    let now_ms = mcchat_core::wire::now_ms();
    group.bench_function("write_10000", |b| {
        b.iter(|| {
            for _ in 0..10_000 {
                seq += 1;
                datagram.clear();
                write!(
                    datagram,
                    "@id=0123456789abcdef;seq={seq};ts=1763900000000 room1|alice|a chat \
                     message of a typical length, some sixty bytes or so"
                )
                .unwrap();
                assert!(history.store_datagram(datagram.as_bytes(), now_ms));
            }
            // The newest message: cheap to read, so the figure is the writing.
            let flushed = Query {
                room: "room1".into(),
                since_ms: None,
                grep: None,
                limit: Some(1),
            };
            rt.block_on(reader.query(flushed)).unwrap();
        });
    });
    group.finish();
    assert!(history.close(Duration::from_secs(60)));
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, write);
criterion_main!(benches);
