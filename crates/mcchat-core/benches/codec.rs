//! Codec micro-benchmarks: decoding and encoding one chat datagram (scripts/bench.sh runs
//! these; figure 5 in docs/PERFORMANCE.md).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcchat_core::wire::{self, Header, InstanceId, Kind, Meta};
use std::hint::black_box;

fn codec(c: &mut Criterion) {
    let header = Header {
        meta: Meta {
            instance: Some(InstanceId(0x3f2a_9c01_d4e5_b6a7)),
            seq: Some(123_456),
            ts_ms: Some(1_763_900_000_123),
            kind: Kind::Message,
        },
        extra: &[],
    };
    let mut tagged = String::new();
    wire::encode(
        &header,
        "room1",
        "alice",
        "hello, how is everyone doing today?",
        &mut tagged,
    )
    .unwrap_or_default();
    let bare = "room1|alice|hello, how is everyone doing today?";

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_tagged", |b| {
        b.iter(|| wire::decode(black_box(tagged.as_bytes())).map(|f| f.text.len()))
    });
    g.bench_function("decode_bare", |b| {
        b.iter(|| wire::decode(black_box(bare.as_bytes())).map(|f| f.text.len()))
    });
    let mut out = String::with_capacity(wire::MAX_DATAGRAM);
    g.bench_function("encode_tagged", |b| {
        b.iter(|| {
            wire::encode(
                black_box(&header),
                "room1",
                "alice",
                black_box("hello, how is everyone doing today?"),
                &mut out,
            )
            .map(|()| out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
