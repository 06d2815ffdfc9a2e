//! The presence flood of issue 9 on one [`PeerEngine`], with injected time (no sockets, no
//! clock): 4,096 made-up instance ids send two heartbeats each (`seq=0`, then `seq=60` or
//! `seq=2048`), then one simulated second of the engine's timers runs. Each iteration is one
//! attack on a fresh engine; the target is under 50 ms. scripts/bench.sh runs this and mcbench
//! reports it ("Peer under a presence flood" in docs/PERFORMANCE.md).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, criterion_group, criterion_main};
use mcchat_core::peer::{Effect, Now, PeerConfig, PeerEngine};
use mcchat_core::wire::{self, InstanceId};

/// The made-up senders.
const FAKE_IDS: u64 = 4096;
/// The room of the engine and of every datagram.
const ROOM: &str = "room1";
/// How much of the engine's timers one iteration runs.
const SIMULATED: Duration = Duration::from_secs(1);
/// A bound on the timer loop, so an engine whose deadlines stopped advancing cannot hang the
/// benchmark (it reports the spin instead).
const MAX_WAKEUPS: u64 = 1_000_000;
/// The `ts` of every datagram (any fixed time: the engine only compares it with `unix_ms`).
const UNIX_MS: u64 = 1_763_900_000_000;

fn heartbeat(id: u64, seq: u64) -> Vec<u8> {
    format!(
        "@id={};seq={seq};ts={UNIX_MS};kind=hb {ROOM}|x|",
        InstanceId(id)
    )
    .into_bytes()
}

/// What one attack did: timer wake-ups, NACK datagrams and other datagrams sent, events.
#[derive(Debug, Default)]
struct Outcome {
    wakeups: u64,
    sent: u64,
    shown: u64,
}

/// Feeds the flood to a fresh engine and runs one simulated second of its timers.
fn attack(engine: &mut PeerEngine, flood: &[Vec<u8>], from: SocketAddr, start: Instant) -> Outcome {
    let mut out = Outcome::default();
    let now = Now {
        mono: start,
        unix_ms: UNIX_MS,
    };
    let drain = |engine: &mut PeerEngine, out: &mut Outcome| {
        while let Some(e) = engine.poll_effect() {
            match e {
                Effect::Send { .. } => out.sent += 1,
                Effect::Show(_) => out.shown += 1,
            }
        }
    };
    for d in flood {
        engine.on_datagram(d, from, now);
    }
    drain(engine, &mut out);
    let end = start + SIMULATED;
    while let Some(t) = engine.next_deadline() {
        if t > end || out.wakeups >= MAX_WAKEUPS {
            break;
        }
        let elapsed = t.saturating_duration_since(start);
        let at = Now {
            mono: t,
            unix_ms: UNIX_MS + u64::try_from(elapsed.as_millis()).unwrap_or(0),
        };
        engine.poll(at);
        out.wakeups += 1;
        drain(engine, &mut out);
    }
    out
}

fn flood(c: &mut Criterion) {
    let dest: SocketAddr = ([239, 255, 77, 1], 5555).into();
    let from: SocketAddr = ([127, 0, 0, 1], 40_000).into();
    // A listener (no presence), like the black-box victim `mcchat listen`.
    let config = PeerConfig::new(ROOM, "", dest);
    let me = InstanceId(0xfeed_0000_0000_0001);
    let mut g = c.benchmark_group("flood");
    // Each iteration takes milliseconds: ten samples of the same count, as criterion advises.
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for second in [60u64, 2048] {
        // Two heartbeats per id, the second right after the first (as the attack).
        let datagrams: Vec<Vec<u8>> = (1..=FAKE_IDS)
            .flat_map(|id| [heartbeat(id, 0), heartbeat(id, second)])
            .collect();
        assert!(
            datagrams.iter().all(|d| wire::decode(d).is_ok()),
            "the flood's datagrams must decode"
        );
        // One run outside the measurement, to say what the attack costs beside time.
        let start = Instant::now();
        let mut engine = PeerEngine::new(
            config.clone(),
            me,
            9,
            Now {
                mono: start,
                unix_ms: UNIX_MS,
            },
        );
        let o = attack(&mut engine, &datagrams, from, start);
        let stats = engine.repair_stats();
        let (senders, missing, held) = engine.receiver_load();
        eprintln!(
            "flood seq={second}: {} wake-ups, {} datagrams sent ({} NACKs), {} events; \
             after 1 s: {senders} senders, {missing} missing, {held} bytes held; {} entries \
             visited, {} lost, {} claims",
            o.wakeups, o.sent, stats.nacks_sent, o.shown, stats.visited, stats.lost, stats.claims
        );
        assert!(o.wakeups < MAX_WAKEUPS, "the timers did not advance");
        g.bench_function(format!("seq_{second}"), |b| {
            b.iter_batched(
                || {
                    let start = Instant::now();
                    let engine = PeerEngine::new(
                        config.clone(),
                        me,
                        9,
                        Now {
                            mono: start,
                            unix_ms: UNIX_MS,
                        },
                    );
                    (engine, start)
                },
                // The engine is returned so that freeing it is not timed: the figure is the
                // attack, not the teardown.
                |(mut engine, start)| {
                    let o = attack(&mut engine, black_box(&datagrams), from, start);
                    (engine, o)
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, flood);
criterion_main!(benches);
