//! meshbench's command line: the options, their defaults, and the values that make no run.

use std::path::PathBuf;

/// Why meshbench stops.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    /// The command line (exit 64).
    #[error("{0}")]
    Usage(String),
    /// A contender exited while it was measured: its figures would mean nothing.
    #[error("{what} exited at start ({status}) {last_log_line}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        last_log_line: String,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) brokers: usize,
    pub(crate) messages: usize,
    pub(crate) qos: u8,
    pub(crate) size: usize,
    pub(crate) rate: u64,
    pub(crate) seconds: u64,
    pub(crate) topics: usize,
    pub(crate) down: usize,
    pub(crate) queue_capacity: Option<u64>,
    /// The bridge's `inflight`.
    pub(crate) inflight: Option<u64>,
    /// The bridge's `inflight_max`.
    pub(crate) inflight_max: Option<u64>,
    /// The bridge's links speak MQTT 3.1.1 (as the master's do) instead of 5.
    pub(crate) v311: bool,
    pub(crate) worker_threads: Option<u64>,
    pub(crate) links_per_thread: Option<u64>,
    pub(crate) repeat: usize,
    /// Bridge processes on the mesh (docs/HA.md): CPU and RSS are their sums.
    pub(crate) instances: usize,
    /// Only the fixed-rate phase (the steady case): no flat-out run.
    pub(crate) steady: bool,
    /// Round-trip time between each contender and each broker, in ms (a WAN): a proxy delays
    /// every byte by half of it each way. The load's clients connect directly.
    pub(crate) rtt_ms: u64,
    /// Instead of the flat-out and fixed-rate phases: `burst` messages published at once on
    /// each of `burst_origins` brokers, every one expected on every broker.
    pub(crate) burst: Option<usize>,
    pub(crate) burst_origins: usize,
    /// Instead of the two phases: the contenders lose the last broker, `outage` messages are
    /// published on the first as fast as possible, then the broker comes back while a live
    /// stream runs at `rate` for `seconds`; how fast its backlog drains.
    pub(crate) outage: Option<usize>,
    /// The `max_inflight_messages` of the brokers and of the master (the Receive Maximum
    /// mosquitto announces to MQTT 5 clients, and its window towards MQTT 3.1.1 clients; 0:
    /// none).
    pub(crate) broker_inflight: u64,
    /// The mosquitto binary of the brokers and the master (default: the installed one).
    pub(crate) mosquitto: Option<PathBuf>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            brokers: 3,
            messages: 20_000,
            qos: 1,
            size: 64,
            rate: 5_000,
            seconds: 5,
            topics: 1,
            down: 0,
            queue_capacity: None,
            inflight: None,
            inflight_max: None,
            v311: false,
            worker_threads: None,
            links_per_thread: None,
            repeat: 1,
            instances: 1,
            steady: false,
            rtt_ms: 0,
            burst: None,
            burst_origins: 4,
            outage: None,
            broker_inflight: 100,
            mosquitto: None,
        }
    }
}

pub(crate) fn parse() -> Result<Opts, BenchError> {
    let mut o = Opts::default();
    let mut args = std::env::args().skip(1);
    let mut origins = None;
    while let Some(a) = args.next() {
        let mut v = || -> Result<u64, BenchError> {
            args.next()
                .ok_or_else(|| BenchError::Usage(format!("{a} needs a value")))?
                .parse()
                .map_err(|e| BenchError::Usage(format!("{a}: {e}")))
        };
        match a.as_str() {
            "--brokers" => o.brokers = v()? as usize,
            "--messages" => o.messages = v()? as usize,
            "--qos" => o.qos = v()? as u8,
            "--size" => o.size = v()? as usize,
            "--rate" => o.rate = v()?,
            "--seconds" => o.seconds = v()?,
            "--topics" => o.topics = v()? as usize,
            "--down" => o.down = v()? as usize,
            "--queue-capacity" => o.queue_capacity = Some(v()?),
            "--inflight" => o.inflight = Some(v()?),
            "--inflight-max" => o.inflight_max = Some(v()?),
            "--v311" => o.v311 = true,
            "--worker-threads" => o.worker_threads = Some(v()?),
            "--links-per-thread" => o.links_per_thread = Some(v()?),
            "--repeat" => o.repeat = v()? as usize,
            "--instances" => o.instances = v()? as usize,
            "--steady" => o.steady = true,
            "--rtt" => o.rtt_ms = v()?,
            "--burst" => o.burst = Some(v()? as usize),
            "--burst-origins" => origins = Some(v()? as usize),
            "--outage" => o.outage = Some(v()? as usize),
            "--broker-inflight" => o.broker_inflight = v()?,
            "--mosquitto" => {
                o.mosquitto = Some(PathBuf::from(args.next().ok_or_else(|| {
                    BenchError::Usage("--mosquitto needs a path".into())
                })?))
            }
            "-h" | "--help" => {
                return Err(BenchError::Usage("usage: meshbench [--brokers N] [--messages M] [--qos 0|1|2] [--size BYTES] [--rate MSG_PER_S] [--seconds S] [--topics T] [--down K] [--queue-capacity N] [--inflight N] [--inflight-max N] [--v311] [--worker-threads N] [--links-per-thread N] [--repeat R] [--instances K] [--steady] [--rtt MS] [--broker-inflight N] [--mosquitto PATH] [--burst N [--burst-origins K]] [--outage N]".into()))
            }
            other => return Err(BenchError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    // By default the burst starts on four brokers (or every one, when fewer).
    o.burst_origins = origins.unwrap_or(o.brokers.min(4));
    validate(&o)?;
    Ok(o)
}

/// The options' values that make no run.
fn validate(o: &Opts) -> Result<(), BenchError> {
    if o.brokers < 2
        || o.qos > 2
        || o.size < 24
        || o.topics == 0
        || o.rate == 0
        || o.repeat == 0
        || o.instances == 0
        || (o.burst.is_some() && !(1..=o.brokers).contains(&o.burst_origins))
        || o.burst == Some(0)
        || (o.outage.is_some() && (o.brokers < 3 || o.burst.is_some() || o.outage == Some(0)))
    {
        return Err(BenchError::Usage(
            "need --brokers >= 2, --qos 0..2, --size >= 24, --topics >= 1, --rate >= 1, --repeat >= 1, --instances >= 1, --burst >= 1, 1 <= --burst-origins <= --brokers, --outage >= 1 with --brokers >= 3 and no --burst".into(),
        ));
    }
    Ok(())
}
