//! A real headless Chromium driven over the DevTools protocol, for the dashboard test.
//!
//! Chromium's `--remote-debugging-pipe` speaks the protocol as JSON messages ended by
//! NUL bytes on file descriptors 3 (commands in) and 4 (replies and events out); a shell
//! maps those to the child's stdin and stdout, so no WebSocket client is needed. A
//! reader thread forwards every message, and every wait has a timeout.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The Chromium binary: `LORAFLEET_CHROMIUM`, else the first of Debian's and others'
/// names on the PATH.
pub fn find_chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LORAFLEET_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

pub struct Browser {
    child: Child,
    input: ChildStdin,
    messages: Receiver<serde_json::Value>,
    next_id: u64,
    /// The page's session (flattened target attachment).
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start headless Chromium with one blank page of `width` x `height` CSS pixels.
    /// `ignore_cert_errors`: accept the test PKI's server certificate.
    pub fn start(chromium: &std::path::Path, width: u32, height: u32, ignore_cert_errors: bool) -> Result<Browser, String> {
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--hide-scrollbars".into(),
            "--remote-debugging-pipe".into(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--window-size={width},{height}"),
        ];
        if ignore_cert_errors {
            args.push("--ignore-certificate-errors".into());
        }
        args.push("about:blank".into());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>&2")
            .arg(chromium)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", chromium.display()))?;
        let input = child.stdin.take().ok_or("no stdin")?;
        let output = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(output);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        match serde_json::from_slice::<serde_json::Value>(&buf) {
                            Ok(v) => {
                                if tx.send(v).is_err() {
                                    return;
                                }
                            }
                            Err(_) => continue,
                        }
                    }
                }
            }
        });
        let mut b = Browser { child, input, messages: rx, next_id: 0, session: String::new(), _profile: profile };
        let t = b.call_in(None, "Target.createTarget", serde_json::json!({ "url": "about:blank" }))?;
        let target = t["targetId"].as_str().ok_or("no targetId")?.to_string();
        let s = b.call_in(None, "Target.attachToTarget", serde_json::json!({ "targetId": target, "flatten": true }))?;
        b.session = s["sessionId"].as_str().ok_or("no sessionId")?.to_string();
        b.call("Emulation.setDeviceMetricsOverride", serde_json::json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }))?;
        Ok(b)
    }

    fn call_in(&mut self, session: Option<&str>, method: &str, params: serde_json::Value) -> Result<serde_json::Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = serde_json::json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        bytes.push(0);
        self.input.write_all(&bytes).and_then(|()| self.input.flush()).map_err(|e| format!("{method}: writing to chromium: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(v) if v["id"].as_u64() == Some(id) => {
                    if let Some(e) = v.get("error") {
                        return Err(format!("{method}: {e}"));
                    }
                    return Ok(v["result"].clone());
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return Err(format!("{method}: no answer from chromium in 60 s")),
                Err(RecvTimeoutError::Disconnected) => return Err(format!("{method}: chromium exited")),
            }
        }
    }

    /// A command on the page.
    pub fn call(&mut self, method: &str, params: serde_json::Value) -> Result<serde_json::Value, String> {
        let s = self.session.clone();
        self.call_in(Some(&s), method, params)
    }

    /// Evaluate `expr` in the page (promises awaited) and return its value as JSON.
    pub fn eval(&mut self, expr: &str) -> Result<serde_json::Value, String> {
        let r = self.call("Runtime.evaluate", serde_json::json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }))?;
        if let Some(ex) = r.get("exceptionDetails") {
            return Err(format!("{expr}: {ex}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Navigate and wait until the document has loaded.
    pub fn goto(&mut self, url: &str) -> Result<(), String> {
        let r = self.call("Page.navigate", serde_json::json!({ "url": url }))?;
        if let Some(e) = r.get("errorText").and_then(|e| e.as_str()) {
            return Err(format!("{url}: {e}"));
        }
        self.wait_for("document.readyState === 'complete'", Duration::from_secs(30))
    }

    /// Poll `expr` until it is true.
    pub fn wait_for(&mut self, expr: &str, timeout: Duration) -> Result<(), String> {
        let t = Instant::now();
        loop {
            if self.eval(expr)? == serde_json::json!(true) {
                return Ok(());
            }
            if t.elapsed() > timeout {
                return Err(format!("timed out waiting for `{expr}`"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the page as it is shown (the viewport).
    pub fn screenshot(&mut self) -> Result<Vec<u8>, String> {
        let r = self.call("Page.captureScreenshot", serde_json::json!({ "format": "png" }))?;
        base64_decode(r["data"].as_str().ok_or("no screenshot data")?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call_in(None, "Browser.close", serde_json::json!({}));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (with padding), as DevTools sends screenshots.
pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !bytes.len().is_multiple_of(4) {
        return Err("base64: length is not a multiple of 4".into());
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = if i >= 4 - pad { 0 } else { val(c).ok_or_else(|| format!("base64: bad character {:?}", c as char))? };
            n = n << 6 | v;
        }
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64_decode("YWJj").unwrap(), b"abc");
        assert!(super::base64_decode("a").is_err());
    }
}
