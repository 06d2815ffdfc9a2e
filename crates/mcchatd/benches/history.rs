//! History write throughput: records through the writer thread into SQLite (WAL,
//! synchronous=NORMAL), committed, per second. Each iteration queues 1000 records and waits
//! for the flush that a query does first, so every iteration ends with them committed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcchatd::history::{History, Policy, Query, Record, Retention};

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
    group.throughput(Throughput::Elements(1000));
    group.bench_function("write_1000", |b| {
        b.iter(|| {
            for _ in 0..1000 {
                seq += 1;
                assert!(history.store(Record {
                    room: "room1".into(),
                    kind: "message".into(),
                    sender: "alice".into(),
                    text: "a chat message of a typical length, some sixty bytes or so".into(),
                    id: Some("0123456789abcdef".into()),
                    seq: Some(seq),
                    ts_ms: Some(1_763_900_000_000),
                    recv_ms: 1_763_900_000_000,
                }));
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
    history.close();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, write);
criterion_main!(benches);
