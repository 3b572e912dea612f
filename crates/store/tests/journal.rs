//! The usage journal of a SQLite store: admissions are journal lines, records reach the
//! database once, whole, and what a crash left is written as `interrupted` at the next start.
#![allow(clippy::unwrap_used, reason = "a test suite: a failed step stops the test with its error")]

use std::time::Duration;

use ferry_store::{Store, StoreError, UsageFinish, UsageStart};

fn sqlite_path() -> String {
    let dir = std::env::temp_dir().join(format!("ferry-journal-{}", uuid::Uuid::new_v4().simple()));
    dir.join("ferry.db").display().to_string()
}

fn start(id: &str) -> UsageStart {
    UsageStart {
        request_id: id.into(),
        instance: "node-a".into(),
        tenant_id: Some("ten_a".into()),
        route: "/v1/chat/completions".into(),
        model: "m".into(),
        stream: true,
        started_at: ferry_store::now_ms(),
        ..Default::default()
    }
}

fn finish(completion_tokens: u64) -> UsageFinish {
    UsageFinish {
        provider: Some("local".into()),
        status: "ok".into(),
        http_status: 200,
        prompt_tokens: 5,
        completion_tokens,
        latency_ms: 12,
        ttft_ms: Some(3),
        ..Default::default()
    }
}

fn segments(db: &str) -> usize {
    std::fs::read_dir(format!("{db}.usage-journal")).unwrap().count()
}

/// Lets a dropped writer's task end and let go of its journal, as a process's exit would.
async fn let_go() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_crash_leaves_journal_lines_that_the_next_start_writes_as_interrupted() {
    let path = sqlite_path();
    let store = Store::open(&path).await.unwrap();
    let writer = store.open_usage_writer().await.unwrap();
    for id in ["done", "cut-1", "cut-2"] {
        writer.start(start(id)).await.unwrap();
    }
    assert!(matches!(writer.start(start("done")).await, Err(StoreError::Conflict(_))));
    // Admitted means journaled: the database sees a record once, when it is complete.
    assert!(matches!(store.usage_record("done").await, Err(StoreError::NotFound(_))));
    writer.finish("done".into(), finish(7));
    writer.flush().await;
    let done = store.usage_record("done").await.unwrap();
    assert_eq!((done.status.as_str(), done.completion_tokens, done.ttft_ms), ("ok", 7, Some(3)));
    assert!(done.finished_at.is_some());
    assert!(matches!(store.usage_record("cut-1").await, Err(StoreError::NotFound(_))));

    // The process dies with two requests running.
    drop(writer);
    let_go().await;
    let writer = store.open_usage_writer().await.unwrap();
    for id in ["cut-1", "cut-2"] {
        let record = store.usage_record(id).await.unwrap();
        assert_eq!((record.status.as_str(), record.tenant_id.as_deref()), ("interrupted", Some("ten_a")));
    }
    assert_eq!(store.usage_record("done").await.unwrap().status, "ok", "a complete record is left alone");
    // The ingested segment is gone; the new writer's own is the only one.
    assert_eq!(segments(&path), 1);
    // A completion arriving for a reconciled record (its process was only silent, not dead)
    // replaces it with what the request used: still one record.
    writer.finish("cut-2".into(), finish(1));
    writer.flush().await;
    let late = store.usage_record("cut-2").await.unwrap();
    assert_eq!((late.status.as_str(), late.completion_tokens), ("ok", 1));
}

#[tokio::test]
async fn a_second_process_never_takes_a_live_journal() {
    let path = sqlite_path();
    let store = Store::open(&path).await.unwrap();
    let running = store.open_usage_writer().await.unwrap();
    running.start(start("in-flight")).await.unwrap();
    // Another process starts on the same database while the first still serves.
    let other = Store::open(&path).await.unwrap();
    let starting = other.open_usage_writer().await.unwrap();
    assert!(matches!(other.usage_record("in-flight").await, Err(StoreError::NotFound(_))));
    running.finish("in-flight".into(), finish(2));
    running.flush().await;
    assert_eq!(other.usage_record("in-flight").await.unwrap().status, "ok");
    drop((running, starting));
}

#[tokio::test]
async fn completions_and_traces_are_written_in_groups() {
    let path = sqlite_path();
    let store = Store::open(&path).await.unwrap();
    let writer = store.open_usage_writer().await.unwrap();
    // More than one multi-row statement's worth, from many tasks at once.
    let tasks = (0..300).map(|i| {
        let writer = writer.clone();
        tokio::spawn(async move {
            let id = format!("g{i}");
            writer.start(start(&id)).await.unwrap();
            let trace = format!("{{\"request_id\":\"{id}\",\"tokens\":{{\"completion\":{i}}}}}");
            writer.finish(id.into(), UsageFinish { trace: Some(trace), ..finish(i) });
        })
    });
    for task in tasks {
        task.await.unwrap();
    }
    writer.flush().await;
    let total = store
        .usage(&ferry_store::UsageQuery { tenant_id: Some("ten_a".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!((total[0].requests, total[0].completion_tokens), (300, (0..300).sum::<i64>()));
    let trace = store.trace("g123").await.unwrap();
    assert_eq!(trace.trace["tokens"]["completion"], 123);
    assert_eq!(trace.tenant_id.as_deref(), Some("ten_a"));
}
