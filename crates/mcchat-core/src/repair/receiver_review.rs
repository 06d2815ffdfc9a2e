//! Regressions from the review of the receiver (the forged-position and duplicate cases),
//! and a seeded random run that checks the receiver's invariants after every call: every
//! number in `next..=highest` missing or held, index keys and totals consistent, budgets
//! kept, and no message delivered twice on honest input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod review {
    use super::super::super::SplitMix64;
    use super::super::*;
    use std::collections::HashSet;

    const A: InstanceId = InstanceId(0xa);
    const B: InstanceId = InstanceId(0xb);

    use super::super::tests::{lost, msgs};

    #[test]
    fn eviction_remembers_where_the_sender_stands() {
        let t0 = Instant::now();
        let config = RepairConfig {
            max_senders: 1,
            ..RepairConfig::default()
        };
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.5;
        let mut shown = Vec::new();
        shown.extend(msgs(&r.on_message(A, 1, 1, 8, false, t0, &mut j)));
        shown.extend(msgs(&r.on_message(A, 3, 3, 8, false, t0, &mut j)));
        let out = r.on_message(B, 1, 100, 8, false, t0, &mut j); // evicts A: Lost 1, shows 3
        eprintln!("evict: {out:?}");
        shown.extend(msgs(&out));
        let out = r.on_message(A, 4, 4, 8, false, t0, &mut j); // A back (evicts B)
        eprintln!(
            "A back: {out:?} next={} missing={:?}",
            r.senders[&A].next,
            r.senders[&A].missing.keys().collect::<Vec<_>>()
        );
        shown.extend(msgs(&out));
        let out = r.on_message(A, 3, 3, 8, true, t0, &mut j); // a repair of 3 (asked again)
        eprintln!("repair 3: {out:?}");
        shown.extend(msgs(&out));
        let mut now = t0;
        while let Some(d) = r.next_deadline() {
            now = d.max(now);
            let (_, out) = r.poll(now, &mut j);
            eprintln!("poll: {out:?}");
            shown.extend(msgs(&out));
        }
        eprintln!("shown {shown:?}");
        assert_eq!(
            shown.iter().filter(|&&m| m == 3).count(),
            1,
            "3 shown twice: {shown:?}"
        );
    }

    #[test]
    fn a_replay_after_history_is_a_duplicate() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        let seqs: Vec<u64> = (1..=20).collect();
        let _ = r.on_history(A, &seqs, t0);
        assert_eq!(msgs(&r.on_message(A, 21, 21, 8, false, t0, &mut j)), [21]);
        assert_eq!(msgs(&r.on_message(A, 22, 22, 8, false, t0, &mut j)), [22]);
        assert_eq!(
            msgs(&r.on_message(A, 24, 24, 8, false, t0, &mut j)),
            Vec::<u64>::new()
        );
        // a network duplicate of 21 (not a repair)
        let out = r.on_message(A, 21, 21, 8, false, t0, &mut j);
        eprintln!("dup 21 -> {out:?}, stats {:?}", r.stats());
        assert!(msgs(&out).is_empty(), "21 shown twice: {out:?}");
    }

    #[test]
    fn a_duplicate_after_a_real_jump_is_a_duplicate() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.0;
        let _ = r.on_message(A, 1, 1, 8, false, t0, &mut j);
        let _ = r.on_message(A, 5001, 5001, 8, false, t0, &mut j);
        let out = r.on_message(A, 5002, 5002, 8, false, t0, &mut j);
        eprintln!("confirm lost {}", lost(&out));
        for s in 3979..=5000 {
            let _ = r.on_message(A, s, s, 8, true, t0, &mut j);
        }
        assert_eq!(r.missing(), 0);
        assert_eq!(
            msgs(&r.on_message(A, 5003, 5003, 8, false, t0, &mut j)),
            [5003]
        );
        let out = r.on_message(A, 5003, 5003, 8, false, t0, &mut j);
        eprintln!("dup 5003 -> msgs {:?} lost {}", msgs(&out), lost(&out));
        assert!(
            out.is_empty(),
            "duplicate not dropped: lost {} msgs {:?}",
            lost(&out),
            msgs(&out)
        );
    }

    #[test]
    fn a_forged_first_heartbeat_does_not_silence_a_sender() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.0;
        let _ = r.on_latest(A, 1 << 40, t0, &mut j); // forged, before the real A is heard
        let mut shown = Vec::new();
        for s in 1..=10 {
            shown.extend(msgs(&r.on_message(A, s, s, 8, false, t0, &mut j)));
        }
        let _ = r.on_latest(A, 10, t0, &mut j);
        assert_eq!(
            shown,
            (1..=10).collect::<Vec<_>>(),
            "A silenced, stats {:?}",
            r.stats()
        );
    }

    /// Invariants after every call.
    fn check(r: &Receiver<(u64, u64)>) {
        let mut missing = 0;
        let mut held = 0;
        let mut nk = [0usize; 2];
        let mut gk = 0;
        let mut ak = 0;
        for (id, s) in &r.senders {
            if s.next <= s.highest {
                for n in s.next..=s.highest.min(s.next.saturating_add(5000)) {
                    assert!(
                        s.missing.contains_key(&n) ^ s.held.contains_key(&n),
                        "{id:?} {n} next {} highest {}",
                        s.next,
                        s.highest
                    );
                }
            }
            assert!(
                s.highest + 1 >= s.next,
                "{id:?} highest {} next {}",
                s.highest,
                s.next
            );
            for k in s.missing.keys().chain(s.held.keys()) {
                assert!(
                    *k >= s.next && *k <= s.highest,
                    "{id:?} key {k} outside {}..={}",
                    s.next,
                    s.highest
                );
            }
            assert!(
                s.highest.saturating_sub(s.next) < s.window(&r.config),
                "{id:?} span {}..={} window {}",
                s.next,
                s.highest,
                s.window(&r.config)
            );
            assert_eq!(
                s.held_bytes,
                s.held.values().map(|h| h.bytes).sum::<usize>()
            );
            assert_eq!(s.keys.missing, s.missing.len());
            assert_eq!(s.keys.held_bytes, s.held_bytes);
            missing += s.missing.len();
            held += s.held_bytes;
            let (h, t) = s.keys.quiet.expect("quiet key");
            assert!(r.quiet.contains(&(h, t, *id)));
            assert_eq!(h, s.is_open());
            if let Some((h, t)) = s.keys.nack {
                assert!(r.nacks[usize::from(h)].contains(&(t, *id)));
                nk[usize::from(h)] += 1;
                // lower bound
                if let Some(m) = s
                    .missing
                    .values()
                    .filter(|m| m.attempts < r.config.max_attempts)
                    .map(|m| m.due)
                    .min()
                {
                    assert!(t <= m, "nack key not a lower bound");
                }
            } else {
                assert!(
                    s.missing
                        .values()
                        .all(|m| m.attempts >= r.config.max_attempts),
                    "{id:?} missing without nack key"
                );
            }
            if let Some(t) = s.keys.giveup {
                assert!(r.giveups.contains(&(t, *id)));
                gk += 1;
            } else {
                assert!(s.missing.is_empty());
            }
            if let Some((h, t)) = s.keys.age {
                assert!(r.ages.contains(&(h, t, *id)));
                ak += 1;
            } else {
                assert!(s.missing.is_empty());
            }
        }
        assert_eq!(r.missing_total, missing);
        assert_eq!(r.held_bytes_total, held);
        assert_eq!(r.quiet.len(), r.senders.len());
        assert_eq!(r.nacks[0].len(), nk[0]);
        assert_eq!(r.nacks[1].len(), nk[1]);
        assert_eq!(r.giveups.len(), gk);
        assert_eq!(r.ages.len(), ak);
        assert!(r.senders.len() <= r.config.max_senders);
        assert!(
            r.missing_total <= r.config.max_missing,
            "missing {}",
            r.missing_total
        );
        assert!(r.held_bytes_total <= r.config.max_held_bytes);
    }

    pub(super) fn run(seed: u64, hostile: bool) -> (u64, Vec<String>) {
        run2(seed, hostile, 3, true, true, true)
    }
    pub(super) fn run2(
        seed: u64,
        hostile: bool,
        max_senders: usize,
        hist: bool,
        follow: bool,
        forget: bool,
    ) -> (u64, Vec<String>) {
        let config = RepairConfig {
            window: 16,
            presence_window: 4,
            max_senders,
            max_missing: 24,
            max_held_bytes: 300,
            nacks_per_second: 5,
            ..RepairConfig::default()
        };
        let mut r: Receiver<(u64, u64)> = Receiver::new(config);
        let mut rng = SplitMix64(seed);
        let mut j = SplitMix64(seed ^ 77);
        let t0 = Instant::now();
        let mut now = t0;
        let mut shown: HashSet<(u64, u64)> = HashSet::new();
        let mut dups = Vec::new();
        let mut pos = [0u64; 5];
        let mut rec = |out: Vec<Delivery<(u64, u64)>>, dups: &mut Vec<String>, what: &str| {
            for d in out {
                if let Delivery::Message(m) = d
                    && !shown.insert(m)
                {
                    dups.push(format!("{m:?} via {what}"));
                }
            }
        };
        for _step in 0..3000 {
            let i = rng.next_u64() % 5;
            let id = InstanceId(i);
            let op = rng.next_u64() % 100;
            now += Duration::from_millis(rng.next_u64() % 60);
            match op {
                0..=49 => {
                    let seq = if hostile && rng.next_u64().is_multiple_of(10) {
                        match rng.next_u64() % 3 {
                            0 => rng.next_u64() % 200,
                            1 => u64::MAX - rng.next_u64() % 40,
                            _ => rng.next_u64(),
                        }
                    } else {
                        pos[i as usize] += 1;
                        pos[i as usize] - (rng.next_u64() % 3).min(pos[i as usize] - 1)
                    };
                    let repair = rng.next_u64().is_multiple_of(4);
                    let out = r.on_message(
                        id,
                        seq,
                        (i, seq),
                        10 + (rng.next_u64() % 50) as usize,
                        repair,
                        now,
                        &mut j,
                    );
                    rec(out, &mut dups, "msg");
                }
                50..=64 => {
                    let l = if hostile && rng.next_u64().is_multiple_of(5) {
                        match rng.next_u64() % 3 {
                            0 => rng.next_u64() % 300,
                            1 => u64::MAX - rng.next_u64() % 40,
                            _ => rng.next_u64(),
                        }
                    } else {
                        pos[i as usize]
                    };
                    let out = r.on_latest(id, l, now, &mut j);
                    rec(out, &mut dups, "latest");
                }
                65..=67 if hist => {
                    let s: Vec<u64> = (0..(rng.next_u64() % 4))
                        .map(|_| {
                            if hostile && rng.next_u64().is_multiple_of(3) {
                                u64::MAX - rng.next_u64() % 40
                            } else {
                                rng.next_u64() % 40
                            }
                        })
                        .collect();
                    let out = r.on_history(id, &s, now);
                    rec(out, &mut dups, "hist");
                }
                68..=70 if follow => {
                    let out = r.follow_from(id, 1 + rng.next_u64() % 5, now);
                    rec(out, &mut dups, "follow");
                }
                71..=74 if forget => r.forget(id),
                65..=74 => {}
                75..=79 => {
                    let a = rng.next_u64() % 40;
                    let n = Nack {
                        instance: id,
                        ranges: vec![a..=a + rng.next_u64() % 10],
                    };
                    r.on_nack_seen(&n, now, &mut j);
                }
                _ => {
                    if let Some(d) = r.next_deadline()
                        && d > now
                    {
                        now = d;
                    }
                    let (_n, out) = r.poll(now, &mut j);
                    rec(out, &mut dups, "poll");
                    check(&r);
                    // A deadline that is due must be cleared by one more poll: else the
                    // driver would spin.
                    if let Some(d) = r.next_deadline()
                        && d <= now
                    {
                        let _ = r.poll(now, &mut j);
                        let again = r.next_deadline();
                        assert!(again.is_none_or(|d2| d2 > now), "spin at {:?}", now - t0);
                    }
                }
            }
            check(&r);
        }
        (seed, dups)
    }

    #[test]
    fn random_honest_runs_keep_the_invariants_and_show_nothing_twice() {
        let mut total = 0;
        for seed in 0..60 {
            let (_, d) = run(seed, false);
            if !d.is_empty() {
                total += 1;
                if total < 4 {
                    eprintln!("seed {seed}: dups {:?}", &d[..d.len().min(5)]);
                }
            }
        }
        assert_eq!(
            total, 0,
            "honest seeds with a message shown twice: {total}/60"
        );
    }

    #[test]
    fn random_hostile_runs_keep_the_invariants() {
        let mut total = 0;
        // Forged messages can reuse a real (id, seq): not a receiver bug, only counted.
        for seed in 0..60 {
            let (_, d) = run(seed, true);
            if !d.is_empty() {
                total += 1;
            }
        }
        eprintln!(
            "hostile seeds where a forged (id, seq) was shown beside the real one: {total}/60"
        );
    }
}

mod review2 {
    use super::review::*;
    #[test]
    fn random_honest_runs_show_nothing_twice_in_every_configuration() {
        for (ms, h, f, fg) in [
            (10, false, false, false),
            (10, false, false, true),
            (3, false, false, false),
            (10, true, false, false),
            (10, false, true, false),
        ] {
            let mut n = 0;
            let mut ex = None;
            for seed in 0..30 {
                let (_, d) = run2(seed, false, ms, h, f, fg);
                if !d.is_empty() {
                    n += 1;
                    if ex.is_none() {
                        ex = Some((seed, d[0].clone()));
                    }
                }
            }
            assert_eq!(
                n, 0,
                "max_senders={ms} hist={h} follow={f} forget={fg}: {n}/30 seeds with duplicates, e.g. {ex:?}"
            );
        }
    }
}
mod review3 {
    use super::super::*;
    #[test]
    fn a_forged_history_record_alone_does_not_silence_a_sender() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        let a = InstanceId(0xa);
        let _ = r.on_history(a, &[1 << 40], t0);
        let mut shown = 0;
        for s in 21..=30 {
            shown += r.on_message(a, s, s, 8, false, t0, &mut j).len();
        }
        let _ = r.on_latest(a, 30, t0, &mut j);
        assert_eq!(
            shown,
            10,
            "A silenced by one forged history record: {:?}",
            r.stats()
        );
    }
    #[test]
    fn a_forged_leave_of_an_unknown_sender_does_not_silence_it() {
        // a leave (not repair) for an id this receiver has not heard yet: on_latest + forget
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        let a = InstanceId(0xa);
        let _ = r.on_latest(a, 1 << 40, t0, &mut j);
        r.forget(a);
        assert!(!r.knows(a));
        let mut shown = 0;
        for s in 5..=10 {
            shown += r.on_message(a, s, s, 8, false, t0, &mut j).len();
        }
        assert_eq!(shown, 6, "A silenced via forgotten memory: {:?}", r.stats());
    }
}
