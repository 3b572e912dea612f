//! The store's suite, run against both databases: SQLite in a temporary file, and PostgreSQL
//! in a fresh database on the server named by `FERRY_TEST_POSTGRES_URL` (default: the local
//! one, trust auth), dropped afterwards.
#![allow(clippy::unwrap_used, reason = "a test suite: a failed step stops the test with its error")]

use ferry_store::keys::{KEY_PREFIX, hash_secret};
use ferry_store::tenants::{ProjectUpdate, TenantUpdate};
use ferry_store::usage::{GroupBy, Scope, day_and_month_start, format_day};
use ferry_store::{Limits, NewKey, Role, Store, StoreError, UsageFinish, UsageQuery, UsageStart};
use sqlx::Connection;

fn postgres_server() -> String {
    std::env::var("FERRY_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A fresh PostgreSQL database, or `None` (outside CI) when no server answers.
async fn fresh_postgres() -> Option<(String, String)> {
    let server = postgres_server();
    let admin_url = format!("{server}/postgres");
    let mut conn = match sqlx::PgConnection::connect(&admin_url).await {
        Ok(conn) => conn,
        Err(e) if std::env::var("CI").is_err() => {
            eprintln!("skipping the PostgreSQL half: {admin_url}: {e}");
            return None;
        }
        Err(e) => panic!("PostgreSQL at {admin_url} is needed in CI: {e}"),
    };
    let name = format!("ferry_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    Some((format!("{server}/{name}"), name))
}

async fn drop_postgres(name: &str) {
    let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_server())).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .unwrap();
}

fn sqlite_path() -> String {
    let dir = std::env::temp_dir().join(format!("ferry-store-{}", uuid::Uuid::new_v4().simple()));
    dir.join("ferry.db").display().to_string()
}

/// Runs `suite` on SQLite, then on PostgreSQL.
macro_rules! both {
    ($name:ident, $suite:ident) => {
        #[tokio::test]
        async fn $name() {
            let path = sqlite_path();
            let store = Store::open(&path).await.unwrap();
            $suite(&store).await;
            // Reopening applies no migration twice and keeps the data.
            Store::open(&path).await.unwrap();
            if let Some((url, name)) = fresh_postgres().await {
                let store = Store::open(&url).await.unwrap();
                $suite(&store).await;
                Store::open(&url).await.unwrap();
                drop(store);
                drop_postgres(&name).await;
            }
        }
    };
}

/// Runs `suite` on a fresh SQLite file, then on a fresh PostgreSQL database, handing it the
/// target to open itself (the migration suites reopen it).
macro_rules! both_targets {
    ($(#[$doc:meta])* $name:ident, $suite:ident) => {
        $(#[$doc])*
        #[tokio::test]
        async fn $name() {
            $suite(&sqlite_path()).await;
            if let Some((url, name)) = fresh_postgres().await {
                $suite(&url).await;
                drop_postgres(&name).await;
            }
        }
    };
}

both!(tenants_and_projects, tenants_and_projects_suite);
both!(keys, keys_suite);
both!(usage, usage_suite);
both!(audit, audit_suite);

async fn tenants_and_projects_suite(store: &Store) {
    let limits = Limits { rpm: Some(60), cost_per_day: Some(1.5), ..Default::default() };
    let acme = store.create_tenant("acme", &limits).await.unwrap();
    assert!(acme.id.starts_with("ten_"));
    assert_eq!(store.tenant(&acme.id).await.unwrap(), acme);
    assert!(matches!(store.create_tenant("acme", &Limits::default()).await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.create_tenant(" ", &Limits::default()).await, Err(StoreError::Invalid(_))));
    assert!(matches!(store.tenant("ten_missing").await, Err(StoreError::NotFound(_))));

    let updated = store
        .update_tenant(
            &acme.id,
            &TenantUpdate {
                guardrail_policy: Some(Some("strict".into())),
                retain_content: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.limits, limits);
    assert_eq!(updated.guardrail_policy.as_deref(), Some("strict"));
    assert!(updated.retain_content);
    assert_eq!(store.tenant(&acme.id).await.unwrap(), updated);

    let other = store.create_tenant("globex", &Limits::default()).await.unwrap();
    let web = store.create_project(&acme.id, "web", &Limits::default()).await.unwrap();
    store.create_project(&other.id, "web", &Limits::default()).await.unwrap();
    assert!(matches!(
        store.create_project(&acme.id, "web", &Limits::default()).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.create_project("ten_missing", "x", &Limits::default()).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.projects(Some(&acme.id)).await.unwrap(), vec![web.clone()]);
    assert_eq!(store.projects(None).await.unwrap().len(), 2);
    assert_eq!(store.tenants().await.unwrap().len(), 2);
    let tpm = Limits { tpm: Some(1000), ..Default::default() };
    let update = ProjectUpdate { limits: Some(tpm.clone()), ..Default::default() };
    assert_eq!(store.update_project(&web.id, &update).await.unwrap().limits, tpm);
}

async fn keys_suite(store: &Store) {
    let tenant = store.create_tenant("acme", &Limits::default()).await.unwrap();
    let project = store.create_project(&tenant.id, "web", &Limits::default()).await.unwrap();
    assert!(!store.has_active_admin_key().await.unwrap());
    assert!(!store.has_keys().await.unwrap());

    let admin = NewKey {
        name: "bootstrap".into(),
        role: Role::Admin,
        tenant_id: None,
        project_id: None,
        models: None,
        limits: Limits::default(),
        expires_at: None,
    };
    let (imported, stored) = store.import_key(&admin, "an-admin-secret-from-env").await.unwrap();
    assert!(stored);
    // Importing the same secret again finds the stored key.
    assert_eq!(
        store.import_key(&admin, "an-admin-secret-from-env").await.unwrap(),
        (imported.clone(), false)
    );
    // A secret chosen outside Ferry shows only its first four characters.
    assert_eq!(imported.display_prefix, "an-a");
    assert!(store.has_active_admin_key().await.unwrap());

    let member = NewKey {
        name: "ci".into(),
        role: Role::Member,
        project_id: Some(project.id.clone()),
        models: Some(vec!["small".into()]),
        ..admin.clone()
    };
    let (key, secret) = store.create_key(&member).await.unwrap();
    assert!(secret.starts_with(KEY_PREFIX));
    assert_eq!(secret.len(), KEY_PREFIX.len() + 64, "256 random bits, hex");
    assert_eq!(key.display_prefix, secret[..KEY_PREFIX.len() + 6]);
    assert_eq!(key.tenant_id.as_deref(), Some(tenant.id.as_str()));
    assert!(key.allows_model("small") && !key.allows_model("large"));
    // Only the hash is stored.
    let found = store.key_by_secret(&secret).await.unwrap().unwrap();
    assert_eq!(found, key);
    assert!(store.key_by_secret(&format!("{secret}x")).await.unwrap().is_none());
    assert_ne!(hash_secret(&secret), secret);

    let (_, other_secret) = store.create_key(&member).await.unwrap();
    assert_ne!(other_secret, secret);

    // Roles and their owners.
    assert!(matches!(
        store.create_key(&NewKey { project_id: None, ..member.clone() }).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.create_key(&NewKey { tenant_id: Some(tenant.id.clone()), ..admin.clone() }).await,
        Err(StoreError::Invalid(_))
    ));
    let (tenant_admin, _) = store
        .create_key(&NewKey { role: Role::TenantAdmin, tenant_id: Some(tenant.id.clone()), ..admin.clone() })
        .await
        .unwrap();
    assert_eq!(tenant_admin.project_id, None);

    // Expiry and revocation.
    let now = ferry_store::now_ms();
    let (expired, _) =
        store.create_key(&NewKey { expires_at: Some(now - 1), ..member.clone() }).await.unwrap();
    assert!(!expired.is_active(now));
    assert!(key.is_active(now));
    let revoked = store.revoke_key(&key.id).await.unwrap();
    assert!(!revoked.is_active(now));
    let again = store.revoke_key(&key.id).await.unwrap();
    assert_eq!(again.revoked_at, revoked.revoked_at, "revoking twice keeps the first time");

    let limits = Limits { rpm: Some(5), ..Default::default() };
    assert_eq!(store.set_key_limits(&key.id, &limits).await.unwrap().limits, limits);
    assert_eq!(store.keys(Some(&tenant.id)).await.unwrap().len(), 4);
    assert_eq!(store.keys(None).await.unwrap().len(), 5);

    // The last admin key that can be used is not revoked: nobody could manage the server.
    assert!(matches!(store.revoke_key(&imported.id).await, Err(StoreError::Conflict(_))));
    assert!(store.key(&imported.id).await.unwrap().is_active(now));
    let (second, _) = store.create_key(&NewKey { expires_at: Some(now - 1), ..admin.clone() }).await.unwrap();
    assert!(
        matches!(store.revoke_key(&imported.id).await, Err(StoreError::Conflict(_))),
        "an expired admin key manages nothing"
    );
    store.revoke_key(&second.id).await.unwrap();
    let (third, _) = store.create_key(&admin).await.unwrap();
    assert!(store.revoke_key(&imported.id).await.unwrap().revoked_at.is_some());
    assert!(matches!(store.revoke_key(&third.id).await, Err(StoreError::Conflict(_))));
    // Keys were made: authentication stays on whatever becomes of them.
    assert!(store.has_keys().await.unwrap());
}

fn start(id: &str, tenant: Option<&str>, model: &str, at: i64) -> UsageStart {
    UsageStart {
        request_id: id.into(),
        instance: "node-a".into(),
        tenant_id: tenant.map(Into::into),
        project_id: None,
        key_id: tenant.map(|t| format!("key-of-{t}").into()),
        route: "/v1/chat/completions".into(),
        model: model.into(),
        stream: false,
        started_at: at,
    }
}

fn finish(prompt: u64, completion: u64, cost: f64) -> UsageFinish {
    UsageFinish {
        provider: Some("local".into()),
        status: "ok".into(),
        http_status: 200,
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: 0,
        cost,
        latency_ms: 12,
        ttft_ms: Some(3),
        trace: None,
    }
}

async fn usage_suite(store: &Store) {
    let day = 86_400_000i64;
    let t0 = 20_000 * day + 1000; // 2024-10-04
    store.start_usage(&start("r1", Some("a"), "m1", t0)).await.unwrap();
    store.start_usage(&start("r2", Some("a"), "m2", t0 + 10)).await.unwrap();
    store.start_usage(&start("r3", Some("b"), "m1", t0 + day)).await.unwrap();
    store.start_usage(&start("r4", Some("a"), "m1", t0 + day)).await.unwrap();
    assert!(matches!(store.start_usage(&start("r1", None, "m1", t0)).await, Err(StoreError::Conflict(_))));

    assert!(store.finish_usage("r1", &finish(10, 5, 0.2)).await.unwrap());
    assert!(!store.finish_usage("r1", &finish(99, 99, 9.0)).await.unwrap(), "a record is finished once");
    assert!(store.finish_usage("r2", &finish(1, 1, 0.1)).await.unwrap());
    assert!(
        store.finish_usage("r3", &UsageFinish { status: "error".into(), ..finish(3, 0, 0.0) }).await.unwrap()
    );

    let r1 = store.usage_record("r1").await.unwrap();
    assert_eq!((r1.status.as_str(), r1.prompt_tokens, r1.completion_tokens), ("ok", 10, 5));
    assert_eq!(r1.ttft_ms, Some(3));

    // r4 was admitted by node-a, which then crashed: its next start reconciles it.
    assert_eq!(
        store.reconcile_earlier_runs("node-b", "node-b/1", 0).await.unwrap(),
        0,
        "another node's records wait"
    );
    assert_eq!(store.reconcile_earlier_runs("node-a", "node-a/1", 0).await.unwrap(), 1);
    assert_eq!(store.usage_record("r4").await.unwrap().status, "interrupted");

    let total = store.usage(&UsageQuery::default()).await.unwrap();
    assert_eq!(total.len(), 1);
    assert_eq!((total[0].requests, total[0].errors, total[0].prompt_tokens), (4, 2, 14));
    // 0.2 + 0.1 is 0.30000000000000004 in floating point; the report says 0.3.
    assert_eq!(total[0].cost, 0.3);

    let by = |group_by: Vec<GroupBy>| UsageQuery { group_by, ..Default::default() };
    let by_tenant_model = store.usage(&by(vec![GroupBy::Tenant, GroupBy::Model])).await.unwrap();
    let keys: Vec<_> =
        by_tenant_model.iter().map(|g| (g.tenant_id.as_deref(), g.model.as_deref(), g.requests)).collect();
    assert_eq!(
        keys,
        vec![(Some("a"), Some("m1"), 2), (Some("a"), Some("m2"), 1), (Some("b"), Some("m1"), 1)]
    );

    let by_day = store.usage(&by(vec![GroupBy::Day])).await.unwrap();
    let days: Vec<_> = by_day.iter().map(|g| (g.day.clone().unwrap(), g.requests)).collect();
    assert_eq!(days, vec![("2024-10-04".to_string(), 2), ("2024-10-05".to_string(), 2)]);

    let only_a = UsageQuery { tenant_id: Some("a".into()), from_ms: Some(t0 + 5), ..by(vec![GroupBy::Key]) };
    let rows = store.usage(&only_a).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].key_id.as_deref(), rows[0].requests), (Some("key-of-a"), 2));

    let (tokens, cost) = store.spent(Scope::Tenant("a"), t0).await.unwrap();
    assert_eq!(tokens, 17);
    assert!((cost - 0.3).abs() < 1e-9);
    assert_eq!(store.spent(Scope::Key("key-of-b"), t0 + 2 * day).await.unwrap().0, 0);
    assert_eq!(store.spent(Scope::Project("none"), 0).await.unwrap(), (0, 0.0));
}

async fn audit_suite(store: &Store) {
    let verified = store.verify_audit().await.unwrap();
    assert!(verified.ok && verified.rows == 0);
    let after = serde_json::json!({"name": "acme"});
    for i in 0..5 {
        store.audit("key_admin", "tenant.create", &format!("ten_{i}"), None, Some(&after)).await.unwrap();
    }
    // Concurrent appends keep one chain.
    let appends = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let before = serde_json::json!({"rpm": i});
            store.audit("key_admin", "key.limits", "key_1", Some(&before), None).await.unwrap()
        })
    });
    for append in appends {
        append.await.unwrap();
    }
    let verified = store.verify_audit().await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!((verified.rows, verified.head), (13, Some(13)));
    let newest = store.audit_entries(3, None).await.unwrap();
    assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![13, 12, 11]);
    assert_eq!(newest[0].prev_hash, newest[1].hash);
    assert_eq!(store.audit_entries(2, Some(3)).await.unwrap()[0].after, Some(after));

    // Tampering: an edited row, then a deleted one.
    let edit = |actor: &'static str| sqlx::query("UPDATE audit_log SET actor = $1 WHERE seq = 5").bind(actor);
    edit("someone_else").execute(store.pool()).await.unwrap();
    let verified = store.verify_audit().await.unwrap();
    assert!(!verified.ok);
    assert_eq!(verified.head, Some(5));
    assert!(verified.problem.unwrap().contains("row 5 was changed"));
    edit("key_admin").execute(store.pool()).await.unwrap();
    assert!(store.verify_audit().await.unwrap().ok);
    sqlx::query("DELETE FROM audit_log WHERE seq = 7").execute(store.pool()).await.unwrap();
    let verified = store.verify_audit().await.unwrap();
    assert!(!verified.ok);
    assert!(verified.problem.unwrap().contains("row 7 is missing"));
}

#[test]
fn days_format_as_utc_dates() {
    assert_eq!(format_day(0), "1970-01-01");
    assert_eq!(format_day(19_783), "2024-03-01");
    assert_eq!(format_day(19_782), "2024-02-29");
    let ms = 19_783 * 86_400_000 + 5_000;
    assert_eq!(day_and_month_start(ms), (19_783 * 86_400_000, 19_783 * 86_400_000));
    let ms = 19_782 * 86_400_000 + 5_000;
    assert_eq!(day_and_month_start(ms).1, 19_754 * 86_400_000);
}

#[tokio::test]
async fn the_usage_writer_commits_in_groups_and_keeps_order() {
    let store = Store::open(&sqlite_path()).await.unwrap();
    let writer = store.usage_writer();
    let starts = (0..40).map(|i| {
        let writer = writer.clone();
        tokio::spawn(async move {
            let id = format!("w{i}");
            writer.start(start(&id, Some("t"), "m", 1000 + i)).await.unwrap();
            writer.finish(id.into(), finish(i as u64, 1, 0.0));
        })
    });
    for s in starts {
        s.await.unwrap();
    }
    // An acknowledged start means everything queued before it is committed.
    writer.start(start("last", None, "m", 5000)).await.unwrap();
    let total = store.usage(&UsageQuery { tenant_id: Some("t".into()), ..Default::default() }).await.unwrap();
    assert_eq!((total[0].requests, total[0].errors), (40, 0));
    assert_eq!(total[0].prompt_tokens, (0..40).sum::<i64>());
    assert_eq!(store.usage_record("w7").await.unwrap().status, "ok");
    // A failing record fails alone: the duplicate is refused, its neighbours are written.
    let (a, b, c) = tokio::join!(
        writer.start(start("dup-a", None, "m", 1)),
        writer.start(start("w1", None, "m", 1)),
        writer.start(start("dup-c", None, "m", 1)),
    );
    assert!(a.is_ok() && b.is_err() && c.is_ok());
}

/// A whole record that cannot be written (its id is taken) fails alone in its group's
/// multi-row INSERT: the transaction is rolled back whole (nothing the statement wrote before
/// the failing row stays) and its neighbours are written once each.
#[tokio::test]
async fn a_whole_record_that_conflicts_fails_alone_in_its_group() {
    let store = Store::open(&sqlite_path()).await.unwrap();
    store.start_usage(&start("taken", None, "m", 1)).await.unwrap();
    let writer = store.open_usage_writer().await.unwrap();
    let ids = ["before-1", "before-2", "taken", "after-1"];
    for (i, id) in ids.iter().enumerate() {
        writer.start(start(id, Some("t"), "m", 10 + i as i64)).await.unwrap();
    }
    // Finished together: one group, one INSERT of four rows.
    for id in ids {
        writer.finish(id.into(), finish(2, 1, 0.0));
    }
    writer.flush().await;
    for id in ["before-1", "before-2", "after-1"] {
        assert_eq!(store.usage_record(id).await.unwrap().status, "ok", "{id}");
    }
    assert_eq!(store.usage_record("taken").await.unwrap().status, "started");
    let total = store.usage(&UsageQuery { tenant_id: Some("t".into()), ..Default::default() }).await.unwrap();
    assert_eq!((total[0].requests, total[0].prompt_tokens), (3, 6));
}

both!(replicas, replicas_suite);

/// Runs have names of their own: a namesake's records in flight are never closed by another
/// run's start, a crashed run's are closed once its lease ran out, by any replica.
async fn replicas_suite(store: &Store) {
    let now = ferry_store::now_ms();
    let (a, namesakes) = store.join("pod", now - 20_000).await.unwrap();
    assert!(a.starts_with("pod/") && namesakes.is_empty());
    // A second server under the same name (a misconfiguration) is told of the first, and
    // its start leaves the first's record in flight alone.
    let in_flight =
        |id: &str, run: &str| UsageStart { instance: run.into(), ..start(id, Some("t"), "m", now) };
    store.start_usage(&in_flight("live-1", &a)).await.unwrap();
    let (b, namesakes) = store.join("pod", now - 20_000).await.unwrap();
    assert_ne!(a, b);
    assert_eq!(namesakes.iter().map(|r| r.run.as_str()).collect::<Vec<_>>(), [a.as_str()]);
    assert_eq!(store.reconcile_earlier_runs("pod", &b, now - 20_000).await.unwrap(), 0);
    assert_eq!(store.reconcile_dead_replicas(30_000).await.unwrap(), 0);
    assert_eq!(store.usage_record("live-1").await.unwrap().status, "started");
    assert!(store.finish_usage("live-1", &finish(3, 4, 0.0)).await.unwrap());
    // A records written under the bare name (before runs were named) is an earlier run's.
    store.start_usage(&in_flight("legacy-1", "pod")).await.unwrap();
    assert_eq!(store.reconcile_earlier_runs("pod", &b, now - 20_000).await.unwrap(), 1);
    // b stops beating (it crashed): once its lease has run out, a survivor closes its records.
    store.start_usage(&in_flight("crashed-1", &b)).await.unwrap();
    assert_eq!(store.reconcile_dead_replicas(60_000).await.unwrap(), 0, "b's lease still runs");
    sqlx::query("UPDATE replicas SET heartbeat_at = $1 WHERE run = $2")
        .bind(now - 61_000)
        .bind(&b)
        .execute(store.pool())
        .await
        .unwrap();
    assert!(store.heartbeat(&a, "pod").await.unwrap());
    assert_eq!(store.reconcile_dead_replicas(60_000).await.unwrap(), 1);
    assert_eq!(store.usage_record("crashed-1").await.unwrap().status, "interrupted");
    // b was only silent (stopped, not dead): its request's completion, arriving late,
    // replaces the reconciliation with what it used; a finished record stays finished.
    assert!(store.finish_usage("crashed-1", &finish(2, 3, 0.0)).await.unwrap());
    let late = store.usage_record("crashed-1").await.unwrap();
    assert_eq!((late.status.as_str(), late.completion_tokens), ("ok", 3));
    assert!(!store.finish_usage("crashed-1", &finish(9, 9, 0.0)).await.unwrap(), "finished once");
    // Its row stays listed (silent) until a day has passed; a run that stopped cleanly leaves.
    let runs: Vec<(String, bool)> =
        store.replicas(60_000).await.unwrap().into_iter().map(|r| (r.run, r.alive)).collect();
    assert_eq!(runs, [(a.clone(), true), (b.clone(), false)]);
    store.leave(&a).await.unwrap();
    // A run taken for dead that comes back is written again, and told.
    assert!(!store.heartbeat(&a, "pod").await.unwrap());
    assert!(store.heartbeat(&a, "pod").await.unwrap());
}

both!(content, content_suite);

async fn content_suite(store: &Store) {
    use ferry_store::content::Content;
    let keep = store.create_tenant("keeps", &Limits::default()).await.unwrap();
    let keep = store
        .update_tenant(
            &keep.id,
            &TenantUpdate { retain_content: Some(true), retention_days: Some(Some(7)), ..Default::default() },
        )
        .await
        .unwrap();
    let other = store.create_tenant("forgets", &Limits::default()).await.unwrap();
    let now = ferry_store::now_ms();
    let day = 86_400_000;
    let item = |id: &str, tenant: &str, age_days: i64| Content {
        request_id: id.into(),
        tenant_id: tenant.into(),
        created_at: now - age_days * day,
        request: "{\"messages\": []}".into(),
        response: "{\"choices\": []}".into(),
    };
    store.keep_content(&item("fresh", &keep.id, 1)).await.unwrap();
    store.keep_content(&item("old", &keep.id, 8)).await.unwrap();
    store.keep_content(&item("opted-out", &other.id, 0)).await.unwrap();
    store.keep_content(&item("orphan", "ten_gone", 0)).await.unwrap();
    assert_eq!(store.purge_content().await.unwrap(), 3);
    assert_eq!(store.content("fresh").await.unwrap().tenant_id, keep.id);
    assert!(matches!(store.content("old").await, Err(StoreError::NotFound(_))));
    // Opting out purges the rest.
    store
        .update_tenant(&keep.id, &TenantUpdate { retain_content: Some(false), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(store.purge_content().await.unwrap(), 1);
}

both!(traces, traces_suite);

async fn traces_suite(store: &Store) {
    use ferry_store::traces::Trace;
    let now = ferry_store::now_ms();
    // The detail the server writes; the record's columns make the rest of the trace.
    let doc = serde_json::json!({"routing": {"target": "local"}, "sampling": {"temperature": 0.5}});
    // The server's way: the trace comes with the completion and lands in the record's row (on
    // SQLite inserted whole from the journal, on PostgreSQL updating the admission record).
    let writer = store.open_usage_writer().await.unwrap();
    for (id, age_ms) in [("new", 10), ("old", 100_000)] {
        writer.start(start(id, Some("ten_a"), "m", now - age_ms)).await.unwrap();
        writer.finish(id.into(), UsageFinish { trace: Some(doc.to_string()), ..finish(3, 1, 0.0) });
    }
    writer.start(start("untraced", Some("ten_a"), "m", now)).await.unwrap();
    writer.finish("untraced".into(), finish(1, 1, 0.0));
    writer.flush().await;
    let whole = serde_json::json!({
        "request_id": "new", "route": "/v1/chat/completions", "model": "m", "status": "ok", "http_status": 200,
        "tenant_id": "ten_a", "project_id": null, "key_id": "key-of-ten_a",
        "routing": {"provider": "local", "target": "local"}, "guardrails": {},
        "timings": {"total_ms": 12, "first_token_ms": 3}, "sampling": {"temperature": 0.5},
        "tokens": {"prompt": 3, "completion": 1, "cached": 0}, "cost": 0.0, "model_card": null,
    });
    let new = Trace {
        request_id: "new".into(),
        tenant_id: Some("ten_a".into()),
        created_at: now - 10,
        trace: whole,
    };
    let read = store.trace("new").await.unwrap();
    assert_eq!(read, new, "{}", read.trace);
    // In the order the server wrote it before traces were split.
    let keys: Vec<&String> = read.trace.as_object().unwrap().keys().collect();
    assert_eq!(keys, new.trace.as_object().unwrap().keys().collect::<Vec<_>>());
    // A trace written whole (before the split) is read as it was.
    let old_style = serde_json::json!({"request_id": "untraced", "tokens": {"prompt": 99}});
    store.put_trace("untraced", &old_style).await.unwrap();
    assert_eq!(store.trace("untraced").await.unwrap().trace, old_style);
    sqlx::query("UPDATE usage_records SET trace = NULL WHERE request_id = 'untraced'")
        .execute(store.pool())
        .await
        .unwrap();
    assert!(matches!(store.trace("untraced").await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.trace("nobody").await, Err(StoreError::NotFound(_))));
    // Retention clears old traces and keeps their records.
    assert_eq!(store.purge_traces(50_000).await.unwrap(), 1);
    assert!(matches!(store.trace("old").await, Err(StoreError::NotFound(_))));
    assert_eq!(store.usage_record("old").await.unwrap().prompt_tokens, 3);
    assert_eq!(store.purge_traces(50_000).await.unwrap(), 0);
    assert_eq!(store.trace("new").await.unwrap().trace["tokens"]["prompt"], 3);
    // A trace set afterwards needs its record.
    store.put_trace("untraced", &serde_json::json!({"n": 1})).await.unwrap();
    assert_eq!(store.trace("untraced").await.unwrap().trace["n"], 1);
    let orphan = store.put_trace("nobody", &serde_json::json!({})).await;
    assert!(matches!(orphan, Err(StoreError::NotFound(_))));
}

both_targets!(
    /// Migration 5 moves the traces of their own table into their records' rows, on both
    /// databases: the schema is taken back to before it, traces are written the old way, and
    /// the next open migrates them.
    migration_5_moves_traces_into_their_records,
    trace_migration_suite
);

async fn trace_migration_suite(target: &str) {
    let store = Store::open(target).await.unwrap();
    let undo = [
        "DROP INDEX usage_traced",
        "ALTER TABLE usage_records DROP COLUMN trace",
        "CREATE TABLE traces (request_id TEXT PRIMARY KEY, tenant_id TEXT, created_at BIGINT NOT NULL, trace TEXT NOT NULL)",
        "CREATE INDEX traces_created ON traces (created_at)",
        "DELETE FROM ferry_migrations WHERE version = 5",
    ];
    for statement in undo {
        sqlx::query(statement).execute(store.pool()).await.unwrap();
    }
    for (id, at) in [("m1", 1000), ("m2", 2000)] {
        store.start_usage(&start(id, Some("ten_a"), "m", at)).await.unwrap();
    }
    for (id, n) in [("m1", 1), ("m2", 2)] {
        sqlx::query(
            "INSERT INTO traces (request_id, tenant_id, created_at, trace) VALUES ($1, 'ten_a', 5, $2)",
        )
        .bind(id)
        .bind(format!("{{\"n\":{n}}}"))
        .execute(store.pool())
        .await
        .unwrap();
    }
    drop(store);
    let store = Store::open(target).await.unwrap();
    for (id, n, at) in [("m1", 1, 1000), ("m2", 2, 2000)] {
        let trace = store.trace(id).await.unwrap();
        assert_eq!(
            (trace.trace["n"].as_i64(), trace.created_at, trace.tenant_id.as_deref()),
            (Some(n), at, Some("ten_a"))
        );
    }
    let left: Result<i64, _> =
        sqlx::query_scalar("SELECT COUNT(*) FROM traces").fetch_one(store.pool()).await;
    assert!(left.is_err(), "the old table is gone");
}

both!(reports, reports_suite);

async fn reports_suite(store: &Store) {
    use ferry_store::reports::{SeriesQuery, TraceQuery, percentile};
    let minute = 60_000i64;
    let t0 = 28_000_000 * minute; // a minute boundary
    // Minute 0: three requests (latencies 10, 20, 300; one error); minute 2: one; minute 1: none.
    let runs = [("s1", "a", 0, 10, "ok"), ("s2", "a", 5, 20, "ok"), ("s3", "b", 59_999, 300, "error")];
    for (id, tenant, offset, latency, status) in runs {
        store.start_usage(&start(id, Some(tenant), "m", t0 + offset)).await.unwrap();
        let done = UsageFinish { status: status.into(), latency_ms: latency, ..finish(2, 3, 0.5) };
        store.finish_usage(id, &done).await.unwrap();
    }
    store.start_usage(&start("s4", Some("a"), "m", t0 + 2 * minute + 1)).await.unwrap();
    // Outside the range: before it and at its exclusive end.
    store.start_usage(&start("s5", Some("a"), "m", t0 - 1)).await.unwrap();
    store.start_usage(&start("s6", Some("a"), "m", t0 + 3 * minute)).await.unwrap();

    let query = SeriesQuery { tenant_id: None, from_ms: t0, to_ms: t0 + 3 * minute, bucket_ms: minute };
    let report = store.usage_series(&query).await.unwrap();
    let series = &report.buckets;
    let starts: Vec<i64> = series.iter().map(|p| p.start).collect();
    assert_eq!(starts, vec![t0, t0 + minute, t0 + 2 * minute], "every bucket, empty ones too");
    let first = &series[0];
    assert_eq!((first.requests, first.errors, first.prompt_tokens, first.completion_tokens), (3, 1, 6, 9));
    assert!((first.cost - 1.5).abs() < 1e-9);
    assert_eq!(
        (first.latency_p50_ms, first.latency_p95_ms, first.latency_p99_ms),
        (Some(20), Some(300), Some(300))
    );
    assert_eq!(first.ttft_p50_ms, Some(3));
    assert_eq!((series[1].requests, series[1].latency_p50_ms), (0, None));
    // Admitted, not finished: counted, no latency yet.
    assert_eq!((series[2].requests, series[2].latency_p50_ms), (1, None));
    let total = &report.total;
    assert_eq!((total.start, total.requests, total.errors, total.prompt_tokens), (t0, 4, 1, 6));
    assert_eq!((total.latency_p50_ms, total.latency_p99_ms), (Some(20), Some(300)));

    let only_b = SeriesQuery { tenant_id: Some("b".into()), ..query.clone() };
    let series = store.usage_series(&only_b).await.unwrap().buckets;
    assert_eq!(series.iter().map(|p| p.requests).collect::<Vec<_>>(), vec![1, 0, 0]);
    // Buckets align to the bucket width: an hour's bucket starts on the hour.
    let hour = 60 * minute;
    let hourly = SeriesQuery { from_ms: t0 + 5, to_ms: t0 + 10, bucket_ms: hour, ..query.clone() };
    assert_eq!(store.usage_series(&hourly).await.unwrap().buckets[0].start, (t0 / hour) * hour);
    let too_many = SeriesQuery { from_ms: 0, to_ms: t0, ..query.clone() };
    assert!(matches!(store.usage_series(&too_many).await, Err(StoreError::Invalid(_))));
    let backwards = SeriesQuery { from_ms: t0, to_ms: t0, ..query };
    assert!(matches!(store.usage_series(&backwards).await, Err(StoreError::Invalid(_))));

    assert_eq!(percentile(&[], 50.0), None);
    assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
    assert_eq!(percentile(&[1, 2, 3, 4], 95.0), Some(4));
    assert_eq!(percentile(&[7], 1.0), Some(7));

    let doc = serde_json::json!({"routing": {"target": "local"}});
    let traced = [
        ("req_aa1", Some("ten_a"), t0),
        ("req_aa2", Some("ten_a"), t0 + 10),
        ("req_b_1", Some("ten_b"), t0 + 20),
    ]
    .into_iter()
    .chain([("req_xx", None, t0 + 30), ("req_bb1", Some("ten_b"), t0 + 5)]);
    for (id, tenant, at) in traced {
        store.start_usage(&start(id, tenant, "m", at)).await.unwrap();
        store
            .finish_usage(id, &UsageFinish { trace: Some(doc.to_string()), ..finish(4, 2, 0.0) })
            .await
            .unwrap();
    }
    let ids = |rows: Vec<ferry_store::reports::TraceSummary>| -> Vec<String> {
        rows.into_iter().map(|r| r.request_id).collect()
    };
    let all = TraceQuery { limit: 100, ..Default::default() };
    assert_eq!(
        ids(store.traces(&all).await.unwrap()),
        vec!["req_xx", "req_b_1", "req_aa2", "req_bb1", "req_aa1"]
    );
    let newest = store.traces(&TraceQuery { limit: 1, ..all.clone() }).await.unwrap();
    assert_eq!(newest[0].model.as_deref(), Some("m"));
    assert_eq!(
        (newest[0].http_status, newest[0].prompt_tokens, newest[0].total_ms),
        (Some(200), Some(4), Some(12))
    );
    let tenant_a = TraceQuery { tenant_id: Some("ten_a".into()), ..all.clone() };
    assert_eq!(ids(store.traces(&tenant_a).await.unwrap()), vec!["req_aa2", "req_aa1"]);
    let window = TraceQuery { from_ms: Some(t0 + 10), to_ms: Some(t0 + 30), ..all.clone() };
    assert_eq!(ids(store.traces(&window).await.unwrap()), vec!["req_b_1", "req_aa2"]);
    // A prefix is matched literally: `_` is not a wildcard.
    let prefix = TraceQuery { id_prefix: Some("req_b_".into()), ..all.clone() };
    assert_eq!(ids(store.traces(&prefix).await.unwrap()), vec!["req_b_1"]);
    let prefix = TraceQuery { id_prefix: Some("req_aa".into()), ..all };
    assert_eq!(store.traces(&prefix).await.unwrap().len(), 2);
}

both_targets!(
    /// Migration 6 shortens what an imported key kept in clear, on both databases, and leaves
    /// generated keys as they were.
    migration_6_shortens_imported_keys_display,
    display_migration_suite
);

async fn display_migration_suite(target: &str) {
    let store = Store::open(target).await.unwrap();
    let admin = NewKey {
        name: "root".into(),
        role: Role::Admin,
        tenant_id: None,
        project_id: None,
        models: None,
        limits: Default::default(),
        expires_at: None,
    };
    let (imported, _) = store.import_key(&admin, "Tr0ub4dor-horse9-battery").await.unwrap();
    let (generated, _) = store.create_key(&NewKey { name: "gen".into(), ..admin.clone() }).await.unwrap();
    // As imports were stored before: fifteen characters.
    sqlx::query("UPDATE api_keys SET display_prefix = 'Tr0ub4dor-horse' WHERE id = $1")
        .bind(&imported.id)
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("DELETE FROM ferry_migrations WHERE version = 6").execute(store.pool()).await.unwrap();
    drop(store);
    let keys = Store::open(target).await.unwrap().keys(None).await.unwrap();
    let shown = |id: &str| keys.iter().find(|k| k.id == id).map(|k| k.display_prefix.as_str());
    assert_eq!(shown(&imported.id), Some("Tr0u"));
    assert_eq!(shown(&generated.id), Some(generated.display_prefix.as_str()));
}
