//! The live SRE page (`GET /dashboard`) end to end in a real headless Debian chromium: an
//! engine on its own dev chain serves the page, the browser opens it, the page goes live on
//! `/v1/dashboard/feed` and lists the stages; then the load generator drives the engine over
//! the desk WebSocket and the numbers on the page move (tick, the e2e stage's count and p99,
//! received throughput). A PNG screenshot taken while the load runs goes to
//! `target/dashboard/dashboard.png`, and also to `$DASHBOARD_SCREENSHOT` when that is set
//! (a relative path is taken from the workspace root). Last, the page's feed is dropped and
//! the page must reconnect by itself. A page that never goes live leaves
//! `target/dashboard/not-live.png` behind.
//!
//! chromium comes from `scripts/setup.d/60-chromium.sh`; without it the test fails.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use engine::Engine;
use headless_chrome::protocol::cdp::Emulation::SetDeviceMetricsOverride;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::Value;

const CHROMIUM: &str = "/usr/bin/chromium";
const WIDTH: u32 = 1440;
const E2E: &str = "e2e.ws_to_wire";

/// What the page shows, read through its stable hooks (ids, `data-*` rows, cell classes).
const SNAPSHOT_JS: &str = r#"(() => {
  const text = (el) => (el ? el.textContent.trim() : null);
  const num = (el) => {
    const t = text(el);
    if (t === null || t === '' || t === '–') return null;
    const v = Number(t.replace(/[^0-9.eE+-]/g, ''));
    return Number.isFinite(v) ? v : null;
  };
  const stages = {};
  for (const tr of document.querySelectorAll('#stages tr[data-stage]')) {
    stages[tr.dataset.stage] = {
      count: num(tr.querySelector('.count')),
      p50: num(tr.querySelector('.p50')),
      p99: num(tr.querySelector('.p99')),
      p999: num(tr.querySelector('.p999')),
    };
  }
  const queues = {};
  for (const tr of document.querySelectorAll('#queues tr[data-queue]')) {
    queues[tr.dataset.queue] = num(tr.querySelector('.depth'));
  }
  return JSON.stringify({
    conn: text(document.getElementById('conn')),
    tick: num(document.getElementById('tick')),
    stages,
    queues,
    slo: [...document.querySelectorAll('#slo tr[data-slo]')].map((tr) => tr.dataset.slo),
    providers: document.querySelectorAll('#providers tr[data-provider]').length,
    received: num(document.querySelector('#throughput .received')),
    throughput: text(document.getElementById('throughput')),
    events: document.getElementById('events') !== null,
    errors: window.dashboardErrors || [],
    reconnects: window.dashboardFeed ? window.dashboardFeed.reconnects : null,
  });
})()"#;

#[derive(Debug, Clone)]
struct Snapshot {
    raw: Value,
}

impl Snapshot {
    fn conn(&self) -> &str {
        self.raw["conn"].as_str().unwrap_or("")
    }
    fn tick(&self) -> f64 {
        self.raw["tick"].as_f64().unwrap_or(-1.0)
    }
    fn stage_count(&self) -> usize {
        self.raw["stages"].as_object().map_or(0, |m| m.len())
    }
    fn has_stage(&self, name: &str) -> bool {
        self.raw["stages"].get(name).is_some()
    }
    /// A stage's cell (`count`, `p50`, `p99`, `p999`); a stage not listed reads 0.
    fn cell(&self, stage: &str, cell: &str) -> f64 {
        self.raw["stages"][stage][cell].as_f64().unwrap_or(0.0)
    }
    fn received(&self) -> f64 {
        self.raw["received"].as_f64().unwrap_or(0.0)
    }
    fn queue_count(&self) -> usize {
        self.raw["queues"].as_object().map_or(0, |m| m.len())
    }
    fn reconnects(&self) -> f64 {
        self.raw["reconnects"].as_f64().unwrap_or(-1.0)
    }
    fn errors(&self) -> &[Value] {
        self.raw["errors"].as_array().map_or(&[], Vec::as_slice)
    }
}

fn snapshot(tab: &Tab) -> Snapshot {
    let r = tab
        .evaluate(SNAPSHOT_JS, false)
        .expect("evaluate on the page");
    let s = r
        .value
        .as_ref()
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("the page's snapshot is not a string: {r:?}"));
    Snapshot {
        raw: serde_json::from_str(s).expect("snapshot JSON"),
    }
}

/// A PNG of the whole page: the viewport is made as tall as the document first.
fn full_page_png(tab: &Tab) -> Vec<u8> {
    let height = tab
        .evaluate("Math.ceil(document.documentElement.scrollHeight)", false)
        .ok()
        .and_then(|r| r.value)
        .and_then(|v| v.as_u64())
        .unwrap_or(1100)
        .clamp(600, 4000) as u32;
    tab.call_method(SetDeviceMetricsOverride {
        width: WIDTH,
        height,
        device_scale_factor: 1.0,
        mobile: false,
        scale: None,
        screen_width: None,
        screen_height: None,
        position_x: None,
        position_y: None,
        dont_set_visible_size: None,
        screen_orientation: None,
        viewport: None,
        display_feature: None,
        device_posture: None,
    })
    .expect("set the viewport");
    // The chart is drawn for the new width on the resize; let that frame land.
    std::thread::sleep(Duration::from_millis(300));
    tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot")
}

/// Polls the page until `ok` holds, at most `limit`; the last snapshot either way.
fn wait_for(tab: &Tab, limit: Duration, ok: impl Fn(&Snapshot) -> bool) -> (bool, Snapshot) {
    let until = Instant::now() + limit;
    loop {
        let s = snapshot(tab);
        if ok(&s) || Instant::now() >= until {
            return (ok(&s), s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn browser() -> Browser {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: the dashboard test needs Debian chromium, installed by \
         scripts/setup.d/60-chromium.sh (run `bash scripts/setup.d/60-chromium.sh` as root)"
    );
    let opts = LaunchOptions::default_builder()
        .path(Some(PathBuf::from(CHROMIUM)))
        // `--headless=new` is passed below instead of the crate's bare `--headless`.
        .headless(false)
        // Tests run as root, where chromium's sandbox cannot start.
        .sandbox(false)
        .window_size(Some((WIDTH, 1100)))
        .args(vec![
            OsStr::new("--headless=new"),
            OsStr::new("--no-sandbox"),
            OsStr::new("--disable-gpu"),
            OsStr::new("--hide-scrollbars"),
        ])
        .idle_browser_timeout(Duration::from_secs(300))
        .build()
        .expect("launch options");
    Browser::new(opts).unwrap_or_else(|e| panic!("{CHROMIUM} does not start headless: {e}"))
}

/// An engine on its own dev chain (250 ms blocks, one confirmation), with the desk limits
/// raised for the load generator's single principal, and a token for it.
fn start_engine() -> (venues::Anvil, Engine, String) {
    let (anvil, cfg, token) = benches::load_setup(250, "dashboard")
        .expect("dev chain (anvil from .tools/: scripts/setup.sh)");
    let e = Engine::start(cfg).expect("engine starts");
    (anvil, e, token)
}

/// The workspace's target folder (the parent of this test's `CARGO_TARGET_TMPDIR`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// `target/dashboard/dashboard.png`.
fn screenshot_path() -> PathBuf {
    target_dir().join("dashboard").join("dashboard.png")
}

fn write_png(path: &Path, png: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Kills the load generator if the test panics while it runs.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn the_dashboard_goes_live_and_its_numbers_move_under_load() {
    let started = Instant::now();
    let browser = browser();
    let (anvil, engine, token) = start_engine();
    let addr = engine.local_addr();

    let tab = browser.new_tab().expect("a tab");
    tab.set_default_timeout(Duration::from_secs(20));
    let url = format!("http://{addr}/dashboard");
    tab.navigate_to(&url)
        .and_then(|t| t.wait_until_navigated())
        .unwrap_or_else(|e| panic!("{url}: {e}"));

    // Live: the feed is connected and its first frames filled the stage table; a few idle
    // ticks, so the chart shows the load arriving.
    let (live, before) = wait_for(&tab, Duration::from_secs(20), |s| {
        s.conn() == "live" && s.stage_count() > 0 && s.tick() >= 3.0
    });
    if !live {
        let png = full_page_png(&tab);
        write_png(&target_dir().join("dashboard").join("not-live.png"), &png);
    }
    assert!(
        live,
        "{url} never went live (#conn \"live\", rows in #stages, tick 3) within 20 s: {:?}",
        before.raw
    );
    assert!(
        before.raw["events"].as_bool().unwrap_or(false),
        "#events missing"
    );
    assert!(
        before.errors().is_empty(),
        "script errors: {:?}",
        before.errors()
    );
    eprintln!(
        "dashboard: live after {:.1} s at tick {}, {} stages; idle {E2E} count {}",
        started.elapsed().as_secs_f64(),
        before.tick(),
        before.stage_count(),
        before.cell(E2E, "count")
    );
    // Nothing has been sent yet: the engine's end-to-end stage has recorded nothing.
    assert_eq!(before.cell(E2E, "count"), 0.0, "{:?}", before.raw);
    assert_eq!(before.received(), 0.0, "{:?}", before.raw);

    let reports = tempfile::tempdir().unwrap();
    let desk = format!("ws://{addr}/v1/ws");
    let child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--url", &desk, "--token", &token])
        .args(["--rates", "100", "--duration", "5", "--settle", "30"])
        .args(["--connections", "2", "--report-dir"])
        .arg(reports.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let mut load = Reap(Some(child));
    let load_started = Instant::now();

    // While the load runs: the page's numbers move; one screenshot once they have.
    let mut peak_count = 0.0f64;
    let mut peak_p99 = 0.0f64;
    let mut peak_received = 0.0f64;
    let mut screenshot = None;
    let mut last = before.clone();
    while load_started.elapsed() < Duration::from_secs(60) {
        let s = snapshot(&tab);
        peak_count = peak_count.max(s.cell(E2E, "count"));
        peak_p99 = peak_p99.max(s.cell(E2E, "p99"));
        peak_received = peak_received.max(s.received());
        let running = load.0.as_mut().unwrap().try_wait().unwrap().is_none();
        if screenshot.is_none()
            && running
            && load_started.elapsed() >= Duration::from_secs(4)
            && (peak_count > 0.0 || peak_received > 0.0)
        {
            let png = full_page_png(&tab);
            write_png(&screenshot_path(), &png);
            screenshot = Some((png, s.clone()));
        }
        last = s;
        if !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = load
        .0
        .take()
        .unwrap()
        .wait_with_output()
        .expect("loadgen ends");
    assert!(
        out.status.success(),
        "loadgen against {desk}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One more tick after the load, so the last snapshot is a later tick than any sample.
    let (_, after) = wait_for(&tab, Duration::from_secs(5), |s| s.tick() > last.tick());

    eprintln!(
        "dashboard: after load tick {}, peak {E2E} count {peak_count} p99 {peak_p99} µs, \
         peak received {peak_received}/s; {:.1} s in all",
        after.tick(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(after.conn(), "live", "{:?}", after.raw);
    assert!(
        after.tick() > before.tick(),
        "tick did not advance: {} → {}",
        before.tick(),
        after.tick()
    );
    assert!(after.has_stage(E2E), "no {E2E} row: {:?}", after.raw);
    assert!(
        peak_count > 0.0 && peak_p99 > 0.0,
        "{E2E} stayed at count {peak_count}, p99 {peak_p99} on the page under load: {:?}",
        after.raw
    );
    assert!(
        peak_received > 0.0,
        "received throughput stayed 0 on the page under load: {:?}",
        after.raw
    );
    assert!(after.queue_count() > 0, "no #queues rows: {:?}", after.raw);
    assert!(
        after.raw["providers"].as_u64().unwrap_or(0) > 0,
        "no #providers rows: {:?}",
        after.raw
    );
    // Dev mode's SLO budgets include the e2e stage (`engine::dev::dev_slo`).
    assert!(
        after.raw["slo"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == E2E)),
        "no #slo row for {E2E}: {:?}",
        after.raw
    );
    assert!(
        after.errors().is_empty(),
        "script errors: {:?}",
        after.errors()
    );

    // A lost feed: the page says so, reconnects by itself and goes on from the next tick.
    tab.evaluate("window.dashboardFeed.drop()", false)
        .expect("drop the feed");
    let (back, again) = wait_for(&tab, Duration::from_secs(10), |s| {
        s.reconnects() >= 1.0 && s.conn() == "live" && s.tick() > after.tick()
    });
    assert!(back, "the page did not reconnect its feed: {:?}", again.raw);

    let (png, shot) = screenshot.expect("a screenshot while the load ran with moving numbers");
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot is not a PNG ({} bytes)",
        png.len()
    );
    let path = screenshot_path();
    eprintln!(
        "dashboard: screenshot at tick {} → {}",
        shot.tick(),
        path.display()
    );
    if let Some(extra) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        let extra = PathBuf::from(extra);
        let extra = if extra.is_relative() {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
            root.expect("workspace root").join(extra)
        } else {
            extra
        };
        write_png(&extra, &png);
        eprintln!("dashboard: screenshot → {}", extra.display());
    }

    drop(tab);
    drop(browser);
    engine.shutdown().expect("engine shutdown");
    drop(anvil);
}
