//! `tailgate-loadgen profile`: the field report's load profile (`tailgate::workload`) sent over
//! OTLP/gRPC, with the services' log lines to a file and the ground truth of the kept traces.

use std::time::{Duration, Instant};

use super::{Latencies, cpu_ticks, export_raw};

pub struct ProfileOptions {
    pub duration: Duration,
    pub ramp: tailgate::workload::Ramp,
    pub tick: Duration,
    pub batch: usize,
    pub seed: u64,
}

/// Runs the field report's profile: every tick, the traces the users finished in it, exported
/// in requests of at most `batch` spans; their log lines appended to `log_file`; the accepted
/// traces that must be kept written to `truth_file`.
pub async fn profile(
    endpoint: &str,
    options: ProfileOptions,
    log_file: Option<std::path::PathBuf>,
    truth_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use prost::Message;
    use std::io::Write;
    use tailgate::workload::{Workload, log_lines, request, truth_line};
    let open = |path: Option<std::path::PathBuf>| -> anyhow::Result<Option<std::io::BufWriter<std::fs::File>>> {
        Ok(match path {
            Some(path) => {
                Some(std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?))
            }
            None => None,
        })
    };
    let (mut logs, mut truth) = (open(log_file)?, open(truth_file)?);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let mut workload = Workload::new(run_id, options.seed);
    let cpu_before = cpu_ticks(std::process::id()).unwrap_or(0);
    let mut latencies = Latencies::default();
    let started = Instant::now();
    let mut interval = tokio::time::interval(options.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut due, mut traces_sent) = (0.0f64, 0u64);
    let (mut accepted, mut refused, mut keep_worthy, mut kept_traces, mut lines) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut text = String::new();
    while started.elapsed() < options.duration {
        interval.tick().await;
        due += options.ramp.users_at(started.elapsed()) * options.tick.as_secs_f64();
        let count = due.floor() as u64;
        due -= count as f64;
        let traces: Vec<_> = (0..count).map(|_| workload.trace()).collect();
        traces_sent += count;
        let end = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        if let Some(file) = logs.as_mut() {
            text.clear();
            for trace in &traces {
                log_lines(trace, end.as_millis() as u64, &mut text);
            }
            lines += text.lines().count() as u64;
            file.write_all(text.as_bytes())?;
            file.flush()?;
        }
        let mut at = 0;
        while at < traces.len() {
            let (mut spans, mut until) = (0, at);
            while until < traces.len() && (until == at || spans + traces[until].spans() as usize <= options.batch) {
                spans += traces[until].spans() as usize;
                until += 1;
            }
            let chunk = &traces[at..until];
            at = until;
            let body = bytes::Bytes::from(request(chunk, end.as_nanos() as u64).encode_to_vec());
            let sent_at = Instant::now();
            match export_raw(&mut grpc, "/opentelemetry.proto.collector.trace.v1.TraceService/Export", body).await {
                Ok(()) => {
                    latencies.add(sent_at.elapsed());
                    accepted += spans as u64;
                    for trace in chunk {
                        if let Some(line) = truth_line(trace) {
                            keep_worthy += u64::from(trace.spans());
                            kept_traces += 1;
                            if let Some(file) = truth.as_mut() {
                                writeln!(file, "{line}")?;
                            }
                        }
                    }
                }
                Err(_) => refused += spans as u64,
            }
        }
    }
    if let Some(file) = truth.as_mut() {
        file.flush()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_ticks(std::process::id()).unwrap_or(0).saturating_sub(cpu_before);
    println!(
        "profile for {elapsed:.1} s: traces {traces_sent}, spans accepted {accepted} ({:.0}/s), refused {refused}, \
         keep-worthy {keep_worthy} spans in {kept_traces} traces, log lines {lines}; generator cpu {:.2}% of one core",
        accepted as f64 / elapsed,
        cpu as f64 / elapsed
    );
    latencies.print();
    Ok(())
}
