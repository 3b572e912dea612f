//! `ferry tenants|projects|keys|usage|audit`: the admin API from the terminal. Each
//! command is one call to a running server (`--url`, with `--key` or `FERRY_ADMIN_KEY`),
//! except `audit verify`, which reads the database itself so that it can check a server's
//! log without trusting the server.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct Remote {
    /// The server's address
    #[arg(long, env = "FERRY_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// An admin or tenant-admin key
    #[arg(long, env = "FERRY_ADMIN_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Print the server's JSON instead of a table (create and revoke always print JSON)
    #[arg(long, global = true)]
    json: bool,
}

/// Limits as flags, for create and update commands.
#[derive(Args, Debug, Default)]
pub struct LimitFlags {
    /// Requests per minute
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute
    #[arg(long)]
    tpm: Option<u64>,
    /// Tokens per UTC day
    #[arg(long)]
    tokens_per_day: Option<u64>,
    /// Tokens per UTC month
    #[arg(long)]
    tokens_per_month: Option<u64>,
    /// Cost per UTC day
    #[arg(long)]
    cost_per_day: Option<f64>,
    /// Cost per UTC month
    #[arg(long)]
    cost_per_month: Option<f64>,
}

impl LimitFlags {
    fn to_json(&self) -> Value {
        let mut limits = serde_json::Map::new();
        let mut put = |name: &str, v: Option<Value>| {
            if let Some(v) = v {
                limits.insert(name.into(), v);
            }
        };
        put("rpm", self.rpm.map(Value::from));
        put("tpm", self.tpm.map(Value::from));
        put("tokens_per_day", self.tokens_per_day.map(Value::from));
        put("tokens_per_month", self.tokens_per_month.map(Value::from));
        put("cost_per_day", self.cost_per_day.map(Value::from));
        put("cost_per_month", self.cost_per_month.map(Value::from));
        Value::Object(limits)
    }
}

#[derive(Subcommand, Debug)]
pub enum TenantCommand {
    /// List tenants
    List,
    /// Create a tenant
    Create {
        name: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Set a tenant's limits (replacing them)
    Limits {
        id: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Set a tenant's privacy: its guardrail policy, and whether (and how long) prompts and
    /// answers are kept; flags not given stay as they are
    Privacy {
        id: String,
        #[command(flatten)]
        policy: PolicyFlags,
        /// Keep prompts and answers (true) or not (false)
        #[arg(long)]
        retain_content: Option<bool>,
        /// Days kept content lives before the purge deletes it
        #[arg(long)]
        retention_days: Option<i64>,
    },
}

/// A guardrail policy to set or clear.
#[derive(Args, Debug, Default)]
pub struct PolicyFlags {
    /// A `[[guardrails]]` policy of the server's config
    #[arg(long, conflicts_with = "no_guardrail_policy")]
    guardrail_policy: Option<String>,
    /// Clear the policy (a project then follows its tenant's)
    #[arg(long)]
    no_guardrail_policy: bool,
}

impl PolicyFlags {
    fn put(&self, body: &mut serde_json::Map<String, Value>) {
        if self.no_guardrail_policy {
            body.insert("guardrail_policy".into(), Value::Null);
        } else if let Some(name) = &self.guardrail_policy {
            body.insert("guardrail_policy".into(), Value::from(name.as_str()));
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ProjectCommand {
    /// List projects
    List {
        /// Only this tenant's (by id)
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Create a project in a tenant
    Create {
        /// The tenant's id
        #[arg(long)]
        tenant: String,
        name: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Set or clear a project's guardrail policy (it overrides its tenant's)
    Policy {
        id: String,
        #[command(flatten)]
        policy: PolicyFlags,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List keys (never their secrets)
    List {
        /// Only this tenant's (by id)
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Create a key; its secret is printed once
    Create {
        /// admin, tenant_admin or member
        #[arg(long, default_value = "member")]
        role: String,
        /// The project a member key belongs to (by id)
        #[arg(long)]
        project: Option<String>,
        /// The tenant a tenant_admin key administers (by id)
        #[arg(long)]
        tenant: Option<String>,
        /// A name to recognise the key by
        #[arg(long, default_value = "key")]
        name: String,
        /// Models this key may use (comma-separated); all when absent
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Days until the key expires
        #[arg(long)]
        expires_in_days: Option<u64>,
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Revoke a key
    Revoke { id: String },
    /// Set a key's limits (replacing them)
    Limits {
        id: String,
        #[command(flatten)]
        limits: LimitFlags,
    },
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Comma-separated: tenant, project, key, model, day
    #[arg(long, default_value = "tenant,model,day")]
    group_by: String,
    /// Only this tenant (admins)
    #[arg(long)]
    tenant: Option<String>,
    /// Start, as YYYY-MM-DD (UTC)
    #[arg(long)]
    from: Option<String>,
    /// End (exclusive), as YYYY-MM-DD (UTC)
    #[arg(long)]
    to: Option<String>,
    /// Print CSV
    #[arg(long)]
    csv: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// The newest entries
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Check the hash chain of the whole log, reading the database directly (not through the
    /// server, which could not then vouch for itself: --url and --key are not used)
    Verify {
        /// The data directory of the server (FERRY_DATA_DIR)
        #[arg(long, env = "FERRY_DATA_DIR")]
        data_dir: Option<std::path::PathBuf>,
        /// Or its PostgreSQL URL (FERRY_DATABASE_URL)
        #[arg(long, env = "FERRY_DATABASE_URL")]
        database_url: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServerModelCommand {
    /// The running server's local models and their state (loaded, loading, on disk)
    Ps,
    /// Load a configured model now (unloading least-recently-used ones if the limits ask)
    Load { name: String },
    /// Unload a model (its requests in flight finish first)
    Unload { name: String },
}

struct Client {
    http: reqwest::Client,
    remote: Remote,
}

impl Client {
    fn new(remote: Remote) -> anyhow::Result<Client> {
        Ok(Client { http: reqwest::Client::builder().build()?, remote })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.remote.url.trim_end_matches('/'));
        let mut request = self.http.request(method, &url);
        if let Some(key) = &self.remote.key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or(text);
            bail!("{status}: {message}");
        }
        Ok(text)
    }

    async fn json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.call(method, path, body).await?)?)
    }

    /// Prints a list answer as a table of `columns`, or the JSON.
    fn print_list(&self, value: &Value, columns: &[&str]) {
        if self.remote.json {
            outln!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
            return;
        }
        let rows: Vec<Vec<String>> = value["data"]
            .as_array()
            .map(|items| {
                items.iter().map(|item| columns.iter().map(|c| column_cell(c, &item[*c])).collect()).collect()
            })
            .unwrap_or_default();
        print_table(columns, &rows);
    }

    fn print_one(&self, value: &Value) {
        outln!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    }
}

/// A table cell: times (`at`, `…_at`, milliseconds) as UTC dates, lists joined by commas.
fn column_cell(column: &str, v: &Value) -> String {
    match v {
        Value::Number(n) if column == "at" || column.ends_with("_at") => {
            n.as_i64().map_or_else(|| cell(v), utc_time)
        }
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        _ => cell(v),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc_time(ms: i64) -> String {
    let seconds = ms.rem_euclid(86_400_000) / 1000;
    let day = ferry_store::usage::format_day(ms.div_euclid(86_400_000));
    format!("{day} {:02}:{:02}:{:02}", seconds / 3600, seconds % 3600 / 60, seconds % 60)
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Object(o) if o.is_empty() => "-".into(),
        other => other.to_string(),
    }
}

fn print_table(columns: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([columns[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", padded.join("  ").trim_end());
    };
    line(columns.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `YYYY-MM-DD` as milliseconds since the epoch (UTC midnight).
fn date_ms(date: &str) -> anyhow::Result<i64> {
    let parts: Vec<i64> =
        date.split('-').map(|p| p.parse()).collect::<Result<_, _>>().context("a date is YYYY-MM-DD")?;
    let [y, m, d] = parts[..] else { bail!("a date is YYYY-MM-DD, not '{date}'") };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => bail!("'{date}' is not a date: there is no month {m}"),
    };
    if !(1..=days_in_month).contains(&d) {
        bail!("'{date}' is not a date: month {m} has {days_in_month} days");
    }
    // Days from civil (Howard Hinnant), the inverse of the store's day formatting.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146_097 + doe - 719_468) * 86_400_000)
}

/// `ferry models ps|load|unload`: the local models of a running server.
pub async fn models(remote: Remote, command: ServerModelCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    let card = match &command {
        ServerModelCommand::Ps => {
            let mut list = client.json(reqwest::Method::GET, "/v1/models", None).await?;
            if let Some(items) = list["data"].as_array_mut() {
                items.retain(|m| m["owned_by"] == "ferry");
                for m in items.iter_mut() {
                    m["memory_mib"] = m["memory_bytes"].as_u64().map_or(Value::Null, |b| json!(b >> 20));
                }
            }
            client.print_list(&list, &["id", "state", "architecture", "quantization", "memory_mib", "file"]);
            return Ok(());
        }
        ServerModelCommand::Load { name } => {
            client.json(reqwest::Method::POST, &format!("/admin/v1/models/{name}/load"), None).await?
        }
        ServerModelCommand::Unload { name } => {
            client.json(reqwest::Method::POST, &format!("/admin/v1/models/{name}/unload"), None).await?
        }
    };
    if client.remote.json {
        client.print_one(&card);
    } else {
        outln!("{} is {}", cell(&card["id"]), cell(&card["state"]).replace('_', " "));
    }
    Ok(())
}

pub async fn tenants(remote: Remote, command: TenantCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match command {
        TenantCommand::List => {
            let v = client.json(reqwest::Method::GET, "/admin/v1/tenants", None).await?;
            client.print_list(&v, &["id", "name", "limits", "guardrail_policy"]);
        }
        TenantCommand::Create { name, limits } => {
            let body = json!({"name": name, "limits": limits.to_json()});
            client.print_one(&client.json(reqwest::Method::POST, "/admin/v1/tenants", Some(body)).await?);
        }
        TenantCommand::Limits { id, limits } => {
            let body = json!({"limits": limits.to_json()});
            let path = format!("/admin/v1/tenants/{id}");
            client.print_one(&client.json(reqwest::Method::PATCH, &path, Some(body)).await?);
        }
        TenantCommand::Privacy { id, policy, retain_content, retention_days } => {
            let mut body = serde_json::Map::new();
            policy.put(&mut body);
            if let Some(retain) = retain_content {
                body.insert("retain_content".into(), Value::from(retain));
            }
            if let Some(days) = retention_days {
                body.insert("retention_days".into(), Value::from(days));
            }
            if body.is_empty() {
                bail!(
                    "nothing to change: give --guardrail-policy, --no-guardrail-policy, --retain-content or --retention-days"
                );
            }
            let path = format!("/admin/v1/tenants/{id}");
            client.print_one(&client.json(reqwest::Method::PATCH, &path, Some(Value::Object(body))).await?);
        }
    }
    Ok(())
}

/// A listing's path, narrowed to one tenant when one is named.
fn of_tenant(path: &str, tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("{path}?tenant_id={t}"),
        None => path.to_string(),
    }
}

pub async fn projects(remote: Remote, command: ProjectCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match command {
        ProjectCommand::List { tenant } => {
            let path = of_tenant("/admin/v1/projects", tenant.as_deref());
            let v = client.json(reqwest::Method::GET, &path, None).await?;
            client.print_list(&v, &["id", "tenant_id", "name", "limits"]);
        }
        ProjectCommand::Create { tenant, name, limits } => {
            let body = json!({"tenant_id": tenant, "name": name, "limits": limits.to_json()});
            client.print_one(&client.json(reqwest::Method::POST, "/admin/v1/projects", Some(body)).await?);
        }
        ProjectCommand::Policy { id, policy } => {
            let mut body = serde_json::Map::new();
            policy.put(&mut body);
            if body.is_empty() {
                bail!("nothing to change: give --guardrail-policy NAME or --no-guardrail-policy");
            }
            let path = format!("/admin/v1/projects/{id}");
            client.print_one(&client.json(reqwest::Method::PATCH, &path, Some(Value::Object(body))).await?);
        }
    }
    Ok(())
}

pub async fn keys(remote: Remote, command: KeyCommand) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    match command {
        KeyCommand::List { tenant } => {
            let path = of_tenant("/admin/v1/keys", tenant.as_deref());
            let v = client.json(reqwest::Method::GET, &path, None).await?;
            client.print_list(
                &v,
                &[
                    "id",
                    "name",
                    "display_prefix",
                    "role",
                    "tenant_id",
                    "project_id",
                    "models",
                    "expires_at",
                    "revoked_at",
                ],
            );
        }
        KeyCommand::Create { role, project, tenant, name, models, expires_in_days, limits } => {
            let expires_at = expires_in_days.map(|d| ferry_store::now_ms() + d as i64 * 86_400_000);
            let body = json!({
                "role": role, "project_id": project, "tenant_id": tenant, "name": name,
                "models": (!models.is_empty()).then_some(models), "expires_at": expires_at,
                "limits": limits.to_json(),
            });
            let created = client.json(reqwest::Method::POST, "/admin/v1/keys", Some(body)).await?;
            if client.remote.json {
                client.print_one(&created);
            } else {
                outln!("{}", created["key"].as_str().unwrap_or_default());
                eprintln!(
                    "key {} ({}) created; the secret above is shown only this once",
                    cell(&created["id"]),
                    cell(&created["role"])
                );
            }
        }
        KeyCommand::Revoke { id } => {
            let path = format!("/admin/v1/keys/{id}/revoke");
            client.print_one(&client.json(reqwest::Method::POST, &path, None).await?);
        }
        KeyCommand::Limits { id, limits } => {
            let path = format!("/admin/v1/keys/{id}");
            let body = json!({"limits": limits.to_json()});
            client.print_one(&client.json(reqwest::Method::PATCH, &path, Some(body)).await?);
        }
    }
    Ok(())
}

pub async fn usage(remote: Remote, args: UsageArgs) -> anyhow::Result<()> {
    let client = Client::new(remote)?;
    let mut query = vec![format!("group_by={}", args.group_by)];
    if let Some(t) = &args.tenant {
        query.push(format!("tenant_id={t}"));
    }
    if let Some(from) = &args.from {
        query.push(format!("from={}", date_ms(from)?));
    }
    if let Some(to) = &args.to {
        query.push(format!("to={}", date_ms(to)?));
    }
    if args.csv {
        query.push("format=csv".into());
        out!(
            "{}",
            client.call(reqwest::Method::GET, &format!("/admin/v1/usage?{}", query.join("&")), None).await?
        );
        return Ok(());
    }
    let v = client.json(reqwest::Method::GET, &format!("/admin/v1/usage?{}", query.join("&")), None).await?;
    let mut columns: Vec<&str> = args
        .group_by
        .split(',')
        .map(|g| match g.trim() {
            "tenant" => "tenant_id",
            "project" => "project_id",
            "key" => "key_id",
            other => other,
        })
        .filter(|c| !c.is_empty())
        .collect();
    columns.extend(["requests", "errors", "prompt_tokens", "completion_tokens", "cost"]);
    client.print_list(&v, &columns);
    Ok(())
}

pub async fn audit(remote: Remote, command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::List { limit } => {
            let client = Client::new(remote)?;
            let v =
                client.json(reqwest::Method::GET, &format!("/admin/v1/audit?limit={limit}"), None).await?;
            client.print_list(&v, &["seq", "at", "actor", "action", "target"]);
            Ok(())
        }
        AuditCommand::Verify { data_dir, database_url } => {
            let target = match database_url {
                Some(url) => url,
                None => data_dir
                    .unwrap_or_else(crate::config::default_data_dir)
                    .join("ferry.db")
                    .display()
                    .to_string(),
            };
            if !target.contains("://") && !std::path::Path::new(&target).exists() {
                bail!("no Ferry database at {target}");
            }
            let store = ferry_store::Store::open(&target).await?;
            let verdict = store.verify_audit().await?;
            // Which database was read: a default data directory may not be the server's.
            let checked = if target.contains("://") { "the PostgreSQL database".to_string() } else { target };
            if verdict.ok {
                outln!(
                    "audit log intact: {} rows, head {} (in {checked})",
                    verdict.rows,
                    verdict.head.unwrap_or(0)
                );
                Ok(())
            } else {
                bail!(
                    "audit log TAMPERED: {} ({} rows verified before it, in {checked})",
                    verdict.problem.unwrap_or_default(),
                    verdict.rows
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_dates_and_round_trip_with_date_ms() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(1_796_087_055_000), "2026-12-01 01:04:15");
        assert_eq!(utc_time(date_ms("2024-02-29").unwrap()), "2024-02-29 00:00:00");
        for not_a_date in ["2026-13-01", "2026-00-10", "2026-04-31", "2025-02-29", "2026-01-00", "2026-01"] {
            assert!(date_ms(not_a_date).is_err(), "{not_a_date}");
        }
        assert_eq!(column_cell("expires_at", &json!(951_782_400_000_i64)), "2000-02-29 00:00:00");
        assert_eq!(column_cell("models", &json!(["a", "b"])), "a,b");
        assert_eq!(column_cell("requests", &json!(12)), "12");
    }
}
