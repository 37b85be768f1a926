//! What meshbench prints: the header, a line per run, the medians and the bounds.

use super::{Opts, Result_, median};

/// What the run measures.
pub(super) fn header(o: &Opts) {
    if let Some(n) = o.burst {
        println!(
            "meshbench: {} brokers, burst of {n} messages on each of {} at once (QoS {}, {} B), every one expected on every broker; {} run(s){}",
            o.brokers,
            o.burst_origins,
            o.qos,
            o.size,
            o.repeat,
            rtt(o)
        );
        return;
    }
    if let Some(n) = o.outage {
        println!(
            "meshbench: {} brokers, the contenders lose b{} while {n} messages are published on b1 (QoS {}, {} B), then it comes back during a live stream of {} msg/s for {} s; {} run(s){}",
            o.brokers,
            o.brokers,
            o.qos,
            o.size,
            o.rate,
            o.seconds,
            o.repeat,
            rtt(o)
        );
        return;
    }
    println!(
        "meshbench: {} brokers (+{} down), {} messages, QoS {}, {} B payload, {} topic(s); latency at {} msg/s for {} s; {} run(s){}",
        o.brokers,
        o.down,
        o.messages,
        o.qos,
        o.size,
        o.topics,
        o.rate,
        o.seconds,
        o.repeat,
        rtt(o)
    );
}

fn rtt(o: &Opts) -> String {
    if o.rtt_ms > 0 {
        format!(
            "; contenders reach the brokers with an RTT of {} ms",
            o.rtt_ms
        )
    } else {
        String::new()
    }
}

/// The ratios of one run (with `--repeat`).
pub(super) fn run_line(o: &Opts, run: usize, a: &Result_, b: &Result_, spooled: Option<u64>) {
    if o.outage.is_some() {
        println!(
            "run {}: master / bridge: live {:.0} / {:.0} msg/s, drain {:.0} / {:.0} msg/s (of live {:.2} / {:.2}), first after {:.2} / {:.2} s, stream p99 {:.2} / {:.2} ms, spooled {}, missing/dup {}/{} vs {}/{}",
            run + 1,
            a.throughput,
            b.throughput,
            a.drain_rate,
            b.drain_rate,
            a.drain_rate / a.throughput,
            b.drain_rate / b.throughput,
            a.reconnect_secs,
            b.reconnect_secs,
            a.p99_ms,
            b.p99_ms,
            spooled.map_or("?".into(), |n| n.to_string()),
            b.missing,
            b.duplicates,
            a.missing,
            a.duplicates,
        );
        return;
    }
    let flat = if o.steady {
        String::new()
    } else {
        format!(
            "throughput {:.2}, CPU/msg {:.2} ({:.1} vs {:.1} µs), ",
            b.throughput / a.throughput,
            b.cpu_per_msg_us / a.cpu_per_msg_us,
            b.cpu_per_msg_us,
            a.cpu_per_msg_us,
        )
    };
    println!(
        "run {}: {flat}at fixed rate {:.2} ({:.1} vs {:.1} µs), p50 {:.2}, p99 {:.2}, RSS {:.1} MiB, spooled {}, missing/dup {}/{} vs {}/{}",
        run + 1,
        b.steady_cpu_per_msg_us / a.steady_cpu_per_msg_us,
        b.steady_cpu_per_msg_us,
        a.steady_cpu_per_msg_us,
        b.p50_ms / a.p50_ms,
        b.p99_ms / a.p99_ms,
        b.peak_rss_mib,
        spooled.map_or("?".into(), |n| n.to_string()),
        b.missing,
        b.duplicates,
        a.missing,
        a.duplicates,
    );
}

/// The medians over every run, the ratios, and the bounds of this machine.
pub(super) fn summary(o: &Opts, runs: &[(Result_, Result_, Option<u64>)], directs: &[Result_]) {
    let med = |f: fn(&Result_) -> f64, bridge: bool| {
        median(
            runs.iter()
                .map(|(a, b, _)| if bridge { f(b) } else { f(a) })
                .collect(),
        )
    };
    let ratio = |f: fn(&Result_) -> f64| median(runs.iter().map(|(a, b, _)| f(b) / f(a)).collect());
    let label = if o.repeat > 1 { " (medians)" } else { "" };
    println!(
        "{:<26} {:>14} {:>14} {:>10}",
        label, "mosquitto", "bridge", "ratio"
    );
    let row = |name: &str, f: fn(&Result_) -> f64| {
        println!(
            "{name:<26} {:>14.2} {:>14.2} {:>10.2}",
            med(f, false),
            med(f, true),
            ratio(f)
        )
    };
    // The rows the burst and the outage end with (`latency`: what their latency is of).
    let ending = |latency: &str| {
        row("CPU µs per forwarded msg", |r| r.cpu_per_msg_us);
        row("peak RSS MiB", |r| r.peak_rss_mib);
        row(&format!("{latency} p50 ms"), |r| r.p50_ms);
        row(&format!("{latency} p99 ms"), |r| r.p99_ms);
        missing_row(runs);
        spooled_row(runs);
    };
    if o.burst.is_some() {
        row("burst msgs everywhere/s", |r| r.throughput);
        row("seconds to deliver it", |r| r.burst_secs);
        ending("latency");
        machine_bound(runs, label, "burst");
        return;
    }
    if o.outage.is_some() {
        row("live msgs/s (brokers kept)", |r| r.throughput);
        row("backlog drain msgs/s", |r| r.drain_rate);
        row("drain / live", |r| r.drain_rate / r.throughput);
        row("s to the first of it", |r| r.reconnect_secs);
        ending("stream meanwhile");
        return;
    }
    if !o.steady {
        row("delivered msg/s per sub", |r| r.throughput);
        row("CPU µs per forwarded msg", |r| r.cpu_per_msg_us);
        row("  of which kernel", |r| r.sys_per_msg_us);
        row("  of which user", |r| r.cpu_per_msg_us - r.sys_per_msg_us);
    }
    row("CPU µs/msg at fixed rate", |r| r.steady_cpu_per_msg_us);
    row("  of which kernel", |r| r.steady_sys_per_msg_us);
    row("  of which user", |r| {
        r.steady_cpu_per_msg_us - r.steady_sys_per_msg_us
    });
    row("peak RSS MiB", |r| r.peak_rss_mib);
    row("latency p50 ms", |r| r.p50_ms);
    row("latency p99 ms", |r| r.p99_ms);
    missing_row(runs);
    spooled_row(runs);
    bounds(o, runs, directs, label);
}

/// Messages missing and delivered twice, summed over the runs.
fn missing_row(runs: &[(Result_, Result_, Option<u64>)]) {
    let sum = |f: fn(&Result_) -> u64, bridge: bool| -> u64 {
        runs.iter()
            .map(|(a, b, _)| if bridge { f(b) } else { f(a) })
            .sum()
    };
    println!(
        "{:<26} {:>14} {:>14}",
        "missing / duplicates",
        format!(
            "{}/{}",
            sum(|r| r.missing, false),
            sum(|r| r.duplicates, false)
        ),
        format!(
            "{}/{}",
            sum(|r| r.missing, true),
            sum(|r| r.duplicates, true)
        )
    );
}

/// How many messages the bridge spooled in each run.
fn spooled_row(runs: &[(Result_, Result_, Option<u64>)]) {
    // A target that fell more than `queue_capacity` behind was moved to the spool, a slower
    // path: runs that spooled and runs that did not are different cases.
    let spooled: Vec<String> = runs
        .iter()
        .map(|(_, _, s)| s.map_or("?".into(), |n| n.to_string()))
        .collect();
    println!(
        "{:<26} {:>14} {:>14}",
        "bridge: spooled msgs",
        "-",
        spooled.join(",")
    );
}

/// What no contender can beat on this machine, and the ceiling without a bridge.
fn bounds(o: &Opts, runs: &[(Result_, Result_, Option<u64>)], directs: &[Result_], label: &str) {
    // What no contender can beat on this machine. At the fixed rate: the kernel's part of the
    // bridge's CPU (socket calls, loopback delivery, wake-ups) against the master's whole CPU.
    // Flat out: the machine's busy time spent on everything but the contender (brokers, load
    // generator), the throughput the bridge's run would reach if the bridge cost nothing.
    println!(
        "bridge's kernel time / master's whole CPU at fixed rate{label}: {:.2}",
        median(
            runs.iter()
                .map(|(a, b, _)| b.steady_sys_per_msg_us / a.steady_cpu_per_msg_us)
                .collect()
        )
    );
    if !o.steady {
        machine_bound(runs, label, "flat out");
        kernel_bound(runs, label);
    }
    // How far from the limit: the same load on one broker, no bridge.
    let direct = |f: fn(&Result_) -> f64| median(directs.iter().map(f).collect());
    let of_direct = |f: fn(&Result_) -> f64| {
        median(
            runs.iter()
                .zip(directs)
                .map(|((_, b, _), d)| f(b) / f(d))
                .collect(),
        )
    };
    println!(
        "ceiling (publisher and subscriber on b1, no bridge){label}: {} p50 {:.3} ms, p99 {:.3} ms",
        if o.steady {
            String::new()
        } else {
            format!("{:.0} msg/s,", direct(|r| r.throughput))
        },
        direct(|r| r.p50_ms),
        direct(|r| r.p99_ms),
    );
    println!(
        "bridge / direct: {}p50 {:.2}, p99 {:.2}",
        if o.steady {
            String::new()
        } else {
            format!("throughput {:.2}, ", of_direct(|r| r.throughput))
        },
        of_direct(|r| r.p50_ms),
        of_direct(|r| r.p99_ms),
    );
}

/// The machine's busy share in each contender's run, what everything but the contender spent
/// per forwarded message (brokers, load generator), and the throughput the bridge's run would
/// reach if the bridge itself cost nothing, against the master's: medians over the runs.
fn machine_bound(runs: &[(Result_, Result_, Option<u64>)], label: &str, case: &str) {
    let med = |f: fn(&Result_) -> f64, bridge: bool| {
        median(
            runs.iter()
                .map(|(a, b, _)| if bridge { f(b) } else { f(a) })
                .collect(),
        )
    };
    println!(
        "{case}{label}: machine busy {:.0} % / {:.0} %, the rest's CPU µs per forwarded msg {:.2} / {:.2}; \
         a bridge costing nothing: throughput {:.2}x the master's",
        med(|r| r.machine_busy, false) * 100.0,
        med(|r| r.machine_busy, true) * 100.0,
        med(|r| r.others_per_msg_us, false),
        med(|r| r.others_per_msg_us, true),
        median(
            runs.iter()
                .map(|(a, b, _)| {
                    let free =
                        (b.others_per_msg_us + b.cpu_per_msg_us) / b.others_per_msg_us.max(1e-9);
                    b.throughput * free / a.throughput
                })
                .collect()
        ),
    );
}

/// Flat out, what the bridge's user space can still win: the share of the bound for a bridge
/// costing nothing that the bridge reached, the share a bridge costing only its kernel time
/// (its socket calls and the loopback deliveries they make) would reach, and that bridge's
/// throughput against the master's (medians over the runs). A share above the second is out
/// of reach for any change in user space alone.
fn kernel_bound(runs: &[(Result_, Result_, Option<u64>)], label: &str) {
    let med = |f: &dyn Fn(&Result_) -> f64| median(runs.iter().map(|(_, b, _)| f(b)).collect());
    let others = |b: &Result_| b.others_per_msg_us.max(1e-9);
    println!(
        "flat out{label}: the bridge reached {:.0} % of a bridge costing nothing; \
         costing only its kernel time ({:.2} of {:.2} µs/msg) a bridge would reach {:.0} % of it, \
         throughput {:.2}x the master's",
        med(&|b| others(b) / (others(b) + b.cpu_per_msg_us)) * 100.0,
        med(&|b| b.sys_per_msg_us),
        med(&|b| b.cpu_per_msg_us),
        med(&|b| others(b) / (others(b) + b.sys_per_msg_us)) * 100.0,
        median(
            runs.iter()
                .map(|(a, b, _)| {
                    let kernel_only =
                        (others(b) + b.cpu_per_msg_us) / (others(b) + b.sys_per_msg_us);
                    b.throughput * kernel_only / a.throughput
                })
                .collect()
        ),
    );
}
