//! The advisor as a whole: stale or missing data never yields 0 replicas.

use super::suggest::Why;
use super::*;
use crate::testutil::{empty, served};

fn busy(rate: f64) -> Window {
    served(rate, 500.0, 200.0, 0.01 * (1.0 + rate / 50.0), 0.05, rate * 2.5)
}

fn ctx(now_s: f64, replicas: Option<u32>) -> Context<'static> {
    Context {
        now_s,
        model: "m",
        gpu: "g",
        clock_mhz: 1980.0,
        window_clock_mhz: 1980.0,
        max_clock_mhz: 1980.0,
        objectives: Objectives { ttft_s: 0.5, tpot_s: 0.05 },
        replicas,
    }
}

fn cfg() -> AdvisorConfig {
    AdvisorConfig { stale_after_seconds: 10.0, scale_down_delay_seconds: 0.0, ..AdvisorConfig::default() }
}

#[test]
fn stale_data_never_yields_zero_replicas() {
    let mut a = Advisor::new(cfg());
    // Before any data: the current count, never 0.
    let first = a.observe(None, &ctx(0.0, Some(3)));
    assert_eq!(first.suggestion.map(|s| (s.replicas, s.why)), Some((3, Why::NoData)));
    assert!(first.demand_replicas.is_none());
    let mut t = 1.0;
    let mut good = None;
    for _ in 0..60 {
        good = Some(a.observe(Some(&busy(20.0)), &ctx(t, Some(3))));
        t += 1.0;
    }
    let good = good.expect("advice");
    let kept = good.suggestion.expect("suggestion").replicas;
    let kept_demand = good.demand_replicas.expect("demand");
    assert!(kept >= 1 && kept_demand > 0.0, "{good:?}");
    assert!(!good.stale);
    // vLLM gone (no window), then answering with nothing in it, then idle-looking windows
    // whose counters reset: for ten minutes the advice never drops to 0.
    for k in 0..600 {
        let w = match k % 3 {
            0 => None,
            1 => Some(empty()),
            _ => Some(Window { counter_reset: true, ..busy(0.0) }),
        };
        let adv = a.observe(w.as_ref(), &ctx(t, Some(3)));
        t += 1.0;
        let s = adv.suggestion.expect("suggestion");
        assert_eq!(s.replicas, kept, "at {k}: {adv:?}");
        assert_eq!(adv.demand_replicas, Some(kept_demand), "last good demand kept");
        assert_eq!(adv.stale, adv.data_age_s > 10.0);
        if adv.stale {
            assert_eq!(s.why, Why::Stale);
            assert!(adv.reason.contains("last good"), "{}", adv.reason);
        }
    }
    // Data comes back: fresh again.
    let back = a.observe(Some(&busy(20.0)), &ctx(t, Some(3)));
    assert!(!back.stale && back.data_age_s == 0.0);
}

#[test]
fn demand_without_a_replica_count_gives_no_suggestion_but_says_why() {
    let mut a = Advisor::new(cfg());
    let mut adv = None;
    for t in 0..20 {
        adv = Some(a.observe(Some(&busy(10.0)), &ctx(f64::from(t), None)));
    }
    let adv = adv.expect("advice");
    assert!(adv.suggestion.is_none());
    assert!(adv.demand_replicas.is_some_and(|d| d > 0.0));
    assert!(adv.reason.contains("replica count unknown"), "{}", adv.reason);
}

#[test]
fn replicas_file_reads_a_number_or_a_downward_api_annotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("replicas");
    std::fs::write(&f, "4\n").expect("write");
    assert_eq!(read_replicas_file(&f).expect("a number"), 4);
    std::fs::write(&f, "kubernetes.io/config.seen=\"x\"\ngpu-agent/replicas=\"6\"\n").expect("write");
    assert_eq!(read_replicas_file(&f).expect("an annotation"), 6);
    std::fs::write(&f, "0").expect("write");
    assert!(read_replicas_file(&f).expect_err("zero").to_string().contains("no replica count"));
    let e = read_replicas_file(&dir.path().join("missing")).expect_err("missing");
    assert!(matches!(&e, ReplicasError::Read { .. }) && e.to_string().contains("advisor.replicas_file"), "{e}");
    let c = AdvisorConfig { replicas: Some(2), replicas_file: Some(f.clone()), ..AdvisorConfig::default() };
    std::fs::write(&f, "5").expect("write");
    assert_eq!(current_replicas(&c).expect("read"), Some(5));
    assert_eq!(
        current_replicas(&AdvisorConfig { replicas: Some(2), ..AdvisorConfig::default() }).expect("fixed"),
        Some(2)
    );
}

/// The cost of one advisor cycle (demand, model refit, capacity from both sources by
/// bisection, suggestion) with a capacity profile loaded. Run with
/// `cargo test --release -p gpu-agent --lib advice_cycle_benchmark -- --ignored --nocapture`.
#[test]
#[ignore]
fn advice_cycle_benchmark() {
    use objectives::profile::{CapacityBucket, CapacityProfile, ProfileLimits, PROFILE_SCHEMA};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("capacity-profile.json");
    let buckets = (0..64)
        .map(|i| CapacityBucket {
            input_tokens: 64 << (i % 8),
            output_tokens: 16 << (i / 8),
            max_request_rate: 10.0 + f64::from(i),
            output_throughput: 1000.0,
            p99_ttft_s: 0.3,
            p99_tpot_s: 0.03,
            p99_e2e_s: 5.0,
        })
        .collect();
    let p = CapacityProfile {
        schema: PROFILE_SCHEMA,
        model: "m".into(),
        gpu: "g".into(),
        sm_clock_mhz: Some(1600),
        flags: Default::default(),
        limits: ProfileLimits::default(),
        created_unix: 1,
        buckets,
    };
    p.save(&path).expect("save");
    let mut a = Advisor::new(AdvisorConfig { profiles: vec![path], ..AdvisorConfig::default() });
    let windows: Vec<Window> = (0..50).map(|k| busy(5.0 + f64::from(k))).collect();
    let n = 200_000usize;
    let mut times = Vec::with_capacity(n);
    let mut replicas = 0u64;
    for i in 0..n {
        let clock = [1980.0, 1410.0, 1200.0][i % 3];
        let c = Context { clock_mhz: clock, window_clock_mhz: clock, ..ctx(i as f64, Some(4)) };
        let t = std::time::Instant::now();
        let adv = a.observe(Some(&windows[i % windows.len()]), &c);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        replicas += u64::from(adv.suggestion.map_or(0, |s| s.replicas));
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / n as f64;
    println!(
        "advisor cycle over {n} cycles: mean {mean:.2} us, p50 {:.2} us, p99 {:.2} us, max {:.1} us (checksum {replicas})",
        times[n / 2],
        times[n * 99 / 100],
        times[n - 1]
    );
}

#[test]
fn a_server_idle_since_start_is_fresh_zero_demand_not_stale() {
    let mut a = Advisor::new(cfg());
    let mut idle = busy(0.0);
    idle.num_requests_running = Some(0.0);
    idle.mean_prompt_tokens = None;
    idle.mean_generation_tokens = None;
    idle.itl = None;
    idle.ttft = None;
    let mut adv = None;
    for t in 0..60 {
        adv = Some(a.observe(Some(&idle), &ctx(f64::from(t), Some(2))));
    }
    let adv = adv.expect("advice");
    assert!(!adv.stale, "{adv:?}");
    assert_eq!(adv.demand_replicas, Some(0.0));
    assert!(adv.capacity.is_none());
    assert!(adv.reason.contains("idle"), "{}", adv.reason);
    // Scaled down to the minimum only after the delay (0 s here), never to 0.
    assert_eq!(adv.suggestion.map(|s| s.replicas), Some(1));
}
