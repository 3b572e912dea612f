//! CPU per request of the usage writer on SQLite: each request is admitted (journal) and
//! completed with a trace like the server's, the way `tenancy` does it; the writer commits them
//! in groups. Prints the process's CPU time (utime + stime) per request, so that store changes
//! can be compared without the HTTP stack around them.
//!
//!     cargo run --release -p ferry-store --example usage_writer_bench -- [REQUESTS] [DB]

use std::time::Instant;

use ferry_store::{Store, UsageFinish, UsageStart, now_ms};

/// utime + stime of this process, in seconds (from /proc; Linux only).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().map_or(Ok(100_000), |n| n.parse())?;
    let dir = std::env::temp_dir().join(format!("ferry-usage-bench-{}", std::process::id()));
    let db = args.next().unwrap_or_else(|| dir.join("ferry.db").display().to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let store = Store::open(&db).await?;
        let writer = store.open_usage_writer().await?;
        let run = |from: usize, to: usize| {
            let writer = writer.clone();
            async move {
                for i in from..to {
                    let request_id: std::sync::Arc<str> = format!("req_{}", uuid::Uuid::now_v7().simple()).into();
                    let start = UsageStart {
                        request_id: request_id.clone(),
                        instance: "bench".into(),
                        tenant_id: Some("ten_4c95893b0d76de6a615b6d1d".into()),
                        project_id: Some("proj_0ac1c8214c631ae6a52e9c51".into()),
                        key_id: Some("key_74f838c0dfe4c036544b8751".into()),
                        route: "/v1/chat/completions".into(),
                        model: "bench".into(),
                        stream: false,
                        started_at: now_ms(),
                    };
                    writer.start(start).await?;
                    let json = format!(
                        r#"{{"request_id":"{request_id}","route":"/v1/chat/completions","model":"bench","status":"ok","http_status":200,"tenant_id":"ten_4c95893b0d76de6a615b6d1d","project_id":"proj_0ac1c8214c631ae6a52e9c51","key_id":"key_74f838c0dfe4c036544b8751","routing":{{"provider":"mock/mock","target":"mock/mock","attempts":1,"fallbacks":0,"cache_hit":false}},"guardrails":{{"policy":"redact","counts":{{}}}},"timings":{{"total_ms":{},"first_token_ms":null,"upstream_ms":12}},"sampling":{{}},"tokens":{{"prompt":12,"completion":7,"cached":0}},"cost":0.0,"model_card":null}}"#,
                        i % 20
                    );
                    let finish = UsageFinish {
                        provider: Some("mock/mock".into()),
                        status: "ok".into(),
                        http_status: 200,
                        prompt_tokens: 12,
                        completion_tokens: 7,
                        latency_ms: (i % 20) as u64,
                        trace: Some(json),
                        ..Default::default()
                    };
                    writer.finish(request_id, finish);
                    // Requests arrive over time, not all at once: a group gathers what came
                    // in meanwhile, as on a busy server.
                    if i % 64 == 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
                Ok::<_, ferry_store::StoreError>(())
            }
        };
        // Warm-up: the first groups create pages and cache statements.
        run(0, requests / 10).await?;
        writer.flush().await;
        let (cpu, wall) = (cpu_seconds(), Instant::now());
        run(0, requests).await?;
        writer.flush().await;
        let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed());
        println!(
            "{requests} requests: {:.2} µs CPU each ({:.2} s CPU, {:.2} s wall)",
            cpu * 1e6 / requests as f64,
            cpu,
            wall.as_secs_f64()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
