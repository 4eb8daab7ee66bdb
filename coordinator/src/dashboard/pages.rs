//! Server-rendered HTML of the dashboard. Every piece of text that comes from users,
//! workers or models (job names, tenants, labels, log lines, samples, errors) goes
//! through [`esc`]; nothing here emits inline script or style (the pages are served
//! with a Content-Security-Policy that forbids both).

use crate::persistence::{CheckpointRow, JobRow, LogRow};
use lorafleet_proto as pb;
use std::collections::HashMap;
use std::fmt::Write;

/// HTML-escape text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab/newline have no business in a page.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode one URL path segment (or a query value).
pub fn url_seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A path of `/`-separated segments, each percent-encoded.
pub fn url_path(s: &str) -> String {
    s.split('/').map(url_seg).collect::<Vec<_>>().join("/")
}

/// `2026-12-01 14:00:17 UTC` for unix milliseconds (proleptic Gregorian, UTC).
pub fn utc(ms: i64) -> String {
    lorafleet_shared::time::utc_datetime(ms).map_or_else(|| "-".into(), |t| format!("{t} UTC"))
}

/// `<time>` with a machine-readable datetime.
fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = utc(ms);
    let iso = t.trim_end_matches(" UTC").replacen(' ', "T", 1) + "Z";
    format!("<time datetime=\"{iso}\">{t}</time>")
}

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".into(),
    }
}

/// Who is looking, for the header.
pub struct Viewer<'a> {
    /// Token id and role, or None without `--auth`.
    pub who: Option<(&'a str, &'a str)>,
    pub tenant: Option<&'a str>,
}

/// The page around `body`.
pub fn layout(title: &str, viewer: &Viewer<'_>, current: &str, body: &str) -> String {
    let nav_link = |href: &str, label: &str| {
        let cur = if href == current { " aria-current=\"page\"" } else { "" };
        format!("<a href=\"{href}\"{cur}>{label}</a>")
    };
    let who = match viewer.who {
        Some((id, role)) => {
            let tenant = viewer.tenant.map(|t| format!(", tenant {}", esc(t))).unwrap_or_default();
            format!(
                "<span class=\"who\">Signed in as {} ({}{tenant})</span>\
                 <form method=\"post\" action=\"/logout\" class=\"inline\"><button type=\"submit\">Sign out</button></form>",
                esc(id),
                esc(role)
            )
        }
        None => String::new(),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · lorafleet</title>\n<link rel=\"stylesheet\" href=\"/assets/dashboard.css\">\n\
         <script src=\"/assets/dashboard.js\" defer></script>\n</head>\n<body>\n\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\n\
         <header><span class=\"brand\">lorafleet</span><nav aria-label=\"Main\">{}{}</nav>{who}</header>\n\
         <main id=\"main\">\n{body}\n</main>\n</body>\n</html>\n",
        nav_link("/", "Jobs"),
        nav_link("/workers", "Workers"),
        title = esc(title),
    )
}

/// The sign-in form (also the body of every 401).
pub fn login(message: Option<&str>, next: &str, auth_on: bool) -> String {
    let mut b = String::from("<h1>Sign in</h1>\n");
    if !auth_on {
        b.push_str("<p>This coordinator does not authenticate callers (no <code>--auth</code>): <a href=\"/\">open the dashboard</a>.</p>");
        return b;
    }
    if let Some(m) = message {
        let _ = writeln!(b, "<p class=\"error\" role=\"alert\">{}</p>", esc(m));
    }
    let _ = write!(
        b,
        "<p>Use the same bearer token as the <code>lorafleet</code> CLI (<code>LORAFLEET_TOKEN</code>): a user token \
         shows its tenant's jobs, an admin token every job.</p>\n\
         <form method=\"post\" action=\"/login\" class=\"login\">\n\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\n\
         <label for=\"token\">Bearer token</label>\n\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required spellcheck=\"false\">\n\
         <button type=\"submit\">Sign in</button>\n</form>\n",
        esc(next)
    );
    b
}

pub fn message(title: &str, text: &str) -> String {
    format!("<h1>{}</h1>\n<p>{}</p>\n<p><a href=\"/\">Back to the jobs</a></p>\n", esc(title), esc(text))
}

fn state_badge(state: &str) -> String {
    format!("<span class=\"state state-{0}\">{0}</span>", esc(state))
}

fn progress(step: u64, total: u64) -> String {
    if total == 0 {
        return format!("{step}");
    }
    let pct = (step as f64 / total as f64 * 100.0).clamp(0.0, 100.0);
    format!("<progress max=\"{total}\" value=\"{}\" aria-label=\"{pct:.0}% of the steps\"></progress> {step}/{total}", step.min(total))
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn worker_cell(id: Option<String>, names: &HashMap<String, String>) -> String {
    match id {
        Some(w) => {
            let name = names.get(&w).map(|n| esc(n)).unwrap_or_else(|| esc(short(&w)));
            format!("<span title=\"{}\">{name}</span>", esc(&w))
        }
        None => "-".into(),
    }
}

/// The jobs page.
pub fn jobs(rows: &[JobRow], names: &HashMap<String, String>, state_filter: &str, next_before: Option<i64>) -> String {
    let mut b = String::from("<h1>Jobs</h1>\n");
    b.push_str("<form method=\"get\" action=\"/\" class=\"filter\">\n<label for=\"state\">State</label>\n<select id=\"state\" name=\"state\">\n");
    for s in ["", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"] {
        let sel = if s == state_filter { " selected" } else { "" };
        let label = if s.is_empty() { "any" } else { s };
        let _ = writeln!(b, "<option value=\"{s}\"{sel}>{label}</option>");
    }
    b.push_str("</select>\n<button type=\"submit\">Filter</button>\n</form>\n");
    b.push_str(
        "<table id=\"jobs\" data-refresh=\"5000\">\n<caption>Jobs, newest first (refreshed every 5 s)</caption>\n<thead><tr>\
         <th scope=\"col\">Job</th><th scope=\"col\">State</th><th scope=\"col\">Progress</th><th scope=\"col\">Loss</th>\
         <th scope=\"col\">Tenant</th><th scope=\"col\">Created</th><th scope=\"col\">Worker</th></tr></thead>\n<tbody>\n",
    );
    if rows.is_empty() {
        b.push_str("<tr><td colspan=\"7\">No jobs.</td></tr>\n");
    }
    for j in rows {
        let id = j.id.to_string();
        let _ = writeln!(
            b,
            "<tr data-job=\"{id}\"><td><a href=\"/jobs/{id}\">{}</a> <span class=\"id\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&j.spec.name),
            short(&id),
            state_badge(j.state.as_str()),
            progress(j.step, j.total_steps),
            num(j.loss, 4),
            j.tenant.as_deref().map(esc).unwrap_or_else(|| "-".into()),
            time(j.created_ms),
            worker_cell(j.worker_id.map(|w| w.to_string()), names),
        );
    }
    b.push_str("</tbody>\n</table>\n");
    if let Some(before) = next_before {
        let st = if state_filter.is_empty() { String::new() } else { format!("&amp;state={}", url_seg(state_filter)) };
        let _ = writeln!(b, "<p><a href=\"/?before={before}{st}\">Older jobs</a></p>");
    }
    b
}

/// Everything the job page shows.
pub struct JobView<'a> {
    pub job: &'a JobRow,
    pub worker_names: &'a HashMap<String, String>,
    pub checkpoints: &'a [CheckpointRow],
    pub logs: &'a [LogRow],
    pub logs_truncated: bool,
    pub evals: &'a [pb::EvalMetrics],
}

fn fmt_opt_pct(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite()).map(|x| format!("{:.1}%", x * 100.0)).unwrap_or_else(|| "-".into())
}

pub fn eval_rows(evals: &[pb::EvalMetrics]) -> String {
    let mut b = String::new();
    for e in evals {
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.step,
            num(Some(e.eval_loss), 4),
            num(Some(e.perplexity), 3),
            fmt_opt_pct(e.exact_match),
            fmt_opt_pct(e.rouge_l)
        );
    }
    if evals.is_empty() {
        b.push_str("<tr><td colspan=\"5\">No evaluation yet.</td></tr>\n");
    }
    b
}

pub fn checkpoint_rows(job: &str, cps: &[CheckpointRow]) -> String {
    let mut b = String::new();
    for c in cps.iter().rev() {
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/jobs/{job}/checkpoints/{}/{}\">files</a></td></tr>",
            c.step,
            c.attempt,
            c.epoch.get(),
            time(c.created_ms),
            c.epoch.get(),
            c.step
        );
    }
    if cps.is_empty() {
        b.push_str("<tr><td colspan=\"5\">No checkpoint yet.</td></tr>\n");
    }
    b
}

fn samples(evals: &[pb::EvalMetrics]) -> String {
    let Some(e) = evals.iter().rev().find(|e| !e.samples.is_empty()) else {
        return "<p id=\"samples-none\">No sample generations yet (they come with evaluations when the spec has <code>sample_prompts</code>).</p>".into();
    };
    let mut b = format!("<p>At step {}:</p>\n<dl class=\"samples\">\n", e.step);
    for s in &e.samples {
        let _ = writeln!(b, "<dt>{}</dt><dd>{}</dd>", esc(&s.prompt), esc(&s.completion));
    }
    b.push_str("</dl>\n");
    b
}

pub fn job(v: &JobView<'_>) -> String {
    let j = v.job;
    let id = j.id.to_string();
    let mut b = String::new();
    let _ = writeln!(b, "<h1>Job {}</h1>", esc(&j.spec.name));
    let last_log = v.logs.last().map(|l| l.seq).unwrap_or(0);
    let _ = writeln!(b, "<div id=\"job\" data-job=\"{id}\" data-after-log=\"{last_log}\">");
    let error = j.error.as_deref().map(|e| format!("<dt>Error</dt><dd id=\"st-error\" class=\"error\">{}</dd>", esc(e))).unwrap_or_default();
    let waiting = j.waiting_reason.as_deref().map(|w| format!("<dt>Waiting</dt><dd>{}</dd>", esc(w))).unwrap_or_default();
    let adapter = if j.state == lorafleet_shared::job::JobState::Succeeded && j.adapter_manifest.is_some() {
        format!("<dt>Adapter</dt><dd><a href=\"/jobs/{id}/adapter\">files</a></dd>")
    } else {
        String::new()
    };
    let _ = writeln!(
        b,
        "<dl class=\"facts\">\
         <dt>ID</dt><dd><code>{id}</code></dd>\
         <dt>State</dt><dd id=\"st-state\">{}</dd>\
         <dt>Progress</dt><dd id=\"st-progress\">{}</dd>\
         <dt>Loss</dt><dd id=\"st-loss\">{}</dd>\
         <dt>Tenant</dt><dd>{}</dd>\
         <dt>Attempt</dt><dd id=\"st-attempt\">{}</dd>\
         <dt>Worker</dt><dd id=\"st-worker\">{}</dd>\
         <dt>Model</dt><dd>{}</dd>\
         <dt>Created</dt><dd>{}</dd>\
         <dt>Updated</dt><dd id=\"st-updated\">{}</dd>{error}{waiting}{adapter}</dl>",
        state_badge(j.state.as_str()),
        progress(j.step, j.total_steps),
        num(j.loss, 4),
        j.tenant.as_deref().map(esc).unwrap_or_else(|| "-".into()),
        j.attempt,
        worker_cell(j.worker_id.map(|w| w.to_string()), v.worker_names),
        esc(&j.spec.model.source),
        time(j.created_ms),
        time(j.updated_ms),
    );
    b.push_str(
        "<h2>Training curves</h2>\n<div class=\"charts\">\n\
         <figure><svg id=\"loss-chart\" class=\"chart\" role=\"img\" aria-label=\"Training loss by step (points: eval loss)\" viewBox=\"0 0 560 260\" data-points=\"0\">\
         <title>Training loss by step (points: eval loss)</title></svg><figcaption>Loss (line: training, dots: evaluation)</figcaption></figure>\n\
         <figure><svg id=\"lr-chart\" class=\"chart\" role=\"img\" aria-label=\"Learning rate by step\" viewBox=\"0 0 560 260\" data-points=\"0\">\
         <title>Learning rate by step</title></svg><figcaption>Learning rate</figcaption></figure>\n</div>\n\
         <p class=\"note\" id=\"live-note\">The curves follow the job's step metrics as the worker reports them (updated every 2 s while it runs).</p>\n",
    );
    let _ = write!(
        b,
        "<h2>Evaluation</h2>\n<table id=\"evals\">\n<caption>Evaluations (exact match and ROUGE-L with <code>eval_generate_samples</code>)</caption>\n\
         <thead><tr><th scope=\"col\">Step</th><th scope=\"col\">Eval loss</th><th scope=\"col\">Perplexity</th><th scope=\"col\">Exact match</th><th scope=\"col\">ROUGE-L</th></tr></thead>\n\
         <tbody>\n{}</tbody>\n</table>\n<h2>Sample generations</h2>\n<div id=\"samples\">{}</div>\n",
        eval_rows(v.evals),
        samples(v.evals)
    );
    let _ = write!(
        b,
        "<h2>Checkpoints</h2>\n<table id=\"checkpoints\">\n<caption>Committed checkpoints, newest first (files stream through the coordinator)</caption>\n\
         <thead><tr><th scope=\"col\">Step</th><th scope=\"col\">Attempt</th><th scope=\"col\">Epoch</th><th scope=\"col\">Committed</th><th scope=\"col\">Download</th></tr></thead>\n\
         <tbody>\n{}</tbody>\n</table>\n",
        checkpoint_rows(&id, v.checkpoints)
    );
    b.push_str("<h2>Logs</h2>\n");
    if v.logs_truncated {
        b.push_str("<p class=\"note\">Older lines were dropped (the coordinator keeps the last 10,000 per job).</p>\n");
    }
    b.push_str("<ol id=\"logs\" class=\"logs\" aria-label=\"Job log\">\n");
    for l in v.logs {
        let _ = writeln!(b, "{}", log_line(l));
    }
    b.push_str("</ol>\n</div>\n");
    b
}

pub fn log_line(l: &LogRow) -> String {
    let level = match l.level.as_str() {
        "error" | "warn" | "info" | "debug" => l.level.as_str(),
        _ => "info",
    };
    format!(
        "<li class=\"log-{level}\"><span class=\"ts\">{}</span> <span class=\"lvl\">{}</span> {}</li>",
        esc(&utc(l.unix_ms)),
        esc(&l.level),
        esc(&l.message)
    )
}

/// The files of a checkpoint or adapter, each a download link.
pub fn files(title: &str, back: &str, base: &str, files: &[lorafleet_storage::FileEntry]) -> String {
    let mut b = format!("<h1>{}</h1>\n<p><a href=\"{}\">Back to the job</a></p>\n", esc(title), esc(back));
    b.push_str(
        "<table>\n<caption>Files (verified against the manifest's sha256 while they stream)</caption>\n<thead><tr><th scope=\"col\">File</th>\
         <th scope=\"col\">Size</th><th scope=\"col\">sha256</th></tr></thead>\n<tbody>\n",
    );
    for f in files {
        let _ = writeln!(
            b,
            "<tr><td><a href=\"{base}/{}\" download>{}</a></td><td>{}</td><td><code>{}</code></td></tr>",
            url_path(&f.name),
            esc(&f.name),
            human_bytes(f.size),
            esc(&f.sha256)
        );
    }
    b.push_str("</tbody>\n</table>\n");
    b
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn device(d: &pb::Device) -> String {
    let mem = if d.memory_mib > 0 { format!(" ({})", human_bytes(d.memory_mib * 1024 * 1024)) } else { String::new() };
    format!("{}{mem}", esc(&d.name))
}

/// The workers page.
pub fn workers(ws: &[pb::Worker], now_ms: i64) -> String {
    let mut b = String::from("<h1>Workers</h1>\n");
    b.push_str(
        "<table id=\"workers\" data-refresh=\"5000\">\n<caption>Registered workers that are alive (refreshed every 5 s)</caption>\n<thead><tr>\
         <th scope=\"col\">Worker</th><th scope=\"col\">Pool</th><th scope=\"col\">Devices</th><th scope=\"col\">Labels</th>\
         <th scope=\"col\">Leases</th><th scope=\"col\">Last heartbeat</th><th scope=\"col\">Version</th></tr></thead>\n<tbody>\n",
    );
    if ws.is_empty() {
        b.push_str("<tr><td colspan=\"7\">No worker is registered.</td></tr>\n");
    }
    for w in ws {
        let pool = w.labels.get("pool").filter(|p| !p.is_empty()).map(String::as_str).unwrap_or("default");
        let mut labels: Vec<(&String, &String)> = w.labels.iter().collect();
        labels.sort();
        let labels = if labels.is_empty() {
            "-".to_string()
        } else {
            labels.iter().map(|(k, v)| format!("<code>{}={}</code>", esc(k), esc(v))).collect::<Vec<_>>().join(" ")
        };
        let mut leases: Vec<String> = w.running_job_ids.iter().map(|j| format!("<a href=\"/jobs/{0}\">{1}</a>", url_seg(j), esc(short(j)))).collect();
        for g in &w.gang_seats {
            leases.push(format!("<a href=\"/jobs/{0}\">{1}</a> (node {2} of {3})", url_seg(&g.job_id), esc(short(&g.job_id)), g.node_rank, g.nodes));
        }
        let leases = if leases.is_empty() { "idle".to_string() } else { leases.join(", ") };
        let ago = if w.last_heartbeat_unix_ms > 0 { format!("{:.0} s ago", (now_ms - w.last_heartbeat_unix_ms).max(0) as f64 / 1000.0) } else { "-".into() };
        let _ = writeln!(
            b,
            "<tr data-worker=\"{}\"><td>{} <span class=\"id\">{}</span></td><td>{}</td><td>{}</td><td>{labels}</td><td>{leases}</td><td>{ago}</td><td>{}</td></tr>",
            esc(&w.worker_id),
            esc(&w.name),
            esc(short(&w.worker_id)),
            esc(pool),
            w.devices.iter().map(device).collect::<Vec<_>>().join(", "),
            esc(&w.version)
        );
    }
    b.push_str("</tbody>\n</table>\n");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(esc("<script>alert('x')</script> & \"q\""), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;");
        assert_eq!(esc("a\u{0}b\nc"), "a\u{fffd}b\nc");
        assert_eq!(url_seg("a b/é?"), "a%20b%2F%C3%A9%3F");
        assert_eq!(url_path("best/adapter model.bin"), "best/adapter%20model.bin");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1_000), "1970-01-01 00:00:01 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_133_617_000), "2026-12-01 14:00:17 UTC");
        assert_eq!(time(1_000), "<time datetime=\"1970-01-01T00:00:01Z\">1970-01-01 00:00:01 UTC</time>");
    }
}
