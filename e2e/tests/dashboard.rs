//! The dashboard in a real headless Chromium (DevTools protocol over a pipe), against a
//! real coordinator (TLS, `--auth`) and worker training the demo model: an
//! unauthenticated request gets 401 and the sign-in form, the form's cookie is
//! HttpOnly, the job page's loss curve grows while the job trains, evaluations,
//! samples and checkpoints show up (a checkpoint file downloads), the jobs and workers
//! pages list the job and the worker, every input has a label and every chart an
//! accessible name. Writes a screenshot of the job page (`LORAFLEET_SCREENSHOT`, default
//! `target/dashboard.png`; docs/dashboard.png is one).
//!
//! Needs Chromium (`scripts/test.sh` installs Debian's as root): without it the test
//! fails under CI (env CI set) and is skipped otherwise.

use lorafleet_e2e::browser::{find_chromium, Browser};
use lorafleet_e2e::*;
use lorafleet_proto as pb;
use std::time::Duration;

fn demo_spec(name: &str, model: &str, steps: u64) -> String {
    let data = workspace_root().join("examples/faq.json");
    format!(
        "name: {name}\nmodel: {{ source: {model:?} }}\nquantization: {{ method: none, compute_dtype: f32 }}\n\
lora: {{ r: 32, alpha: 64, dropout: 0.0, target_modules: all-linear }}\n\
data: {{ train: {data:?}, eval: {data:?}, format: qa, template: \"<human>: {{question}}\\n<assistant>:\", max_seq_len: 128, shuffle: true }}\n\
training: {{ max_steps: {steps}, micro_batch_size: 4, grad_accum: 1, lr: 3.0e-3, schedule: cosine, warmup_steps: 10, max_grad_norm: 1.0, seed: 42, \
log_every: 1, eval_every: 15, checkpoint_every: 15, eval_generate_samples: 2, eval_generate_max_new_tokens: 24, \
sample_prompts: [\"How do I reset my password?\"], sample_max_new_tokens: 24 }}\n\
output: {{ dir: out/dashboard }}\n",
        data = data.display().to_string()
    )
}

/// Inputs (not hidden) without a label or an aria-label, as `tag#id` strings.
const UNLABELLED: &str = "JSON.stringify([...document.querySelectorAll('input, select, textarea')]\
    .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))\
    .map(e => e.tagName + '#' + e.id))";

fn points(b: &mut Browser, chart: &str) -> u64 {
    let v = b.eval(&format!("Number(document.getElementById('{chart}').getAttribute('data-points'))")).unwrap();
    v.as_u64().unwrap_or(0)
}

/// Where the browser is and what it shows, for failure messages.
fn page_text(b: &mut Browser) -> String {
    b.eval("location.href + '\\n' + document.body.innerText.slice(0, 2000)").map(|v| v.to_string()).unwrap_or_else(|e| e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_follows_a_training_job() {
    let Some(chromium) = find_chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is not installed: the dashboard test needs it in CI (scripts/test.sh installs Debian's `chromium` as root)");
        }
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED dashboard_in_chromium_follows_a_training_job: no chromium on the PATH (apt-get install chromium, or set LORAFLEET_CHROMIUM)"
        );
        return;
    };
    let _g = serial().await;
    let c = Cluster::start(1).await;
    let tokens = c.tokens.clone().expect("tokens");

    // The demo model, under the workspace (workers resolve relative model paths there).
    let rel = format!("target/e2e-dashboard-{}/demo", std::process::id());
    let model_dir = workspace_root().join(&rel);
    ok(&std::process::Command::new(bin("lorafleet")).arg("demo-model").arg("--out").arg(&model_dir).output().expect("demo-model"));
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap_or(&self.0));
        }
    }
    let _cleanup = Cleanup(model_dir.clone());
    let job = c.submit(&c.spec("dash", &demo_spec("faq-dashboard", &rel, 400)));
    c.wait_job(&job, "training steps", Duration::from_secs(180), |j| state(j) == pb::JobState::Running && j.step >= 2).await;

    let web = c.web_url();
    let shot_path = std::env::var_os("LORAFLEET_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/dashboard.png"));
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let mut b = Browser::start(&chromium, 1100, 1500, true).expect("chromium starts");

        // Without a token: 401 and the sign-in form, with a label on its input.
        b.goto(&format!("{web}/jobs/{job}")).unwrap();
        assert_eq!(b.eval("fetch(location.href).then(r => r.status)").unwrap(), 401);
        assert_eq!(b.eval(&format!("fetch('/api/jobs/{job}/progress').then(r => r.status)")).unwrap(), 401);
        assert_eq!(b.eval("document.documentElement.lang").unwrap(), "en");
        assert_eq!(b.eval("!!document.querySelector('form.login input#token')").unwrap(), true);
        assert_eq!(b.eval(UNLABELLED).unwrap(), "[]", "inputs without labels on the sign-in page");

        // Sign in with the form: back on the job page, with a cookie scripts cannot read.
        b.eval(&format!("document.getElementById('token').value = {:?}; document.querySelector('form.login').submit(); true", tokens.user)).unwrap();
        if let Err(e) = b.wait_for(&format!("location.pathname === '/jobs/{job}' && document.readyState === 'complete' && !!document.getElementById('loss-chart')"), Duration::from_secs(30)) {
            panic!("{e}; the page: {}", page_text(&mut b));
        }
        assert_eq!(b.eval("document.cookie.includes('lorafleet_token')").unwrap(), false, "the token cookie is HttpOnly");
        assert_eq!(b.eval(&format!("fetch('/api/jobs/{job}/progress').then(r => r.status)")).unwrap(), 200);

        // The loss curve grows while the job trains.
        b.wait_for("Number(document.getElementById('loss-chart').getAttribute('data-points')) >= 2", Duration::from_secs(60)).unwrap();
        let first = points(&mut b, "loss-chart");
        b.wait_for(&format!("Number(document.getElementById('loss-chart').getAttribute('data-points')) > {first}"), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the loss curve did not grow past {first} points: {e}"));
        let second = points(&mut b, "loss-chart");
        assert!(second > first, "{first} -> {second}");
        assert!(points(&mut b, "lr-chart") >= 2);
        let drawn = b.eval("document.querySelector('#loss-chart polyline').getAttribute('points').trim().split(' ').length").unwrap();
        assert!(drawn.as_u64().unwrap() >= second, "polyline has {drawn} points, data-points {second}");

        // Accessibility basics: labelled inputs, named charts, table headers, headings.
        assert_eq!(b.eval(UNLABELLED).unwrap(), "[]");
        assert_eq!(
            b.eval("[...document.querySelectorAll('svg')].every(s => (s.getAttribute('aria-label') || '').length > 0 && !!s.querySelector('title') && s.getAttribute('role') === 'img')")
                .unwrap(),
            true,
            "every chart has role=img, an aria-label and a title"
        );
        assert_eq!(b.eval("[...document.querySelectorAll('table')].every(t => t.querySelectorAll('th[scope=col]').length > 0 && !!t.caption)").unwrap(), true);
        assert_eq!(b.eval("document.querySelectorAll('h1').length === 1 && document.querySelectorAll('h2').length >= 4").unwrap(), true);

        // An evaluation (with exact match), a sample and a checkpoint arrive live.
        b.wait_for(
            "document.querySelectorAll('#evals tbody tr td').length >= 5 && /%/.test(document.querySelector('#evals tbody tr td:nth-child(4)').textContent) \
             && !!document.querySelector('#samples dl') && !!document.querySelector('#checkpoints a')",
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("{e}; job: {:?}", handle.block_on(c.job(&job))));
        let link = b.eval("document.querySelector('#checkpoints a').getAttribute('href')").unwrap();
        let files = b.eval(&format!("fetch({link}).then(r => r.text()).then(t => [...new DOMParser().parseFromString(t, 'text/html').querySelectorAll('a[download]')].map(a => a.getAttribute('href')))")).unwrap();
        let first_file = files[0].as_str().expect("a checkpoint file link").to_string();
        let got = b.eval(&format!("fetch({first_file:?}).then(r => r.arrayBuffer().then(a => [r.status, a.byteLength, Number(r.headers.get('content-length'))]))")).unwrap();
        assert_eq!(got[0], 200, "{first_file}: {got}");
        assert_eq!(got[1], got[2], "{first_file}: the whole file: {got}");

        // Let the curve run a little longer for the picture, then take it.
        let now = points(&mut b, "loss-chart");
        let _ = b.wait_for(&format!("Number(document.getElementById('loss-chart').getAttribute('data-points')) >= {}", now.max(45)), Duration::from_secs(60));
        b.eval("window.scrollTo(0, 0); true").unwrap();
        let png = b.screenshot().unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() < 300 * 1024, "screenshot is {} bytes", png.len());
        if let Some(d) = shot_path.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&shot_path, &png).unwrap();
        eprintln!("dashboard screenshot: {} ({} bytes)", shot_path.display(), png.len());

        // The jobs and workers pages list the job and the worker.
        b.goto(&format!("{web}/")).unwrap();
        assert_eq!(b.eval(&format!("!!document.querySelector('tr[data-job=\"{job}\"] a[href=\"/jobs/{job}\"]')")).unwrap(), true);
        assert_eq!(b.eval(UNLABELLED).unwrap(), "[]", "the jobs filter is labelled");
        b.goto(&format!("{web}/workers")).unwrap();
        assert_eq!(b.eval("document.querySelector('#workers tbody').textContent.includes('w0')").unwrap(), true);
        assert_eq!(b.eval(&format!("!!document.querySelector('#workers a[href=\"/jobs/{job}\"]')")).unwrap(), true);
    });
    ok(&c.cli(&["cancel", &job]));
}
